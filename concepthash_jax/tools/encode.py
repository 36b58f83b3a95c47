r"""Encodes a split with a trained run and reports its mAP@R against the database.

  concepthash-encode --workdir=runs/synthetic --split=test \
    --out=runs/synthetic/codes_test.npz

Writes OUT (codes ±1 int8, codes_cont, labels, index, concept_attn) and beside
it OUT with suffix `.chindex`, a searchable code index of the database (train
split, with the model's fingerprint for `concepthash-search --index`), and `.retrieval.json`, `.pr_curve.png`, `.precision_at_k.png`
(mAP@R, P@k and the precision-recall curve over Hamming radii). Prints mAP@R
of the split against the database beside the chance level of a random ranking
(docs/method.md §5.2).
"""
import os

from absl import flags
import numpy as np

from concepthash_jax import data as data_lib
from concepthash_jax import encoding
from concepthash_jax import evaluation
from concepthash_jax import index as index_lib
from concepthash_jax import inference
from concepthash_jax import safe_files
from concepthash_jax import sharding
from concepthash_jax.interpret import figures
from concepthash_jax.interpret import report
from concepthash_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags; only when run as a program, so that importing
  this module (tests, other tools) does not claim names like --workdir."""
  cli.define_run_flags()
  flags.DEFINE_enum('split', 'test', ['train', 'test'], 'Split to encode.')
  flags.DEFINE_string('out', None,
                      'Output .npz (default WORKDIR/codes_SPLIT.npz).')
  flags.mark_flag_as_required('workdir')

def encode_run(workdir: str, split: str, *, checkpoint: str = 'latest',
               data_root=None):
  """Encodes `split` and the database of a trained run.

  Args:
    workdir: run directory.
    split: 'train' or 'test'.
    checkpoint: 'latest' or 'best'.
    data_root: replaces config.data.root when given.

  Returns:
    (the ConceptHasher, codes of `split` (dict of numpy), codes of the
    database).
  """
  hasher = inference.ConceptHasher.load(workdir, which=checkpoint)
  config = hasher.config
  if data_root is not None:
    config.data.root = data_root
  mesh = sharding.create_mesh()

  def encode(name):
    return encoding.encode_split(
        hasher.model, hasher.variables, data_lib.build(config.data, name),
        config.data, keep=('codes', 'attention', 'keypoints'), mesh=mesh,
        cpu_matmul=hasher.cpu_matmul)

  database = encode('train')
  query = database if split == 'train' else encode(split)
  return hasher, query, database


def is_codes_file(path: str) -> bool:
  """Whether `path` is an .npz of codes this tool wrote (may be replaced)."""
  try:
    with np.load(path) as stored:
      return 'codes' in stored.files and 'labels' in stored.files
  except (OSError, ValueError, EOFError):
    return False


def main(argv):
  """Entry point; a user's mistake ends in one FATAL line (cli.run)."""
  del argv
  out = FLAGS.out or os.path.join(FLAGS.workdir, f'codes_{FLAGS.split}.npz')
  hasher, query, database = encode_run(
      FLAGS.workdir, FLAGS.split, checkpoint=FLAGS.checkpoint,
      data_root=FLAGS.data_root)
  safe_files.check_replaceable(out, 'codes file', is_ours=is_codes_file)
  safe_files.ensure_folder(os.path.dirname(os.path.abspath(out)), 'codes file')
  with safe_files.atomic_write(out) as f:
    np.savez_compressed(f, **query)
  index_path = os.path.splitext(out)[0] + '.chindex'
  index_lib.CodeIndex(
      database['codes'], database['labels'], ids=database['index'],
      info={'source': 'split', 'split': 'train', 'data_root': FLAGS.data_root,
            'class_names': hasher.class_names},
      num_concepts=hasher.num_concepts,
      fingerprint=hasher.fingerprint).save(index_path)
  config = hasher.config
  scores = evaluation.score(query, database, config.eval, curves=True)
  score, chance = scores['map_at_r'], scores['chance_map_at_r']
  # Retrieval curves beside the codes: OUT_STEM.retrieval.json + two plots.
  stem = os.path.splitext(out)[0] + '.'
  safe_files.write_json(stem + 'retrieval.json', report.jsonable(scores))
  curve_paths = figures.plot_retrieval_curves(
      stem, scores, f'{FLAGS.split} vs train database, {config.data.name}')
  print(f'{FLAGS.split}: {len(query["codes"])} codes of {query["codes"].shape[1]}'
        f' bits -> {out}\ndatabase index ({len(database["codes"])} codes) -> '
        f'{index_path}\nmAP@R {score:.4f} (chance {chance:.4f}, ties='
        f'{config.eval.ties})\nretrieval curves -> {stem}retrieval.json, '
        f'{", ".join(curve_paths)}')


def run():
  """Console script `concepthash-encode`."""
  cli.run(main, __doc__, define_flags)


if __name__ == '__main__':
  run()
