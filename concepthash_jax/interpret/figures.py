"""Figures of a trained run: attention maps, galleries, correlations, localisation, retrieval curves.

Each `plot_*` takes arrays (from `encoding.encode_split` and `interpret`) and
writes one PNG; nothing here computes an analysis. Used by tools/explain.py
and tools/encode.py.
"""
import textwrap

import matplotlib
matplotlib.use('Agg')  # Files only; no display on servers.
import matplotlib.lines  # pylint: disable=g-import-not-at-top
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from concepthash_jax import interpret
from concepthash_jax import safe_files

CROP_SIDE = 48  # Pixels per gallery crop.


def _save(fig, path):
  """Lays out, writes and closes a figure."""
  fig.tight_layout()
  safe_files.save_figure(fig, path, dpi=100)
  plt.close(fig)


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
  safe_files.save_figure(fig, path, dpi=100)
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
  _save(fig, path)
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
  _save(fig, path)


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
  _save(fig, path)


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
  _save(fig, path)


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
  _save(fig, path)


def _plot_curve(path, x, y, *, xlabel, ylabel, title, log_x=False,
                point_labels=None):
  """One retrieval curve on a [0, 1] y axis; optional labels on some points."""
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  ax.plot(x, y, marker='o', markersize=3)
  for i, text in (point_labels or {}).items():
    ax.annotate(text, (x[i], y[i]), xytext=(3, 3), textcoords='offset points',
                fontsize=6)
  if log_x:
    ax.set_xscale('log')
  else:
    ax.set_xlim(0, 1.02)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, which='both')
  _save(fig, path)


def plot_pr_curve(path, pr_precision, pr_recall, title):
  """Precision against recall of Hamming-radius retrieval, radii 0..K marked."""
  step = max(1, len(pr_recall) // 8)
  _plot_curve(path, pr_recall, pr_precision, xlabel='recall',
              ylabel='precision',
              title=f'{title}\n(numbers: Hamming radius)',
              point_labels={r: str(r) for r in range(0, len(pr_recall), step)})


def plot_precision_at_k(path, ks, precision, title):
  """P@k against k (log axis): how precise the top of the ranking is."""
  _plot_curve(path, ks, precision, xlabel='k (retrieved items)',
              ylabel='precision at k', title=title, log_x=True)


def plot_retrieval_curves(prefix, scores, title):
  """PREFIXpr_curve.png and PREFIXprecision_at_k.png from `evaluation.score(..., curves=True)`.

  Returns:
    The two paths written.
  """
  paths = (f'{prefix}pr_curve.png', f'{prefix}precision_at_k.png')
  plot_pr_curve(paths[0], scores['pr_precision'], scores['pr_recall'], title)
  plot_precision_at_k(paths[1], scores['precision_at_k']['k'],
                      scores['precision_at_k']['precision'], title)
  return paths
