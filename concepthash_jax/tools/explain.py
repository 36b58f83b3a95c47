"""Explains a trained ConceptHash run: every qualitative result of the paper.

  python -m concepthash_jax.tools.explain --workdir runs/synthetic

Encodes the train (database) and test (query) splits with the run's final
checkpoint and writes into WORKDIR/explain (or --out):
  attention_maps.png       last-layer attention of each concept token over the
                           patches, one panel per concept (Fig. 3, 6, 8)
  gallery_concept<m>.png   test images grouped by concept m's sub-code value,
                           attended region cropped (Fig. 3; 2-bit sub-codes in
                           its quadrant layout)
  correlation.png          concept-attention correlation, train split (Fig. 7)
  localisation.png         part localisation error vs. baselines (Table 3)
  tsne_centers.png         t-SNE of the hash class centers by family (Fig. 5)
  report.md, explain.json  every number, with the figures
Numbers: class- and family-level mAP@R beside chance (Table 5), part
localisation error beside the image-centre and mean-location baselines, and the
within/between-family cosine of the class centers.
"""
import itertools
import json
import os
import textwrap
from typing import Optional

from absl import app
from absl import flags
from absl import logging
import jax
import matplotlib
matplotlib.use('Agg')  # Files only; no display on servers.
import matplotlib.lines  # pylint: disable=g-import-not-at-top
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image
import tqdm

from concepthash_jax import data as data_lib
from concepthash_jax import evaluation
from concepthash_jax import interpret
from concepthash_jax import sharding
from concepthash_jax import train
from concepthash_jax.data import core as data_core
from concepthash_jax.data import transforms

FLAGS = flags.FLAGS

CROP_SIDE = 48  # Pixels per gallery crop.


# ------------------------------------------------------------- encoding


def to_uint8(images):
  """Undoes the CLIP normalisation of (B, S, S, 3) model inputs for display."""
  if images.dtype == np.uint8:  # data.batches' pixels: nothing to undo.
    return images
  pixels = (np.asarray(images, np.float32) * np.array(transforms.CLIP_STD)
            + np.array(transforms.CLIP_MEAN))
  return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


