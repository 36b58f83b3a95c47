"""Analysis of ConceptHash codes and concept attention (§4.2-4.3, App. B).

Pure functions: arrays in, arrays or dicts out, no file I/O; `figures.py`
draws them, `report.py` writes the report, `tools/explain.py` runs the steps. Names: M -> `num_concepts`, K ->
`nbit`, HW -> the patch grid (h x w), S -> side of the model input in pixels.
Points are (x, y) pixel coordinates of the model input (after the test
transform); keypoints are (x, y, visible).

Part localisation (Table 3) follows the protocol of Huang & Li, CVPR 2020 (the
paper's ref. [27], `eval_interp.py`): each concept's attention map gives one
location per image; per ground-truth part, a linear regressor (standardised
inputs and targets, i.e. least squares with intercept) maps the M concept
locations of the *fit* split to the part location and is scored on the *eval*
split. Coordinates are normalised per axis, x / width and y / height, by the
object box when boxes are given (as [27]) or else by the model input (S x S);
the error is the L2 distance in those units x 100, averaged over every visible
(image, part) pair. `protocol='best_concept'` is the assumption-free variant: a
part is predicted directly by the attention location of the one concept that
localises it best on the fit split (no regression). [27] locates a part by the
centroid of its soft assignment map; concept attention comes from a softmax
over all tokens, whose near-uniform floor pulls a centroid towards the image
centre, so the tools default to the peak (both are available).
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from concepthash_jax import encoding
from concepthash_jax import evaluation


# ------------------------------------------------------- attention maps


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


# ------------------------------------------------------ part localisation


def visible_mask(keypoints, image_size: Sequence[int]):
  """Keypoints marked visible and inside the model input.

  Args:
    keypoints: (N, P, 3) x, y, visible.
    image_size: (H, W).

  Returns:
    (N, P) bool.
  """
  kp = np.asarray(keypoints, np.float64)
  height, width = image_size
  return ((kp[..., 2] > 0) & (kp[..., 0] >= 0) & (kp[..., 0] < width)
          & (kp[..., 1] >= 0) & (kp[..., 1] < height))


def normalise_points(points, image_size: Sequence[int], boxes=None):
  """Per-axis normalisation of pixel points by the box or the image.

  Args:
    points: (N, P, 2) pixel (x, y).
    image_size: (H, W) used when boxes is None.
    boxes: optional (N, 4) x, y, width, height in the same pixel frame.

  Returns:
    (N, P, 2) float64: (x - x0) / width, (y - y0) / height.
  """
  points = np.asarray(points, np.float64)
  if boxes is None:
    height, width = image_size
    origin, scale = np.zeros(2), np.array([width, height], np.float64)
    return (points - origin) / scale
  boxes = np.asarray(boxes, np.float64)[:, None, :]
  return (points - boxes[..., :2]) / np.maximum(boxes[..., 2:], 1e-12)


def point_errors(pred, target, valid):
  """L2 distance x 100 between normalised points; NaN where not valid.

  Args:
    pred: (N, P, 2) normalised predictions.
    target: (N, P, 2) normalised ground truth.
    valid: (N, P) bool.

  Returns:
    (N, P) float64 percent.
  """
  dist = 100.0 * np.linalg.norm(np.asarray(pred) - np.asarray(target), axis=-1)
  return np.where(valid, dist, np.nan)


def _summary(errors):
  """Per-part means and the mean over all visible (image, part) pairs."""
  counts = np.sum(~np.isnan(errors), axis=0)
  with np.errstate(invalid='ignore'):
    per_part = np.nansum(errors, axis=0) / np.where(counts > 0, counts, np.nan)
  overall = (float(np.nansum(errors) / counts.sum()) if counts.sum()
             else float('nan'))
  return per_part, overall, counts


def _fit_regression(fit_x, fit_y, eval_x):
  """[27]'s regressor: standardise X and y, least squares without intercept."""
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  from sklearn import preprocessing  # pylint: disable=g-import-not-at-top
  scale_x = preprocessing.StandardScaler().fit(fit_x)
  scale_y = preprocessing.StandardScaler().fit(fit_y)
  reg = linear_model.LinearRegression(fit_intercept=False)
  reg.fit(scale_x.transform(fit_x), scale_y.transform(fit_y))
  return scale_y.inverse_transform(reg.predict(scale_x.transform(eval_x)))


