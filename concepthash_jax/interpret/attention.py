"""Concept attention maps: on the patch grid, at image size, as locations.

The last-layer attention of the M concept tokens over the HW patch tokens
(`encoding.encode_split`'s 'concept_attn', (N, M, HW)) is what the paper shows
to explain a code (§4.2; Fig. 3, 6, 8) and what L_csd decorrelates (Fig. 7).
This module reshapes and upsamples it, reduces each map to one pixel location
(its peak or centroid, which `parts` scores against part keypoints), measures
how alike the concepts' maps are, and holds the display helpers of the
attention figures: min-max scaling, the crop around a hot region, and which
test images a panel shows.

Pure functions: arrays in, arrays or dicts out. Names: M -> `num_concepts`,
HW -> the patch grid (h x w). Points are (x, y) pixel coordinates of the model
input (after the test transform).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def attention_grid(concept_attn, grid_shape: Optional[Sequence[int]] = None):
  """Reshapes flat concept attention to the patch grid.

  Args:
    concept_attn: (N, M, HW) attention of concept queries over patch keys.
    grid_shape: (h, w); default the square root of HW.

  Returns:
    (N, M, h, w) numpy float32.
  """
  attn = np.asarray(concept_attn, np.float32)
  hw = attn.shape[-1]
  if grid_shape is None:
    side = int(round(hw ** 0.5))
    if side * side != hw:
      raise ValueError(f'{hw} patches are not a square grid; pass grid_shape')
    grid_shape = (side, side)
  h, w = grid_shape
  if h * w != hw:
    raise ValueError(f'grid_shape {grid_shape} does not hold {hw} patches')
  return attn.reshape(attn.shape[:-1] + (h, w))


def upsample_attention(maps, size: Sequence[int]):
  """Bilinear upsampling of patch-grid maps to image size (half-pixel centres).

  Args:
    maps: (..., h, w) attention on the patch grid.
    size: (H, W) target size in pixels.

  Returns:
    (..., H, W) numpy float32.
  """
  maps = jnp.asarray(maps, jnp.float32)
  shape = maps.shape[:-2] + tuple(size)
  return np.asarray(jax.image.resize(maps, shape, method='bilinear'))


def normalise_for_display(maps):
  """Min-max scales each (h, w) map to [0, 1] for colour mapping.

  Args:
    maps: (..., h, w).

  Returns:
    (..., h, w) float32 in [0, 1] (constant maps -> 0).
  """
  maps = np.asarray(maps, np.float32)
  low = maps.min(axis=(-2, -1), keepdims=True)
  span = maps.max(axis=(-2, -1), keepdims=True) - low
  return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0.0)


def patch_centres(grid_shape: Sequence[int], image_size: Sequence[int]):
  """Pixel (x, y) of every patch centre, row-major like the HW axis.

  Args:
    grid_shape: (h, w) patches.
    image_size: (H, W) pixels of the model input.

  Returns:
    (h*w, 2) float64.
  """
  h, w = grid_shape
  height, width = image_size
  ys, xs = np.meshgrid((np.arange(h) + 0.5) * height / h,
                       (np.arange(w) + 0.5) * width / w, indexing='ij')
  return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def attention_locations(concept_attn, image_size: Sequence[int], *,
                        grid_shape: Optional[Sequence[int]] = None,
                        method: str = 'peak'):
  """One location per concept map: its peak patch or its attention centroid.

  Args:
    concept_attn: (N, M, HW).
    image_size: (H, W) pixels of the model input.
    grid_shape: (h, w); default square.
    method: 'peak' (centre of the arg-max patch) or 'centroid' (attention-
      weighted mean of patch centres, the "geometric centre" of [27]).

  Returns:
    (N, M, 2) float64 pixel (x, y).
  """
  grid = attention_grid(concept_attn, grid_shape)
  flat = grid.reshape(grid.shape[:2] + (-1,)).astype(np.float64)
  centres = patch_centres(grid.shape[-2:], image_size)  # (HW, 2)
  if method == 'peak':
    return centres[flat.argmax(-1)]
  if method == 'centroid':
    weights = flat / np.maximum(flat.sum(-1, keepdims=True), 1e-12)
    return weights @ centres
  raise ValueError(f"Unknown method {method!r}; valid: ['peak', 'centroid']")


def concept_correlation(concept_attn, *, method: str = 'cosine'):
  """Concept-by-concept similarity of attention maps, mean over images (Fig. 7).

  'cosine' is the quantity L_csd penalises (Eq. 8): maps L2-normalised over
  HW, so identical maps give 1. 'pearson' centres each map first.

  Args:
    concept_attn: (N, M, HW).
    method: 'cosine' | 'pearson'.

  Returns:
    (M, M) float64.
  """
  attn = np.asarray(concept_attn, np.float64)
  if method == 'pearson':
    attn = attn - attn.mean(-1, keepdims=True)
  elif method != 'cosine':
    raise ValueError(f"Unknown method {method!r}; valid: ['cosine', 'pearson']")
  unit = attn / np.maximum(np.linalg.norm(attn, axis=-1, keepdims=True), 1e-12)
  return np.einsum('nmk,nlk->ml', unit, unit) / attn.shape[0]


def correlation_summary(concept_attn) -> dict:
  """Fig. 7: cosine (what L_csd penalises) and Pearson concept correlations.

  On near-uniform maps (a random backbone) the cosine is close to 1 however
  the peaks differ, so Pearson (maps centred first) is given beside it.

  Returns:
    {'matrix': (M, M) cosine, 'mean_off_diagonal', 'pearson': (M, M),
    'pearson_mean_off_diagonal'} (off-diagonal means NaN for M = 1).
  """
  cosine = concept_correlation(concept_attn)
  pearson = concept_correlation(concept_attn, method='pearson')
  off_diag = ~np.eye(len(cosine), dtype=bool)

  def off_mean(matrix):
    return float(matrix[off_diag].mean()) if off_diag.any() else float('nan')
  return {'matrix': cosine, 'mean_off_diagonal': off_mean(cosine),
          'pearson': pearson, 'pearson_mean_off_diagonal': off_mean(pearson)}


def crop_box(heatmap, *, threshold: float = 0.5, min_size: int = 8):
  """Box around the hot region of one upsampled map (Fig. 3's crops).

  Args:
    heatmap: (H, W) attention at image resolution.
    threshold: keep pixels above this fraction of the min-max range.
    min_size: smallest side in pixels (grown around the peak, clipped).

  Returns:
    (x0, y0, x1, y1) ints, exclusive end.
  """
  heat = normalise_for_display(heatmap)
  height, width = heat.shape
  ys, xs = np.nonzero(heat >= threshold)
  if not len(ys):  # A constant map has no hot region: keep the whole image.
    return 0, 0, int(width), int(height)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  py, px = np.unravel_index(np.argmax(heat), heat.shape)

  def grow(lo, hi, peak, limit):
    # Enlarge a too-small interval symmetrically around the peak.
    size = min(max(hi - lo, min_size), limit)
    if hi - lo >= size:
      return lo, hi
    lo = int(np.clip(peak - size // 2, 0, limit - size))
    return lo, lo + size
  x0, x1 = grow(x0, x1, px, width)
  y0, y1 = grow(y0, y1, py, height)
  return int(x0), int(y0), int(x1), int(y1)


# -------------------------------------------------------------- display


def pick_display(labels, n):
  """Up to n test rows, one per class first, so the panel shows variety."""
  labels = np.asarray(labels)
  _, first = np.unique(labels, return_index=True)
  rest = np.setdiff1d(np.arange(len(labels)), first)
  return np.concatenate([np.sort(first), rest])[:n]