def encode_split(model, variables, config, ds, *, max_images=0, keep_images=0,
                 mesh=None, desc=''):
  """Encodes a split with test transforms; keeps the first images for display.

  Returns:
    `train.encode_dataset`'s dict, plus 'images' uint8 (n, S, S, 3) of the
    first `keep_images` rows.
  """
  bs = config.data.eval_batch_size
  batches = data_lib.batches(ds, config.data, train=False, batch_size=bs,
                             seed=config.seed, epoch=0, drop_remainder=False)
  total = len(ds) if not max_images else min(len(ds), max_images)
  batches = itertools.islice(batches, -(-total // bs))
  kept, boxes = [], []

  def tee():
    count = 0
    for batch in tqdm.tqdm(batches, total=-(-total // bs), desc=desc,
                           leave=False):
      valid = batch['mask'].astype(bool)
      if count < keep_images:
        rows = batch['image'][valid][:keep_images - count]
        kept.append(to_uint8(rows))
        count += len(rows)
      if 'box' in batch:
        boxes.append(batch['box'][valid])
      yield batch
  out = train.encode_dataset(model, variables, tee(), mesh=mesh)
  # Object boxes (Table 3's normalisation) in encode order; this host saw
  # every row only when running as one process, so check before using them.
  if boxes and 'box' not in out:
    boxes = np.concatenate(boxes)
    if len(boxes) == len(out['labels']):
      out['box'] = boxes
  out = {k: v[:total] for k, v in out.items()}
  size = config.data.image_size
  out['images'] = (np.concatenate(kept) if kept
                   else np.zeros((0, size, size, 3), np.uint8))
  return out


# -------------------------------------------------------------- figures


def _concept_columns(num_concepts, nbit):
  """Column titles: concept m and the bits of its sub-code."""
  bits = nbit // num_concepts
  return [f'concept {m}\nbits {m * bits}-{(m + 1) * bits - 1}'
          for m in range(num_concepts)]


def plot_attention_maps(path, images, concept_attn, codes, labels, class_names,
                        keypoints=None, part_names=()):
  """Fig. 3/6/8: each image, then its M concept maps overlaid, peaks marked."""
  n, m = concept_attn.shape[:2]
  size = images.shape[1:3]
  grid = interpret.attention_grid(concept_attn)
  heat = interpret.normalise_for_display(
      interpret.upsample_attention(grid, size))
  peaks = interpret.attention_locations(concept_attn, size, method='peak')
  sub = interpret.subcode_values(codes, m)
  bits = codes.shape[1] // m
  fig, axes = plt.subplots(n, m + 1, figsize=(2 * (m + 1), 2.1 * n),
                           squeeze=False)
  titles = ['image'] + _concept_columns(m, codes.shape[1])
  if keypoints is not None:  # One colour per part, named in a legend.
    colours = plt.get_cmap('tab10')(np.arange(keypoints.shape[1]) % 10)
    part_names = list(part_names) or [f'part {p}'
                                      for p in range(keypoints.shape[1])]
    fig.legend(handles=[matplotlib.lines.Line2D(
        [], [], marker='o', ls='', color=c, label=name)
                        for c, name in zip(colours, part_names)],
               loc='lower center', ncol=min(len(part_names), 8), fontsize=7,
               title='ground-truth keypoints', title_fontsize=7)
  for i in range(n):
    for j in range(m + 1):
      ax = axes[i, j]
      ax.imshow(images[i])
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(titles[j], fontsize=8)
      if j == 0:
        ax.set_ylabel(textwrap.fill(class_names[int(labels[i])], 24),
                      fontsize=7)
        if keypoints is not None:
          vis = interpret.visible_mask(keypoints[i:i + 1], size)[0]
          ax.scatter(keypoints[i, vis, 0], keypoints[i, vis, 1], s=12,
                     color=colours[vis], edgecolors='w', linewidths=0.5)
        continue
      ax.imshow(heat[i, j - 1], cmap='jet', alpha=0.5, vmin=0, vmax=1)
      ax.plot(*peaks[i, j - 1], marker='+', color='w', markersize=10, mew=2)
      ax.set_xlabel(f'sub-code {interpret.subcode_string(sub[i, j - 1], bits)}',
                    fontsize=7)
  legend_in = 0.7 if keypoints is not None else 0.0  # Inches kept for it.
  fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _tile(crops, side, slots):
  """Tiles crops (h, w, 3) into a square grid of `slots` cells, white when empty.

  Every group gets the same grid, so one crop is drawn as small as four.
  """
  cols = max(1, int(np.ceil(np.sqrt(slots))))
  rows = -(-slots // cols)
  canvas = np.full((rows * side, cols * side, 3), 255, np.uint8)
  for k, crop in enumerate(crops):
    r, c = divmod(k, cols)
    img = Image.fromarray(crop).resize((side, side), Image.BILINEAR)
    canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.asarray(img)
  return canvas


def plot_gallery(path, concept, images, concept_attn, codes, *, per_group):
  """Fig. 3: images grouped by one concept's sub-code value, hot region cropped.

  Returns:
    {bit string: number of images} over the images given.
  """
  m = concept_attn.shape[1]
  bits = codes.shape[1] // m
  values = interpret.subcode_values(codes, m)[:, concept]
  strength = concept_attn[:, concept].max(-1)
  if bits <= 4:  # Gray layout, Fig. 3's quadrants for 2 bits.
    rows, cols, cells = interpret.subcode_layout(bits)
    groups = interpret.gallery_groups(values, strength, per_group=per_group,
                                      max_groups=2 ** bits)
  else:  # Too many values for a map: the 16 most frequent, by frequency.
    groups = interpret.gallery_groups(values, strength, per_group=per_group,
                                      max_groups=16)
    rows, cols = 4, 4
    cells = {v: divmod(k, cols) for k, v in enumerate(groups)}
  counts = {interpret.subcode_string(v, bits): int(np.sum(values == v))
            for v in np.unique(values)}
  size = images.shape[1:3]
  grid = interpret.attention_grid(concept_attn[:, concept:concept + 1])
  fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows),
                           squeeze=False)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  for value, (r, c) in cells.items():
    ax = axes[r, c]
    label = interpret.subcode_string(value, bits)
    idx = groups.get(value, np.zeros(0, int))
    ax.set_title(f'{label} ({counts.get(label, 0)} img)', fontsize=8)
    if not len(idx):
      ax.text(0.5, 0.5, 'no images', ha='center', va='center',
              transform=ax.transAxes, fontsize=8, color='grey')
      for spine in ax.spines.values():
        spine.set_visible(False)
      continue
    heat = interpret.upsample_attention(grid[idx], size)[:, 0]
    crops = []
    for k, i in enumerate(idx):
      x0, y0, x1, y1 = interpret.crop_box(heat[k], min_size=size[0] // 4)
      crops.append(images[i, y0:y1, x0:x1])
    ax.imshow(_tile(crops, CROP_SIDE, per_group))
  fig.suptitle(f'concept {concept}: images by sub-code value', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return counts


def plot_correlation(path, panels, title):
  """Fig. 7: M x M attention correlations side by side, values in the cells.

  Args:
    path: PNG to write.
    panels: {panel title: (M, M) matrix}; a title containing 'cosine' is
      drawn on [0, 1] (attention is non-negative), others on [-1, 1].
    title: figure title.
  """
  m = len(next(iter(panels.values())))
  side = 1.0 + 0.7 * m
  fig, axes = plt.subplots(1, len(panels), squeeze=False,
                           figsize=((side + 0.6) * len(panels), side + 0.6))
  for ax, (name, corr) in zip(axes[0], panels.items()):
    low = 0.0 if 'cosine' in name else -1.0
    im = ax.imshow(corr, vmin=low, vmax=1, cmap='viridis')
    for i in range(m):
      for j in range(m):
        light = (corr[i, j] - low) / (1 - low) < 0.6
        ax.text(j, i, f'{corr[i, j]:.2f}', ha='center', va='center',
                fontsize=8 if m <= 8 else 6, color='w' if light else 'k')
    ax.set_xticks(range(m))
    ax.set_yticks(range(m))
    ax.set_xlabel('concept')
    ax.set_ylabel('concept')
    ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_localisation(path, part_names, rows):
  """Table 3 as bars: error per part for each method and baseline."""
  fig, ax = plt.subplots(figsize=(2 + 1.2 * len(part_names), 3.2))
  width = 0.8 / len(rows)
  for k, (name, values) in enumerate(rows.items()):
    ax.bar(np.arange(len(part_names)) + k * width, values, width, label=name)
  ax.set_xticks(np.arange(len(part_names)) + 0.4 - width / 2)
  ax.set_xticklabels(part_names, fontsize=8)
  ax.set_ylabel('normalised L2 error (%)')
  ax.set_title('part localisation error (lower is better)', fontsize=9,
               pad=22)
  # Above the bars, not over them.
  ax.legend(fontsize=7, loc='lower center', bbox_to_anchor=(0.5, 1.0),
            ncol=len(rows), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_part_hits(path, fraction, target_names, title):
  """Concept x part heat map: share of images whose concept peak is on each part."""
  m, t = fraction.shape
  fig, ax = plt.subplots(figsize=(1.6 + 0.85 * t, 1.0 + 0.5 * m))
  ax.imshow(fraction, cmap='Blues', vmin=0, vmax=1, aspect='auto')
  for i in range(m):
    for j in range(t):
      ax.text(j, i, f'{100 * fraction[i, j]:.0f}', ha='center', va='center',
              fontsize=7, color='white' if fraction[i, j] > 0.5 else 'black')
  ax.set_xticks(range(t))
  ax.set_xticklabels(target_names, fontsize=8)
  ax.set_yticks(range(m))
  ax.set_yticklabels([f'concept {i}' for i in range(m)], fontsize=8)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_tsne(path, embedding, family_of, family_names, class_names, shown):
  """Fig. 5: t-SNE of class centers, one colour per family."""
  fig, ax = plt.subplots(figsize=(7.5, 5))
  cmap = plt.get_cmap('tab10' if len(shown) <= 10 else 'tab20')
  for k, fam in enumerate(shown):
    idx = np.nonzero(np.asarray(family_of) == fam)[0]
    ax.scatter(embedding[idx, 0], embedding[idx, 1], color=cmap(k % cmap.N),
               label=family_names[fam], s=40)
    if np.isin(family_of, shown).sum() <= 40:  # Legible for few classes.
      for i in idx:
        ax.annotate(class_names[i], embedding[i], xytext=(4, 3),
                    textcoords='offset points', fontsize=6)
  ax.set_xticks([])
  ax.set_yticks([])
  # Outside the axes: inside, it hides points and their names.
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1),
            title='family', title_fontsize=8)
  ax.margins(0.15)  # Room for the names of the outermost points.
  ax.set_title('t-SNE of hash class centers', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# -------------------------------------------------------------- analysis


def class_centers(model, variables, image_size):
  """o_c (C, K) of the trained run (read from one forward; independent of it)."""
  pixels = np.zeros((1, *image_size, 3), np.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[1])
  return np.asarray(jax.device_get(forward(variables, pixels)['class_centers']),
                    np.float64)


def pick_display(labels, n):
  """Up to n test rows, one per class first, so the panel shows variety."""
  labels = np.asarray(labels)
  _, first = np.unique(labels, return_index=True)
  rest = np.setdiff1d(np.arange(len(labels)), first)
  return np.concatenate([np.sort(first), rest])[:n]


def localisation(train_enc, test_enc, *, image_size, method, classes=(),
                 prefix='class'):
  """Table 3: every protocol and location method, pooled and per class.

  Per-class subsets are named like the paper's CUB-001 (1-based class id).
  Coordinates are normalised by the object boxes when both splits have them.
  """
  use_boxes = 'box' in train_enc and 'box' in test_enc

  def fit_boxes(rows):
    return train_enc['box'][rows] if use_boxes else None

  def eval_boxes(rows):
    return test_enc['box'][rows] if use_boxes else None

  def run(fit_rows, eval_rows):
    out = {}
    for loc_method in ('peak', 'centroid'):
      fit_loc = interpret.attention_locations(
          train_enc['concept_attn'][fit_rows], image_size, method=loc_method)
      eval_loc = interpret.attention_locations(
          test_enc['concept_attn'][eval_rows], image_size, method=loc_method)
      for protocol in ('regression', 'best_concept'):
        out[f'{protocol}/{loc_method}'] = interpret.part_localisation(
            fit_loc, train_enc['keypoints'][fit_rows], eval_loc,
            test_enc['keypoints'][eval_rows], image_size=image_size,
            fit_boxes=fit_boxes(fit_rows), eval_boxes=eval_boxes(eval_rows),
            protocol=protocol)
    out['headline'] = f'regression/{method}'
    out['normalised_by'] = 'object box' if use_boxes else 'image'
    return out
  results = {'all': run(slice(None), slice(None))}
  for c in classes:
    fit_rows = train_enc['labels'] == c
    eval_rows = test_enc['labels'] == c
    if fit_rows.sum() >= 3 and eval_rows.sum():
      results[f'{prefix}-{c + 1:03d}'] = run(fit_rows, eval_rows)
  return results


def _fmt(x, digits=2):
  return 'n/a' if x is None or not np.isfinite(x) else f'{x:.{digits}f}'


LOC_COLUMNS = ('regression/peak', 'regression/centroid', 'best_concept/peak')


def _localisation_table(subset, res, part_names):
  """Markdown rows of one Table 3 subset: methods, baselines, counts."""
  head = res[res['headline']]
  assignment = res['best_concept/peak']['assignment']
  lines = [f'### {subset} (headline: {res["headline"]}, normalised by '
           f'{res["normalised_by"]})', '',
           '| part | ' + ' | '.join(LOC_COLUMNS) + ' (concept) | '
           'centre baseline | mean baseline | n |', '|---' * 7 + '|']
  for p, name in enumerate(part_names):
    cells = [_fmt(res[k]['per_part'][p]) for k in LOC_COLUMNS]
    cells[-1] += f' ({assignment[p]})'
    cells += [_fmt(head['centre_baseline_per_part'][p]),
              _fmt(head['mean_baseline_per_part'][p]), str(head['count'][p])]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  cells = [_fmt(res[k]['mean']) for k in LOC_COLUMNS]
  cells += [_fmt(head['centre_baseline']), _fmt(head['mean_baseline']),
            str(int(np.sum(head['count'])))]
  lines += ['| **mean** | ' + ' | '.join(cells) + ' |', '']
  return lines


def write_report(path, summary, figures):
  """report.md: the numbers as tables and the figures inline."""
  lines = [f'# ConceptHash explained: `{summary["workdir"]}`', '',
           f'{summary["dataset"]}, {summary["nbit"]} bits, '
           f'M = {summary["num_concepts"]} concepts of '
           f'{summary["nbit"] // summary["num_concepts"]} bits, checkpoint '
           f'step '
           f'{summary["step"]}; {summary["num_train"]} train (database) / '
           f'{summary["num_test"]} test (query) images.', '',
           '## Retrieval (Table 5: family level)', '',
           '| labels | mAP@R | chance |', '|---|---|---|']
  ret = summary['retrieval']
  lines.append(f'| class | {ret["class_map_at_r"]:.4f} | '
               f'{ret["class_chance"]:.4f} |')
  if 'family_map_at_r' in ret:
    lines.append(f'| family ({ret["num_families"]}) | '
                 f'{ret["family_map_at_r"]:.4f} | {ret["family_chance"]:.4f} |')
  loc = summary.get('localisation')
  if loc:
    lines += ['', '## Part localisation (Table 3)', '',
              'Normalised L2 error in % (per axis by the object box, as [27], '
              'or by the model input when the data has no boxes; lower is '
              'better). '
              '*regression*: the protocol of Huang & Li 2020 ([27] of the '
              'paper): a linear map from all concept locations to each part, '
              'fit on the train split, scored on the test split. '
              '*best concept*: the part is predicted directly by the location '
              'of the single concept that localises it best on the train '
              'split. *peak*: arg-max patch; *centroid*: attention-weighted '
              'mean. Baselines: always the image centre; always the mean '
              'train location of the part.', '']
    for subset, res in loc.items():
      lines += _localisation_table(subset, res, summary['part_names'])
  hits = summary.get('part_hits')
  if hits:
    lines += ['## Which part each concept looks at', '',
              f'Each concept\'s attention peak on the {hits["count"]} test '
              f'images, assigned to the nearest visible part keypoint, or to '
              f'the background when outside the object box. All concepts on '
              f'different targets in {100 * hits["distinct_rate"]:.1f}% of '
              f'the images; {hits["mean_distinct_parts"]:.2f} different parts '
              f'per image on average. *same target*: share of images on the '
              f'concept\'s most common target; *within class*: the same per '
              f'class (much higher than *same target* means the part a '
              f'concept finds depends on the class, i.e. it follows an '
              f'appearance cue rather than a fixed part).', '',
              '| concept | ' + ' | '.join(hits['targets'])
              + ' | same target | within class |',
              '|---' * (len(hits['targets']) + 3) + '|']
    for c, row in enumerate(hits['fraction']):
      lines.append(f'| {c} | ' + ' | '.join(f'{100 * v:.0f}%' for v in row)
                   + f' | {100 * hits["consistency"][c]:.0f}% | '
                   f'{100 * hits["consistency_within_class"][c]:.0f}% |')
    lines.append('')
  corr = summary['correlation']
  lines += ['## Concept attention correlation (Fig. 7)', '',
            f'Cosine similarity of the concepts\' last-layer attention maps '
            f'(the quantity L_csd penalises), averaged over the '
            f'{summary["num_train"]} train images: mean off-diagonal '
            f'{_fmt(corr["mean_off_diagonal"], 3)} (1 = all concepts look at '
            f'the same patches); Pearson correlation of the centred maps, '
            f'mean off-diagonal {_fmt(corr.get("pearson_mean_off_diagonal"), 3)}'
            f' (near-uniform maps have a cosine near 1 even when their peaks '
            f'differ; centring removes that shared floor).', '']
  cen = summary.get('centers')
  if cen:
    lines += ['## Hash class centers (Fig. 5)', '',
              f'Mean cosine between class centers of the same family '
              f'{_fmt(cen["within"], 3)}, of different families '
              f'{_fmt(cen["between"], 3)} (center type '
              f'`{summary["center_type"]}`).', '']
  lines += ['## Figures', '']
  for title, name in figures:
    lines += [f'### {title}', '', f'![{title}]({name})', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def _jsonable(obj):
  """numpy -> lists/floats for explain.json."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


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
  os.makedirs(out_dir, exist_ok=True)
  config, model, variables, class_names = train.restore_for_inference(
      workdir, which=checkpoint)
  if data_root is not None:
    config.data.root = data_root
  mesh = sharding.create_mesh()
  train_ds = data_lib.build(config.data, 'train')
  test_ds = data_lib.build(config.data, 'test')
  train_enc = encode_split(model, variables, config, train_ds,
                           max_images=max_images, mesh=mesh,
                           desc='encode train')
  test_enc = encode_split(model, variables, config, test_ds,
                          max_images=max_images, mesh=mesh,
                          keep_images=max(gallery_pool, num_images),
                          desc='encode test')
  m = int(config.model.num_concepts)
  nbit = int(config.model.nbit)
  size = (config.data.image_size, config.data.image_size)
  summary = {'workdir': workdir, 'dataset': config.data.name, 'nbit': nbit,
             'num_concepts': m, 'center_type': config.model.center_type,
             'step': None, 'num_train': len(train_enc['labels']),
             'num_test': len(test_enc['labels'])}
  results_path = os.path.join(workdir, train.RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as f:
      summary['step'] = json.load(f).get('step')
  figures = []
  steps = tqdm.tqdm(total=6, desc='explain', leave=False)

  # Retrieval at class and family level (Table 5).
  r = None if config.eval.R < 0 else int(config.eval.R)
  ret = {'class_map_at_r': float(evaluation.map_at_r(
      test_enc['codes'], test_enc['labels'], train_enc['codes'],
      train_enc['labels'], R=r, ties=config.eval.ties)),
         'class_chance': train.chance_map_at_r(test_enc['labels'],
                                               train_enc['labels'])}
  family_of, family_names = train_ds.family_of, train_ds.family_names
  if family_of is None:  # CUB-style rule: the family is the name's last word.
    family_of, family_names = data_core.family_by_word(class_names, 'last')
  family_of = np.asarray(family_of, np.int64)
  if len(family_names) < len(class_names):
    ret['num_families'] = len(family_names)
    ret['family_map_at_r'] = interpret.family_map_at_r(
        test_enc['codes'], test_enc['labels'], train_enc['codes'],
        train_enc['labels'], family_of, R=r, ties=config.eval.ties)
    ret['family_chance'] = train.chance_map_at_r(
        interpret.to_family_labels(test_enc['labels'], family_of),
        interpret.to_family_labels(train_enc['labels'], family_of))
  summary['retrieval'] = ret
  steps.update()

  # Attention maps (Fig. 3, 6, 8).
  shown = pick_display(test_enc['labels'][:len(test_enc['images'])],
                       num_images)
  kp = test_enc.get('keypoints')
  plot_attention_maps(os.path.join(out_dir, 'attention_maps.png'),
                      test_enc['images'][shown],
                      test_enc['concept_attn'][shown],
                      test_enc['codes'][shown], test_enc['labels'][shown],
                      class_names, None if kp is None else kp[shown],
                      part_names=test_ds.part_names)
  figures.append(('Concept attention maps (Fig. 3, 6, 8)',
                  'attention_maps.png'))
  steps.update()

  # Galleries by sub-code value (Fig. 3).
  pool = len(test_enc['images'])
  summary['subcode_counts'] = {}
  for c in range(m):
    name = f'gallery_concept{c}.png'
    summary['subcode_counts'][c] = plot_gallery(
        os.path.join(out_dir, name), c, test_enc['images'],
        test_enc['concept_attn'][:pool], test_enc['codes'][:pool],
        per_group=per_group)
    figures.append((f'Concept {c} by sub-code value (Fig. 3)', name))
  steps.update()

  # Correlation of concept attention over the train split (Fig. 7).
  # Cosine is what L_csd penalises; on near-uniform maps (a random backbone)
  # it is close to 1 however the peaks differ, so Pearson (maps centred
  # first) is shown beside it.
  corr = interpret.concept_correlation(train_enc['concept_attn'])
  pearson = interpret.concept_correlation(train_enc['concept_attn'],
                                          method='pearson')
  off_diag = ~np.eye(m, dtype=bool)

  def off_mean(matrix):
    return float(matrix[off_diag].mean()) if m > 1 else float('nan')
  summary['correlation'] = {'matrix': corr, 'mean_off_diagonal': off_mean(corr),
                            'pearson': pearson,
                            'pearson_mean_off_diagonal': off_mean(pearson)}
  plot_correlation(os.path.join(out_dir, 'correlation.png'),
                   {'cosine (L_csd)': corr, 'Pearson': pearson},
                   f'concept attention correlation, {m} concepts, '
                   f'{len(train_enc["labels"])} train images')
  figures.append(('Concept attention correlation (Fig. 7)', 'correlation.png'))
  steps.update()

  # Part localisation (Table 3).
  if 'keypoints' in train_enc and 'keypoints' in test_enc:
    if loc_classes == 'auto':
      loc_classes = (0, 1, 2) if config.data.name == 'cub' else ()
    part_names = list(test_ds.part_names) or [
        f'part {p}' for p in range(test_enc['keypoints'].shape[1])]
    loc = localisation(train_enc, test_enc, image_size=size,
                       method=loc_method, classes=tuple(loc_classes),
                       prefix=config.data.name.upper())
    summary['localisation'] = loc
    summary['part_names'] = part_names
    head = loc['all'][loc['all']['headline']]
    plot_localisation(
        os.path.join(out_dir, 'localisation.png'), part_names + ['mean'],
        {f'ours ({loc["all"]["headline"]})':
             list(head['per_part']) + [head['mean']],
         'best concept/peak': list(loc['all']['best_concept/peak']['per_part'])
                              + [loc['all']['best_concept/peak']['mean']],
         'image centre': list(head['centre_baseline_per_part'])
                         + [head['centre_baseline']],
         'mean location': list(head['mean_baseline_per_part'])
                          + [head['mean_baseline']]})
    figures.append(('Part localisation error (Table 3)', 'localisation.png'))
    # Which part each concept is on (peak: a centroid of a background map
    # lands mid-image, i.e. on the object).
    hits = interpret.concept_part_hits(
        interpret.attention_locations(test_enc['concept_attn'], size),
        test_enc['keypoints'], image_size=size, boxes=test_enc.get('box'))
    part_hits = interpret.part_hit_summary(hits, test_enc['labels'],
                                           len(part_names))
    part_hits['targets'] = part_names + ['background']
    summary['part_hits'] = part_hits
    plot_part_hits(
        os.path.join(out_dir, 'part_hits.png'), part_hits['fraction'],
        part_hits['targets'],
        f'% of {part_hits["count"]} test images whose concept peak is on each '
        f'part; all concepts on different targets in '
        f'{100 * part_hits["distinct_rate"]:.0f}%')
    figures.append(('Which part each concept looks at', 'part_hits.png'))
  steps.update()

  # Class centers: t-SNE and family structure (Fig. 5).
  centers = class_centers(model, variables, size)
  summary['centers'] = interpret.family_similarity(centers, family_of)
  if len(centers) >= 3:
    # Embed every class, plot the 10 largest families (as Fig. 5 does).
    top = interpret.top_families(family_of, 10)
    emb = interpret.tsne_embed(centers, seed=config.seed)
    plot_tsne(os.path.join(out_dir, 'tsne_centers.png'), emb, family_of,
              family_names, class_names, list(top))
    figures.append(('t-SNE of hash class centers (Fig. 5)',
                    'tsne_centers.png'))
  steps.update()
  steps.close()

  write_report(os.path.join(out_dir, 'report.md'), summary, figures)
  with open(os.path.join(out_dir, 'explain.json'), 'w') as f:
    json.dump(_jsonable(summary), f, indent=1)
  return summary


def headline(summary) -> str:
  """The few numbers the issue asks to see, one line each."""
  ret = summary['retrieval']
  lines = [f'class  mAP@R {ret["class_map_at_r"]:.4f} (chance '
           f'{ret["class_chance"]:.4f})']
  if 'family_map_at_r' in ret:
    lines.append(f'family mAP@R {ret["family_map_at_r"]:.4f} (chance '
                 f'{ret["family_chance"]:.4f})')
  for subset, res in summary.get('localisation', {}).items():
    head = res[res['headline']]
    lines.append(f'localisation [{subset}, {res["headline"]}] '
                 f'{head["mean"]:.2f}% (image centre '
                 f'{head["centre_baseline"]:.2f}%'
                 f', mean location {head["mean_baseline"]:.2f}%)')
  hits = summary.get('part_hits')
  if hits:
    lines.append(f'concepts on different parts/background in '
                 f'{100 * hits["distinct_rate"]:.1f}% of test images '
                 f'({hits["mean_distinct_parts"]:.2f} parts per image)')
  corr = summary['correlation']
  lines.append('attention correlation, mean off-diagonal: cosine '
               f'{_fmt(corr["mean_off_diagonal"], 3)}, Pearson '
               f'{_fmt(corr.get("pearson_mean_off_diagonal"), 3)}')
  return '\n'.join(lines)


def define_flags():
  """Command-line flags, defined only when run as a program."""
  flags.DEFINE_string('workdir', None, 'Run directory written by launch.py.')
  flags.DEFINE_string('out', None, 'Output folder (default WORKDIR/explain).')
  flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                    'Which checkpoint: the final one or the best by mAP@R.')
  flags.DEFINE_string('data_root', None,
                      'Override config.data.root (dataset moved since '
                      'training).')
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
  print(headline(summary))
  print(f'Figures and report.md in {out}')
  logging.info('Wrote %s', out)


if __name__ == '__main__':
  define_flags()
  app.run(main)