def part_localisation(fit_locations, fit_keypoints, eval_locations,
                      eval_keypoints, *, image_size: Sequence[int],
                      fit_boxes=None, eval_boxes=None,
                      protocol: str = 'regression',
                      min_fit: int = 2) -> dict:
  """Part localisation error of concept attention (Table 3) and two baselines.

  Args:
    fit_locations: (N_fit, M, 2) pixel (x, y) per concept (see
      `attention_locations`), split used to fit the regressor / assignment.
    fit_keypoints: (N_fit, P, 3) ground-truth x, y, visible.
    eval_locations: (N_eval, M, 2).
    eval_keypoints: (N_eval, P, 3).
    image_size: (H, W) of the model input.
    fit_boxes, eval_boxes: optional (N, 4) object boxes x, y, w, h for the
      normalisation of [27]; None normalises by the image.
    protocol: 'regression' ([27], all M locations -> each part) or
      'best_concept' (each part predicted by its best concept's location).
    min_fit: parts with fewer visible fit samples are reported as NaN.

  Returns:
    dict with 'protocol'; 'per_part' (P,) and 'mean' error in % (mean over
    visible eval pairs); 'count' (P,) visible eval pairs; 'centre_baseline'
    and 'centre_baseline_per_part' (always predict the image centre);
    'mean_baseline' and 'mean_baseline_per_part' (always predict the part's
    mean fit location: what a regressor with no information reaches);
    for 'best_concept' also 'assignment' (P,) concept per part and
    'concept_part_error' (M, P) mean fit error of every concept for every part.
  """
  if protocol not in ('regression', 'best_concept'):
    raise ValueError(f"Unknown protocol {protocol!r}; valid: "
                     "['regression', 'best_concept']")
  fit_kp = np.asarray(fit_keypoints, np.float64)
  eval_kp = np.asarray(eval_keypoints, np.float64)
  fit_valid = visible_mask(fit_kp, image_size)
  eval_valid = visible_mask(eval_kp, image_size)
  fit_target = normalise_points(fit_kp[..., :2], image_size, fit_boxes)
  eval_target = normalise_points(eval_kp[..., :2], image_size, eval_boxes)
  fit_loc = normalise_points(fit_locations, image_size, fit_boxes)
  eval_loc = normalise_points(eval_locations, image_size, eval_boxes)
  n_eval, num_parts = eval_valid.shape
  num_concepts = fit_loc.shape[1]

  height, width = image_size
  centre = np.broadcast_to([[[width / 2.0, height / 2.0]]], (n_eval, 1, 2))
  centre = normalise_points(centre, image_size, eval_boxes)
  centre_err = point_errors(np.broadcast_to(centre, eval_target.shape),
                            eval_target, eval_valid)

  pred = np.full(eval_target.shape, np.nan)
  mean_pred = np.full(eval_target.shape, np.nan)
  usable = fit_valid.sum(0) >= min_fit  # (P,)
  result = {'protocol': protocol}
  if protocol == 'best_concept':
    # (M, P): mean fit error of predicting part p by concept m's location.
    cp = np.stack([_summary(point_errors(
        np.repeat(fit_loc[:, m:m + 1], num_parts, 1), fit_target,
        fit_valid))[0] for m in range(num_concepts)])
    assignment = np.where(usable, np.argmin(np.nan_to_num(cp, nan=np.inf), 0),
                          -1)
    result.update(assignment=assignment, concept_part_error=cp)
  for p in range(num_parts):
    if not usable[p]:
      continue
    rows = fit_valid[:, p]
    mean_pred[:, p] = fit_target[rows, p].mean(0)
    if protocol == 'regression':
      pred[:, p] = _fit_regression(fit_loc[rows].reshape(rows.sum(), -1),
                                   fit_target[rows, p],
                                   eval_loc.reshape(n_eval, -1))
    else:
      pred[:, p] = eval_loc[:, assignment[p]]
  scored = eval_valid & usable[None]
  errors = point_errors(pred, eval_target, scored)
  result['per_part'], result['mean'], result['count'] = _summary(errors)
  (result['centre_baseline_per_part'], result['centre_baseline'],
   _) = _summary(np.where(scored, centre_err, np.nan))
  (result['mean_baseline_per_part'], result['mean_baseline'],
   _) = _summary(point_errors(mean_pred, eval_target, scored))
  return result


