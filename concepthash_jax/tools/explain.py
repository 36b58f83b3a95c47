r"""Explains a trained ConceptHash run: every qualitative result of the paper.

  concepthash-explain --workdir=runs/synthetic

Encodes the train (database) and test (query) splits with the run's final
checkpoint and writes into WORKDIR/explain (or --out):
  attention_maps.png       last-layer attention of each concept token over the
                           patches, one panel per concept (Fig. 3, 6, 8)
  gallery_concept<m>.png   test images grouped by concept m's sub-code value,
                           attended region cropped (Fig. 3; 2-bit sub-codes in
                           its quadrant layout)
  pr_curve.png, precision_at_k.png   retrieval precision-recall over Hamming
                           radii and P@k against k (numbers in explain.json)
  correlation.png          concept-attention correlation, train split (Fig. 7)
  part_hits.png            where each concept's attention peak lands: the share
                           of test images per part keypoint or background
  localisation.png         part localisation error vs. baselines (Table 3)
  tsne_centers.png         t-SNE of the hash class centers by family (Fig. 5)
  report.md, explain.json  every number, with the figures
Numbers: class- and family-level mAP@R beside chance (Table 5), part
localisation error beside the image-centre and mean-location baselines, how
often the concepts land on different parts, and the within/between-family
cosine of the class centers. part_hits.png and localisation.png need part
keypoints (the synthetic data and CUB's parts/part_locs.txt have them). The
analyses live in `interpret`, the drawing in `figures`, the markdown in
`report`; this module runs them as a list of steps.
"""
import dataclasses
import functools
import json
import os
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tqdm

from concepthash_jax import data as data_lib
from concepthash_jax import encoding
from concepthash_jax import evaluation
from concepthash_jax import inference
from concepthash_jax import interpret
from concepthash_jax import run_files
from concepthash_jax import safe_files
from concepthash_jax import sharding
from concepthash_jax.data import core as data_core
from concepthash_jax.interpret import figures
from concepthash_jax.interpret import report
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS


@dataclasses.dataclass
class _Inputs:
  """What every step reads: the run, its encoded splits, where to write."""
  config: object
  model: object
  variables: dict
  class_names: list
  train_enc: dict  # The database, `encoding.encode_split` with attention.
  test_enc: dict  # The queries, also with display images.
  part_names: tuple
  family_of: np.ndarray  # (C,) family of each class.
  family_names: list
  out_dir: str

  @property
  def size(self):
    """(H, W) of the model input."""
    return (self.config.data.image_size,) * 2

  def path(self, name):
    return os.path.join(self.out_dir, name)


def _retrieval(inp: _Inputs):
  """Table 5 (class and family mAP@R beside chance), PR curve and P@k."""
  r, ties = evaluation.retrieval_cutoff(inp.config.eval), inp.config.eval.ties
  numbers = interpret.retrieval_by_level(inp.test_enc, inp.train_enc,
                                         inp.family_of, R=r, ties=ties)
  curves = evaluation.score(inp.test_enc, inp.train_enc, inp.config.eval,
                          curves=True)
  numbers['pr_precision'] = curves['pr_precision']
  numbers['pr_recall'] = curves['pr_recall']
  numbers['precision_at_k'] = curves['precision_at_k']
  figures.plot_retrieval_curves(
      inp.path(''), curves, f'{inp.config.data.name}, {curves["num_queries"]}'
      f' queries, {curves["num_database"]} database')
  return {'retrieval': numbers}, [
      ('Precision-recall over Hamming radii', 'pr_curve.png'),
      ('Precision at k', 'precision_at_k.png')]


def concept_map_at_r(query, database, num_concepts: int, *, R=None,
                     ties: str = 'index') -> dict:
  """mAP@R of each concept's sub-code alone and of each leave-one-out subset.

  Args:
    query, database: `encoding.encode_split` results ('codes', 'labels').
    num_concepts: M; concept m is bits [m K/M, (m+1) K/M).
    R, ties: as `evaluation.map_at_r`.

  Returns:
    {'alone': (M,) mAP@R of sub-code m only, 'without': (M,) mAP@R of every
    sub-code but m (None when M = 1), 'all': mAP@R of the whole code}.
  """
  q_codes, d_codes = np.asarray(query['codes']), np.asarray(database['codes'])
  width = q_codes.shape[1] // num_concepts

  def score(columns):
    return float(evaluation.map_at_r(
        q_codes[:, columns], query['labels'], d_codes[:, columns],
        database['labels'], R=R, ties=ties))

  bits = np.arange(q_codes.shape[1])
  concept_of = bits // width
  return {'alone': [score(bits[concept_of == m]) for m in range(num_concepts)],
          'without': ([score(bits[concept_of != m]) for m in range(num_concepts)]
                      if num_concepts > 1 else None),
          'all': score(bits)}


def _concepts(inp: _Inputs):
  """Which concepts carry the class: mAP@R per sub-code and leaving one out."""
  r, ties = evaluation.retrieval_cutoff(inp.config.eval), inp.config.eval.ties
  return {'concept_retrieval': concept_map_at_r(
      inp.test_enc, inp.train_enc, int(inp.config.model.num_concepts), R=r,
      ties=ties)}, []


