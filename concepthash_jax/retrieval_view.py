""""See why" a search result matched: one self-contained HTML page and one PNG per query.

Rows: the query, then its top-k neighbours. Columns: the image, then one per
concept: that concept's last-layer attention drawn over the image, its sub-code
and whether it agrees with the query's sub-code (and by how many bits it
differs). A text query has no image or attention: its row shows the prompt and
its hash-center code instead. A concept query (weights) greys the concepts
its distance leaves out ("not counted") and names the weight of the others
when they are not all 1. The HTML inlines every image as a base64 PNG and
links nothing, so it opens from disk in any browser, offline. Both files are
written atomically; text is drawn literally (a "$" is not math).
"""
import base64
import dataclasses
import html
import io
import os
import textwrap
from typing import Optional, Sequence

import matplotlib
matplotlib.use('Agg')  # Files only; no display on servers.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from concepthash_jax import index as index_lib
from concepthash_jax import interpret
from concepthash_jax import safe_files

AGREE, DIFFER = '#1a7f37', '#cf222e'  # Green / red, readable on white.
LEFT_OUT = '#8c959f'  # Grey: a concept the query's distance does not count.


@dataclasses.dataclass
class Item:
  """One row: a query or a neighbour."""
  code: np.ndarray  # (K,) ±1 (or real; > 0 is bit 1).
  title: str  # Label / file name / prompt shown above the row.
  image: Optional[np.ndarray] = None  # (S, S, 3) uint8 model input.
  attn: Optional[np.ndarray] = None  # (M, HW) concept attention.
  text: Optional[str] = None  # The prompt of a text query.
  distance: Optional[int] = None  # Hamming distance to the query.


def overlays(image, attn) -> np.ndarray:
  """Each concept's attention as a jet heat map blended onto the image.

  Args:
    image: (S, S, 3) uint8.
    attn: (M, HW) attention over a square patch grid.

  Returns:
    (M, S, S, 3) uint8.
  """
  size = image.shape[:2]
  heat = interpret.normalise_for_display(interpret.upsample_attention(
      interpret.attention_grid(attn[None]), size))[0]  # (M, S, S)
  colour = plt.get_cmap('jet')(heat)[..., :3] * 255.0
  return np.round(0.5 * image[None] + 0.5 * colour).astype(np.uint8)


def subcodes(code, num_concepts: int) -> list:
  """Bit strings of the M sub-codes of one code."""
  bits = code.shape[-1] // num_concepts
  values = interpret.subcode_values(np.asarray(code)[None], num_concepts)[0]
  return [interpret.subcode_string(v, bits) for v in values]


def _rows(query: Item, neighbours: Sequence[Item], num_concepts: int):
  """Per row: (item, sub-code strings, per-concept distance to the query or None)."""
  codes = np.stack([n.code for n in neighbours]) if neighbours else None
  dist = (index_lib.concept_distances(query.code[None], codes, num_concepts)[0]
          if neighbours else [])
  rows = [(query, subcodes(query.code, num_concepts), None)]
  rows += [(n, subcodes(n.code, num_concepts), d)
           for n, d in zip(neighbours, dist)]
  return rows


def _caption(item: Item, is_query: bool) -> str:
  if is_query:
    return f'query: {item.title}'
  return f'd={item.distance}  {item.title}'


def _column_titles(num_concepts: int, weights) -> list:
  """'concept m', with its weight when a counted weight is not 1, or 'not counted'."""
  plain = weights is None or all(int(w) in (0, 1) for w in weights)
  titles = []
  for m in range(num_concepts):
    if weights is not None and int(weights[m]) == 0:
      titles.append(f'concept {m} (not counted)')
    elif plain:
      titles.append(f'concept {m}')
    else:
      titles.append(f'concept {m} (x{int(weights[m])})')
  return titles


def _counted(weights, m) -> bool:
  return weights is None or int(weights[m]) > 0


def _agreement(distance, counted: bool = True) -> tuple:
  """(text, colour) of one concept's sub-code comparison."""
  if not counted:
    return ('same' if distance == 0 else f'{distance} bit'
            f'{"s" if distance > 1 else ""} apart') + ', not counted', LEFT_OUT
  if distance == 0:
    return 'agrees', AGREE
  return f'differs ({distance} bit{"s" if distance > 1 else ""})', DIFFER


def write_png(path: str, query: Item, neighbours: Sequence[Item],
              num_concepts: int, *, weights=None):
  """The query and its neighbours, one row each, concept maps in columns."""
  with plt.rc_context({'text.parse_math': False}):
    _write_png(path, query, neighbours, num_concepts, weights)