def localisation(train_enc, test_enc, *, image_size, method, classes=(),
                 prefix='class'):
  """Table 3: every protocol and location method, pooled and per class.

  Per-class subsets are named like the paper's CUB-001 (1-based class id).
  Coordinates are normalised by the object boxes when both splits have them.

  Args:
    train_enc, test_enc: `encoding.encode_split` results with 'concept_attn',
      'keypoints', 'labels' and optionally 'box' (fit and eval splits).
    image_size: (H, W) of the model input.
    method: 'peak' | 'centroid' for the headline entry.
    classes: class ids also scored on their own.
    prefix: subset name prefix (the dataset, upper case).

  Returns:
    {'all' | '<prefix>-<id>': {'<protocol>/<method>': `part_localisation`
    result, 'headline': key, 'normalised_by': 'object box' | 'image'}}.
  """
  use_boxes = 'box' in train_enc and 'box' in test_enc

  def fit_boxes(rows):
    return train_enc['box'][rows] if use_boxes else None

  def eval_boxes(rows):
    return test_enc['box'][rows] if use_boxes else None

  def run(fit_rows, eval_rows):
    out = {}
    for loc_method in ('peak', 'centroid'):
      fit_loc = attention_locations(
          train_enc['concept_attn'][fit_rows], image_size, method=loc_method)
      eval_loc = attention_locations(
          test_enc['concept_attn'][eval_rows], image_size, method=loc_method)
      for protocol in ('regression', 'best_concept'):
        out[f'{protocol}/{loc_method}'] = part_localisation(
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


def localisation_bars(loc: dict) -> dict:
  """Table 3's pooled rows for a bar chart: {row name: per-part errors + mean}."""
  all_parts = loc['all']
  head = all_parts[all_parts['headline']]
  best = all_parts['best_concept/peak']
  return {
      f'ours ({all_parts["headline"]})': list(head['per_part']) + [head['mean']],
      'best concept/peak': list(best['per_part']) + [best['mean']],
      'image centre': list(head['centre_baseline_per_part'])
                      + [head['centre_baseline']],
      'mean location': list(head['mean_baseline_per_part'])
                       + [head['mean_baseline']]}


BACKGROUND = -1  # `concept_part_hits` target: outside the object box.
NO_PART = -2  # ... no visible part in the image: not scored.


def concept_part_hits(locations, keypoints, *, image_size: Sequence[int],
                      boxes=None):
  """The ground-truth part each concept's attention location falls on.

  Table 3 asks how far a concept is from a part; this asks *which* part it
  is on, so one can see whether concept m is a fixed part (the paper's
  "head" concept on CUB) or a cue whose part changes with the image (a colour
  on the synthetic birds, whose classes permute one palette over the parts).
  A location inside the object box goes to the nearest visible keypoint
  (box-normalised units, as Table 3); outside the box it is background.
  Without boxes every location goes to its nearest part.

  Args:
    locations: (N, M, 2) pixel (x, y) per concept (`attention_locations`).
    keypoints: (N, P, 3) x, y, visible.
    image_size: (H, W) of the model input.
    boxes: optional (N, 4) object boxes x, y, width, height.

  Returns:
    (N, M) int64: part index, BACKGROUND, or NO_PART (image with no visible
    part).
  """
  kp = np.asarray(keypoints, np.float64)
  valid = visible_mask(kp, image_size)  # (N, P)
  target = normalise_points(kp[..., :2], image_size, boxes)  # (N, P, 2)
  loc = normalise_points(locations, image_size, boxes)  # (N, M, 2)
  dist = np.linalg.norm(loc[:, :, None] - target[:, None], axis=-1)
  dist = np.where(valid[:, None], dist, np.inf)  # (N, M, P)
  hits = np.argmin(dist, axis=-1).astype(np.int64)
  if boxes is not None:
    inside = np.all((loc >= 0) & (loc <= 1), axis=-1)
    hits = np.where(inside, hits, BACKGROUND)
  return np.where(valid.any(-1)[:, None], hits, NO_PART)


def part_hit_summary(hits, labels, num_parts: int) -> dict:
  """What each concept looks at, over a split (from `concept_part_hits`).

  Args:
    hits: (N, M) int targets.
    labels: (N,) int class ids (for the within-class consistency).
    num_parts: P.

  Returns:
    dict over the images with a visible part: 'fraction' (M, P + 1) share of
    images whose concept m is on part p (last column: background);
    'consistency' (M,) share on the concept's most common target;
    'consistency_within_class' (M,) the same with the most common target of
    each class (near 'consistency' for a fixed-part concept, far above it for
    a class-dependent cue); 'distinct_rate' share of images in which the M
    concepts are on M different targets (two concepts on the background are a
    repeat); 'mean_distinct_parts' mean number of different parts hit per
    image (background not counted); 'count' images scored.
  """
  hits = np.asarray(hits, np.int64)
  labels = np.asarray(labels, np.int64)
  scored = np.all(hits != NO_PART, axis=1)
  hits, labels = hits[scored], labels[scored]
  n, m = hits.shape
  column = np.where(hits == BACKGROUND, num_parts, hits)  # (n, M) in [0, P]
  onehot = np.eye(num_parts + 1)[column]  # (n, M, P + 1)
  fraction = onehot.mean(0) if n else np.full((m, num_parts + 1), np.nan)
  within = np.zeros(m)
  for c in np.unique(labels):
    within += onehot[labels == c].sum(0).max(-1)
  sorted_hits = np.sort(column, axis=1)
  repeats = np.any(sorted_hits[:, 1:] == sorted_hits[:, :-1], axis=1)
  parts_hit = onehot[..., :num_parts].max(1).sum(-1)  # (n,)
  return {'fraction': fraction,
          'consistency': fraction.max(-1),
          'consistency_within_class': within / n if n else np.full(m, np.nan),
          'distinct_rate': float(np.mean(~repeats)) if n else float('nan'),
          'mean_distinct_parts': float(parts_hit.mean()) if n else float('nan'),
          'count': int(n)}


def part_hits(concept_attn, keypoints, labels, *, image_size, part_names,
              boxes=None) -> dict:
  """Which part each concept looks at over a split, with the target names.

  The peak locates a concept here: a centroid of a background map lands
  mid-image, i.e. on the object.

  Returns:
    `part_hit_summary` plus 'targets' (part names, then 'background').
  """
  hits = concept_part_hits(attention_locations(concept_attn, image_size),
                           keypoints, image_size=image_size, boxes=boxes)
  summary = part_hit_summary(hits, labels, len(part_names))
  summary['targets'] = list(part_names) + ['background']
  return summary


# ------------------------------------------------------------- families


def to_family_labels(labels, family_of):
  """Maps class labels to family labels.

  Args:
    labels: (N,) int class ids or (N, C) multi-hot.
    family_of: (C,) family id of each class.

  Returns:
    (N,) int64 family ids, or (N, F) multi-hot for multi-hot input.
  """
  labels, family_of = np.asarray(labels), np.asarray(family_of, np.int64)
  if labels.ndim == 1:
    return family_of[labels]
  onehot = np.eye(family_of.max() + 1, dtype=np.int64)[family_of]  # (C, F)
  return ((labels.astype(np.int64) @ onehot) > 0).astype(np.int64)


def family_map_at_r(query_codes, query_labels, db_codes, db_labels, family_of,
                    *, R: Optional[int] = None, ties: str = 'index') -> float:
  """Family-level retrieval (Table 5): mAP@R with family labels as relevance.

  Args:
    query_codes: (Q, K) codes (value > 0 is bit 1).
    query_labels: (Q,) class ids or (Q, C) multi-hot.
    db_codes: (N, K).
    db_labels: (N,) or (N, C).
    family_of: (C,) family of each class.
    R: cut-off (None = whole database, as the paper).
    ties: Hamming tie rule of `evaluation.map_at_r`.

  Returns:
    mAP@R in [0, 1].
  """
  return float(evaluation.map_at_r(
      query_codes, to_family_labels(query_labels, family_of), db_codes,
      to_family_labels(db_labels, family_of), R=R, ties=ties))


def retrieval_by_level(query, database, family_of, *, R: Optional[int] = None,
                       ties: str = 'index') -> dict:
  """Table 5: class-level and family-level mAP@R, each beside its chance level.

  Args:
    query, database: `encoding.encode_split` results ('codes', 'labels').
    family_of: (C,) family of each class.
    R, ties: as `evaluation.map_at_r`.

  Returns:
    {'class_map_at_r', 'class_chance'} and, when families group classes,
    'num_families', 'family_map_at_r', 'family_chance'.
  """
  out = {'class_map_at_r': float(evaluation.map_at_r(
      query['codes'], query['labels'], database['codes'], database['labels'],
      R=R, ties=ties)),
         'class_chance': encoding.chance_map_at_r(query['labels'],
                                                  database['labels'])}
  family_of = np.asarray(family_of, np.int64)
  num_families = len(np.unique(family_of))
  if num_families < len(family_of):
    out['num_families'] = num_families
    out['family_map_at_r'] = family_map_at_r(
        query['codes'], query['labels'], database['codes'],
        database['labels'], family_of, R=R, ties=ties)
    out['family_chance'] = encoding.chance_map_at_r(
        to_family_labels(query['labels'], family_of),
        to_family_labels(database['labels'], family_of))
  return out


def top_families(family_of, k: int = 10):
  """The k families with the most classes (Fig. 5 plots CUB's top 10).

  Args:
    family_of: (C,) family ids.
    k: how many.

  Returns:
    (k',) family ids, most classes first (ties: lower id first), k' <= k.
  """
  counts = np.bincount(np.asarray(family_of, np.int64))
  order = np.lexsort((np.arange(len(counts)), -counts))
  return order[counts[order] > 0][:k]


def family_similarity(centers, family_of) -> dict:
  """Mean cosine between class centers of the same vs different families.

  A number to go with Fig. 5's picture: language-guided centers should be
  closer within a family than across families.

  Args:
    centers: (C, K) hash class centers.
    family_of: (C,) family ids.

  Returns:
    {'within': float, 'between': float} (NaN when no such pair exists).
  """
  centers = np.asarray(centers, np.float64)
  unit = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True),
                              1e-12)
  sim = unit @ unit.T
  fam = np.asarray(family_of)
  same = fam[:, None] == fam[None, :]
  off = ~np.eye(len(fam), dtype=bool)

  def mean(mask):
    return float(sim[mask].mean()) if mask.any() else float('nan')
  return {'within': mean(same & off), 'between': mean(~same)}