def _attention_maps(inp: _Inputs, *, num_images):
  """Fig. 3, 6, 8: concept attention over a few test images."""
  enc = inp.test_enc
  shown = interpret.pick_display(enc['labels'][:len(enc['images'])],
                                 num_images)
  kp = enc.get('keypoints')
  figures.plot_attention_maps(
      inp.path('attention_maps.png'), enc['images'][shown],
      enc['concept_attn'][shown], enc['codes'][shown], enc['labels'][shown],
      inp.class_names, None if kp is None else kp[shown],
      part_names=inp.part_names)
  return {}, [('Concept attention maps (Fig. 3, 6, 8)', 'attention_maps.png')]


def _galleries(inp: _Inputs, *, per_group):
  """Fig. 3: test images by each concept's sub-code value."""
  enc = inp.test_enc
  pool = len(enc['images'])
  counts, written = {}, []
  for c in range(inp.config.model.num_concepts):
    name = f'gallery_concept{c}.png'
    counts[c] = figures.plot_gallery(
        inp.path(name), c, enc['images'], enc['concept_attn'][:pool],
        enc['codes'][:pool], per_group=per_group)
    written.append((f'Concept {c} by sub-code value (Fig. 3)', name))
  return {'subcode_counts': counts}, written


def _correlation(inp: _Inputs):
  """Fig. 7: concept attention correlation over the train split."""
  corr = interpret.correlation_summary(inp.train_enc['concept_attn'])
  figures.plot_correlation(
      inp.path('correlation.png'),
      {'cosine (L_csd)': corr['matrix'], 'Pearson': corr['pearson']},
      f'concept attention correlation, {inp.config.model.num_concepts} '
      f'concepts, {len(inp.train_enc["labels"])} train images')
  return {'correlation': corr}, [
      ('Concept attention correlation (Fig. 7)', 'correlation.png')]


def _localisation(inp: _Inputs, *, loc_method, loc_classes):
  """Table 3 and which part each concept is on (datasets with keypoints)."""
  if 'keypoints' not in inp.train_enc or 'keypoints' not in inp.test_enc:
    return {}, []
  if loc_classes == 'auto':
    loc_classes = (0, 1, 2) if inp.config.data.name == 'cub' else ()
  part_names = list(inp.part_names) or [
      f'part {p}' for p in range(inp.test_enc['keypoints'].shape[1])]
  loc = interpret.localisation(inp.train_enc, inp.test_enc,
                               image_size=inp.size, method=loc_method,
                               classes=tuple(loc_classes),
                               prefix=inp.config.data.name.upper())
  figures.plot_localisation(inp.path('localisation.png'),
                            part_names + ['mean'],
                            interpret.localisation_bars(loc))
  hits = interpret.part_hits(
      inp.test_enc['concept_attn'], inp.test_enc['keypoints'],
      inp.test_enc['labels'], image_size=inp.size, part_names=part_names,
      boxes=inp.test_enc.get('box'))
  figures.plot_part_hits(
      inp.path('part_hits.png'), hits['fraction'], hits['targets'],
      f'% of {hits["count"]} test images whose concept peak is on each '
      f'part; all concepts on different targets in '
      f'{100 * hits["distinct_rate"]:.0f}%')
  return {'localisation': loc, 'part_names': part_names, 'part_hits': hits}, [
      ('Part localisation error (Table 3)', 'localisation.png'),
      ('Which part each concept looks at', 'part_hits.png')]


def _centers(inp: _Inputs):
  """Fig. 5: family structure of the class centers and their t-SNE."""
  centers = encoding.class_centers(inp.model, inp.variables,
                                   inp.config.data.image_size).astype(np.float64)
  numbers = {'centers': interpret.family_similarity(centers, inp.family_of)}
  if len(centers) < 3:
    return numbers, []
  # Embed every class, plot the 10 largest families (as Fig. 5 does).
  top = interpret.top_families(inp.family_of, 10)
  emb = interpret.tsne_embed(centers, seed=inp.config.seed)
  figures.plot_tsne(inp.path('tsne_centers.png'), emb, inp.family_of,
                    inp.family_names, inp.class_names, list(top))
  return numbers, [('t-SNE of hash class centers (Fig. 5)',
                    'tsne_centers.png')]


def _encode(workdir, out_dir, *, checkpoint, data_root, max_images,
            num_display) -> _Inputs:
  """Restores the run and encodes both splits (test with display images)."""
  hasher = inference.ConceptHasher.load(workdir, which=checkpoint)
  config, model, variables = hasher.config, hasher.model, hasher.variables
  class_names = hasher.class_names
  if data_root is not None:
    config.data.root = data_root
  mesh = sharding.create_mesh()
  train_ds = data_lib.build(config.data, 'train')
  test_ds = data_lib.build(config.data, 'test')
  keep = ('codes', 'attention', 'boxes', 'keypoints')
  encode = functools.partial(encoding.encode_split, model, variables,
                             data_cfg=config.data, max_images=max_images,
                             mesh=mesh, cpu_matmul=hasher.cpu_matmul)
  family_of, family_names = data_core.families(train_ds)
  return _Inputs(
      config=config, model=model, variables=variables,
      class_names=class_names, train_enc=encode(train_ds, keep=keep),
      test_enc=encode(test_ds, keep=keep + ('images',),
                      num_images=num_display),
      part_names=test_ds.part_names,
      family_of=np.asarray(family_of, np.int64), family_names=family_names,
      out_dir=out_dir)


