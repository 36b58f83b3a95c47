""""See why" a search result matched: one self-contained HTML page and one PNG per query.

Rows: the query, then its top-k neighbours. Columns: the image, then one per
concept: that concept's last-layer attention drawn over the image, its sub-code
and whether it agrees with the query's sub-code (and by how many bits it
differs). A text query has no image or attention: its row shows the prompt and
its hash-center code instead. The HTML inlines every image as a base64 PNG and
links nothing, so it opens from disk in any browser, offline.
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

AGREE, DIFFER = '#1a7f37', '#cf222e'  # Green / red, readable on white.


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


def _subcodes(code, num_concepts: int) -> list:
  """Bit strings of the M sub-codes of one code."""
  bits = code.shape[-1] // num_concepts
  values = interpret.subcode_values(np.asarray(code)[None], num_concepts)[0]
  return [interpret.subcode_string(v, bits) for v in values]


def _rows(query: Item, neighbours: Sequence[Item], num_concepts: int):
  """Per row: (item, sub-code strings, per-concept distance to the query or None)."""
  codes = np.stack([n.code for n in neighbours]) if neighbours else None
  dist = (index_lib.concept_distances(query.code[None], codes, num_concepts)[0]
          if neighbours else [])
  rows = [(query, _subcodes(query.code, num_concepts), None)]
  rows += [(n, _subcodes(n.code, num_concepts), d)
           for n, d in zip(neighbours, dist)]
  return rows


def _caption(item: Item, is_query: bool) -> str:
  if is_query:
    return f'query: {item.title}'
  return f'd={item.distance}  {item.title}'


def _agreement(distance) -> tuple:
  """(text, colour) of one concept's sub-code comparison."""
  if distance == 0:
    return 'agrees', AGREE
  return f'differs ({distance} bit{"s" if distance > 1 else ""})', DIFFER


def write_png(path: str, query: Item, neighbours: Sequence[Item],
              num_concepts: int):
  """The query and its neighbours, one row each, concept maps in columns."""
  rows = _rows(query, neighbours, num_concepts)
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
      if maps is not None:
        ax.imshow(maps[m])
      else:
        ax.text(0.5, 0.5, subs[m], ha='center', va='center', fontsize=12,
                family='monospace', transform=ax.transAxes)
      if r == 0:
        ax.set_title(f'concept {m}', fontsize=8)
        ax.set_xlabel(subs[m], fontsize=7, family='monospace')
      else:
        text, colour = _agreement(int(dist[m]))
        ax.set_xlabel(f'{subs[m]} {text}', fontsize=7, color=colour,
                      family='monospace')
        for side in ax.spines.values():
          side.set_edgecolor(colour)
          side.set_linewidth(2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
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
""" % (AGREE, DIFFER)


def write_html(path: str, query: Item, neighbours: Sequence[Item],
               num_concepts: int, *, heading: str = ''):
  """The same content as `write_png`, as one offline HTML page."""
  rows = _rows(query, neighbours, num_concepts)
  head = ''.join(f'<th>concept {m}</th>' for m in range(num_concepts))
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
      else:
        text, _ = _agreement(int(dist[m]))
        verdict = (f'<div class="{"agree" if dist[m] == 0 else "differ"}">'
                   f'{text}</div>')
      cells.append(f'<td>{picture}<code>{subs[m]}</code>{verdict}</td>')
    body.append('<tr>' + ''.join(cells) + '</tr>')
  title = html.escape(heading or f'query: {query.title}')
  page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}'
          f'</title><style>{_STYLE}</style></head><body><h2>{title}</h2>'
          '<p>Each concept column shows where that concept looks (last-layer '
          'attention) and its sub-code; a neighbour\'s sub-code agrees with the '
          'query\'s or differs by the bits shown. The Hamming distance d is the '
          'sum over concepts.</p>'
          f'<table><tr><th>image</th>{head}</tr>{"".join(body)}</table>'
          '</body></html>')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(page)


def write(out_dir: str, name: str, query: Item, neighbours: Sequence[Item],
          num_concepts: int, *, heading: str = '') -> tuple:
  """Writes out_dir/name.html and out_dir/name.png; returns both paths."""
  os.makedirs(out_dir, exist_ok=True)
  html_path = os.path.join(out_dir, name + '.html')
  png_path = os.path.join(out_dir, name + '.png')
  write_html(html_path, query, neighbours, num_concepts, heading=heading)
  write_png(png_path, query, neighbours, num_concepts)
  return html_path, png_path
