"""Part localisation (Table 3) and which part each concept looks at.

Scores concept attention locations (`attention.attention_locations`) against
ground-truth part keypoints (x, y, visible) in pixel coordinates of the model
input (after the test transform). Pure functions: arrays in, arrays or dicts
out. Names: M -> `num_concepts`, P -> the number of parts, S -> side of the
model input in pixels.

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

`concept_part_hits` asks the other question: not how far a concept is from a
part but which part (or the background) its attention peak is on.
"""
from typing import Sequence

import numpy as np

from concepthash_jax.interpret import attention


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
      `attention.attention_locations`), split used to fit the regressor /
      assignment.
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
      fit_loc = attention.attention_locations(
          train_enc['concept_attn'][fit_rows], image_size, method=loc_method)
      eval_loc = attention.attention_locations(
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
    locations: (N, M, 2) pixel (x, y) per concept
      (`attention.attention_locations`).
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
  hits = concept_part_hits(
      attention.attention_locations(concept_attn, image_size), keypoints,
      image_size=image_size, boxes=boxes)
  summary = part_hit_summary(hits, labels, len(part_names))
  summary['targets'] = list(part_names) + ['background']
  return summary