def tsne_embed(points, *, seed: int = 0, perplexity: Optional[float] = None):
  """2-D t-SNE (scikit-learn) of L2-normalised points (cosine geometry).

  Args:
    points: (C, K), e.g. hash class centers o_c.
    seed: random state.
    perplexity: default min(30, (C - 1) / 3), valid for small C.

  Returns:
    (C, 2) float64.
  """
  from sklearn import manifold  # pylint: disable=g-import-not-at-top
  points = np.asarray(points, np.float64)
  if len(points) < 3:
    raise ValueError(f't-SNE needs at least 3 points, got {len(points)}')
  unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True),
                             1e-12)
  if perplexity is None:
    perplexity = max(1.0, min(30.0, (len(points) - 1) / 3.0))
  return manifold.TSNE(n_components=2, perplexity=perplexity, init='pca',
                       random_state=seed).fit_transform(unit)


# ------------------------------------------------------------ sub-codes


def subcode_values(codes, num_concepts: int):
  """Integer value of every concept's sub-code (first bit most significant).

  Args:
    codes: (N, K) codes; a value > 0 is bit 1.
    num_concepts: M (K must be divisible by M).

  Returns:
    (N, M) int64 in [0, 2^(K/M)).
  """
  codes = np.asarray(codes)
  n, nbit = codes.shape
  if nbit % num_concepts:
    raise ValueError(f'nbit {nbit} is not divisible by {num_concepts} concepts')
  bits = (codes > 0).reshape(n, num_concepts, nbit // num_concepts)
  weights = 2 ** np.arange(bits.shape[-1] - 1, -1, -1, dtype=np.int64)
  return (bits.astype(np.int64) * weights).sum(-1)


def subcode_string(value: int, bits: int) -> str:
  """'01'-style bit string of a sub-code value (first bit first)."""
  return format(int(value), f'0{bits}b')


def _gray_rank(bits: str) -> int:
  """Position of a Gray-code word in the Gray sequence."""
  rank, acc = 0, 0
  for ch in bits:
    acc ^= int(ch)
    rank = rank * 2 + acc
  return rank


def subcode_layout(bits: int):
  """Grid cell of every sub-code value, generalising Fig. 3's quadrants.

  Fig. 3 (2 bits): 00 bottom-left, 01 top-left, 11 top-right, 10
  bottom-right, i.e. the first bit picks the column and the second the row
  from the bottom, so neighbouring cells differ in one bit. With more bits the
  first ceil(b/2) bits pick the column and the rest the row, each in Gray
  order, keeping that property.

  Args:
    bits: bits per sub-code (K/M).

  Returns:
    (rows, cols, {value: (row from top, col)}).
  """
  col_bits = (bits + 1) // 2
  row_bits = bits - col_bits
  rows, cols = 2 ** row_bits, 2 ** col_bits
  cells = {}
  for value in range(2 ** bits):
    word = subcode_string(value, bits)
    col = _gray_rank(word[:col_bits])
    row = _gray_rank(word[col_bits:]) if row_bits else 0
    cells[value] = (rows - 1 - row, col)
  return rows, cols, cells


def gallery_groups(values, scores=None, *, per_group: int = 4,
                   max_groups: int = 16):
  """Images grouped by one concept's sub-code value, best-scored first.

  Args:
    values: (N,) sub-code value of each image for one concept.
    scores: (N,) ranking within a group (e.g. the concept's peak
      attention); default image order.
    per_group: images kept per value.
    max_groups: keep the most populous values only (long sub-codes have
      more values than a figure can hold).

  Returns:
    {value: (n,) int indices}, at most max_groups values, largest first.
  """
  values = np.asarray(values)
  scores = (-np.arange(len(values), dtype=np.float64) if scores is None
            else np.asarray(scores, np.float64))
  uniq, counts = np.unique(values, return_counts=True)
  keep = uniq[np.lexsort((uniq, -counts))][:max_groups]
  groups = {}
  for value in keep:
    idx = np.nonzero(values == value)[0]
    order = np.argsort(-scores[idx], kind='stable')
    groups[int(value)] = idx[order][:per_group]
  return groups


# -------------------------------------------------------------- display


def pick_display(labels, n):
  """Up to n test rows, one per class first, so the panel shows variety."""
  labels = np.asarray(labels)
  _, first = np.unique(labels, return_index=True)
  rest = np.setdiff1d(np.arange(len(labels)), first)
  return np.concatenate([np.sort(first), rest])[:n]