def _is_legacy_output(folder: str) -> bool:
  """An unmarked explain folder of ours: its report.md and explain.json."""
  return all(os.path.exists(os.path.join(folder, name))
             for name in ('report.md', 'explain.json'))


def explain(workdir: str, out_dir: Optional[str] = None, *,
            checkpoint: str = 'latest', data_root: Optional[str] = None,
            num_images: int = 8, per_group: int = 4, gallery_pool: int = 512,
            max_images: int = 0, loc_method: str = 'peak',
            loc_classes='auto') -> dict:
  """Writes every figure and the report of a trained run.

  Args:
    workdir: run directory written by `train.train_and_evaluate`.
    out_dir: output folder (default workdir/explain).
    checkpoint: 'latest' or 'best'.
    data_root: replaces config.data.root when given.
    num_images: test images in the attention figure.
    per_group: crops per sub-code value in the galleries.
    gallery_pool: first test images kept for figures.
    max_images: cap per split (0 = all), for quick looks.
    loc_method: 'peak' | 'centroid' for the headline localisation.
    loc_classes: 'auto' or an iterable of class ids scored separately.

  Returns:
    The summary dict also written to explain.json.
  """
  out_dir = out_dir or os.path.join(workdir, 'explain')
  safe_files.claim_folder(out_dir, 'explain', "explain's figures and report",
                          is_legacy=_is_legacy_output)
  inp = _encode(workdir, out_dir, checkpoint=checkpoint, data_root=data_root,
                max_images=max_images,
                num_display=max(gallery_pool, num_images))
  summary = _run_summary(workdir, inp)
  steps = [_retrieval, _concepts,
           functools.partial(_attention_maps, num_images=num_images),
           functools.partial(_galleries, per_group=per_group),
           _correlation,
           functools.partial(_localisation, loc_method=loc_method,
                             loc_classes=loc_classes),
           _centers]
  written = []
  for step in tqdm.tqdm(steps, desc='explain', leave=False):
    numbers, step_figures = step(inp)
    summary.update(numbers)
    written += step_figures
  report.write_report(os.path.join(out_dir, 'report.md'), summary, written)
  report.write_json(os.path.join(out_dir, 'explain.json'), summary)
  return summary


def _run_summary(workdir, inp: _Inputs) -> dict:
  """The run's identity: dataset, bits, concepts, checkpoint step, split sizes."""
  config = inp.config
  summary = {'workdir': workdir, 'dataset': config.data.name,
             'nbit': int(config.model.nbit),
             'num_concepts': int(config.model.num_concepts),
             'center_type': config.model.center_type, 'step': None,
             'num_train': len(inp.train_enc['labels']),
             'num_test': len(inp.test_enc['labels'])}
  results_path = os.path.join(workdir, run_files.RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as f:
      summary['step'] = json.load(f).get('step')
  return summary


def define_flags():
  """Command-line flags, defined only when run as a program."""
  cli.define_run_flags()
  flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/explain).')
  flags.DEFINE_integer('num_images', 8, 'Test images in attention_maps.png.')
  flags.DEFINE_integer('per_group', 4, 'Crops per sub-code value in a gallery.')
  flags.DEFINE_integer('gallery_pool', 512,
                       'Test images kept in memory to pick gallery crops from.')
  flags.DEFINE_integer('max_images', 0,
                       'Encode at most this many images per split (0 = all).')
  flags.DEFINE_enum('loc_method', 'peak', ['peak', 'centroid'],
                    'Concept location for the headline localisation error.')
  flags.DEFINE_string('loc_classes', 'auto',
                      "Comma-separated class ids scored separately as in "
                      "Table 3 "
                      "('auto': 0,1,2 = CUB-001..003 on CUB, none elsewhere).")
  flags.mark_flag_as_required('workdir')


def main(argv):
  """Entry point."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  classes = FLAGS.loc_classes
  if classes != 'auto':
    classes = [int(c) for c in classes.split(',') if c.strip()]
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'explain')
  summary = explain(FLAGS.workdir, out, checkpoint=FLAGS.checkpoint,
                    data_root=FLAGS.data_root, num_images=FLAGS.num_images,
                    per_group=FLAGS.per_group, gallery_pool=FLAGS.gallery_pool,
                    max_images=FLAGS.max_images, loc_method=FLAGS.loc_method,
                    loc_classes=classes)
  print(report.headline(summary))
  print('\n'.join(report.concept_table(summary)))
  print(f'Figures and report.md in {out}')
  logging.info('Wrote %s', out)


def run():
  """Console script `concepthash-explain`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