def _write_png(path, query, neighbours, num_concepts, weights):
  rows = _rows(query, neighbours, num_concepts)
  titles = _column_titles(num_concepts, weights)
  cols = 1 + num_concepts
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.0 * len(rows)),
                           squeeze=False)
  for r, (item, subs, dist) in enumerate(rows):
    maps = (overlays(item.image, item.attn)
            if item.image is not None and item.attn is not None else None)
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        if item.image is not None:
          ax.imshow(item.image)
        else:
          ax.text(0.5, 0.5, '\n'.join(textwrap.wrap(item.text or item.title, 18)),
                  ha='center', va='center', fontsize=8, transform=ax.transAxes)
        ax.set_title('\n'.join(textwrap.wrap(_caption(item, r == 0), 30)[:2]),
                     fontsize=7)
        continue
      m = c - 1
      counted = _counted(weights, m)
      if maps is not None:
        ax.imshow(maps[m], alpha=1.0 if counted else 0.35)
      else:
        ax.text(0.5, 0.5, subs[m], ha='center', va='center', fontsize=12,
                family='monospace', transform=ax.transAxes,
                color='black' if counted else LEFT_OUT)
      if not counted:
        ax.set_facecolor('#eaeef2')
      if r == 0:
        ax.set_title(titles[m], fontsize=8,
                     color='black' if counted else LEFT_OUT)
        ax.set_xlabel(subs[m], fontsize=7, family='monospace')
      else:
        text, colour = _agreement(int(dist[m]), counted)
        ax.set_xlabel(f'{subs[m]} {text}', fontsize=7, color=colour,
                      family='monospace')
        for side in ax.spines.values():
          side.set_edgecolor(colour)
          side.set_linewidth(2)
  fig.tight_layout()
  try:
    with safe_files.atomic_write(path) as f:
      fig.savefig(f, dpi=90, format='png')
  finally:
    plt.close(fig)


def _png_data_uri(image) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """
body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}
td,th{border:1px solid #ddd;padding:4px;text-align:center;vertical-align:top}
img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:auto}
code{font-size:14px}.agree{color:%s}.differ{color:%s}.prompt{max-width:128px}
.left-out{color:%s;background:#eaeef2}.left-out img{opacity:.35}
""" % (AGREE, DIFFER, LEFT_OUT)


def write_html(path: str, query: Item, neighbours: Sequence[Item],
               num_concepts: int, *, heading: str = '', weights=None):
  """The same content as `write_png`, as one offline HTML page."""
  rows = _rows(query, neighbours, num_concepts)
  left_out = [' class="left-out"' if not _counted(weights, m) else ''
              for m in range(num_concepts)]
  head = ''.join(f'<th{left_out[m]}>{html.escape(title)}</th>' for m, title in
                 enumerate(_column_titles(num_concepts, weights)))
  body = []
  for r, (item, subs, dist) in enumerate(rows):
    maps = (overlays(item.image, item.attn)
            if item.image is not None and item.attn is not None else None)
    if item.image is not None:
      first = f'<img src="{_png_data_uri(item.image)}" alt="image">'
    else:
      first = f'<div class="prompt">&ldquo;{html.escape(item.text or "")}&rdquo;</div>'
    cells = [f'<td>{first}<div>{html.escape(_caption(item, r == 0))}</div></td>']
    for m in range(num_concepts):
      picture = (f'<img src="{_png_data_uri(maps[m])}" alt="concept {m}">'
                 if maps is not None else '')
      if dist is None:
        verdict = ''
      elif not _counted(weights, m):
        verdict = f'<div>{_agreement(int(dist[m]), False)[0]}</div>'
      else:
        text, _ = _agreement(int(dist[m]))
        verdict = (f'<div class="{"agree" if dist[m] == 0 else "differ"}">'
                   f'{text}</div>')
      cells.append(f'<td{left_out[m]}>{picture}<code>{subs[m]}</code>'
                   f'{verdict}</td>')
    body.append('<tr>' + ''.join(cells) + '</tr>')
  title = html.escape(heading or f'query: {query.title}')
  page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}'
          f'</title><style>{_STYLE}</style></head><body><h2>{title}</h2>'
          '<p>Each concept column shows where that concept looks (last-layer '
          'attention) and its sub-code; a neighbour\'s sub-code agrees with the '
          'query\'s or differs by the bits shown. The distance d is the '
          'sum over the counted concepts (times their weights).</p>'
          f'<table><tr><th>image</th>{head}</tr>{"".join(body)}</table>'
          '</body></html>')
  with safe_files.atomic_write(path, 'w') as f:
    f.write(page)


def write(out_dir: str, name: str, query: Item, neighbours: Sequence[Item],
          num_concepts: int, *, heading: str = '', weights=None) -> tuple:
  """Writes out_dir/name.html and out_dir/name.png; returns both paths.

  Args:
    out_dir: the pages folder (created; see safe_files.write_marker).
    name: file stem.
    query, neighbours: the rows.
    num_concepts: M.
    heading: the page's title.
    weights: (M,) concept weights of the query's distance; None = all 1.
  """
  safe_files.ensure_folder(out_dir, 'see-why pages')
  html_path = os.path.join(out_dir, name + '.html')
  png_path = os.path.join(out_dir, name + '.png')
  write_html(html_path, query, neighbours, num_concepts, heading=heading,
             weights=weights)
  write_png(png_path, query, neighbours, num_concepts, weights=weights)
  return html_path, png_path
