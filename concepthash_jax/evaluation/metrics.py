"""mAP@R (docs/method.md §5, §6.1), P@k, radius precision and the PR curve of a ranking.

`retrieval_metrics` checks its inputs, picks an engine (`native` on this
process's CPUs, `xla` elsewhere), and turns the engine's per-query statistics
into metrics; `score` and `chance_map_at_r` put encoded splits beside chance.
"""
import functools
from typing import Optional, Sequence

import jax
import numpy as np

from concepthash_jax.evaluation import average_ties
from concepthash_jax.evaluation import native
from concepthash_jax.evaluation import packing
from concepthash_jax.evaluation import xla

TIES = ('index', 'average')
KERNELS = ('auto', 'native', 'xla')


def _radius_curve(hist, hist_rel):
  """Mean precision and recall of the items within each Hamming radius 0..K."""
  within = np.cumsum(np.asarray(hist, np.float64), 1)
  within_rel = np.cumsum(np.asarray(hist_rel, np.float64), 1)
  total_rel = within_rel[:, -1:]
  with np.errstate(divide='ignore', invalid='ignore'):
    # Nothing retrieved (or nothing relevant) scores 0, like a missed query.
    precision = np.where(within > 0, within_rel / np.maximum(within, 1.0), 0.0)
    recall = np.where(total_rel > 0, within_rel / np.maximum(total_rel, 1.0), 0.0)
  return precision.mean(0), recall.mean(0)


def pick_kernel(kernel, mesh, nbit, num_db):
  """'native' or 'xla' for `kernel` in KERNELS (see `retrieval_metrics`)."""
  if kernel not in KERNELS:
    raise ValueError(f'Unknown kernel {kernel!r}; expected one of {KERNELS}')
  fits = nbit < (1 << 16) and num_db < (1 << 32)
  if kernel == 'native':
    if native.kernel_module() is None:
      raise ValueError('kernel="native": the native kernel is not built; '
                       '`pip install -e .` builds it (needs a C compiler)')
    if not fits:
      raise ValueError('kernel="native" handles < 65536 bits and < 2^32 items')
    return 'native'
  if kernel == 'xla' or native.kernel_module() is None or not fits:
    return 'xla'
  devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
  on_cpu = all(d.platform == 'cpu' for d in devices)
  return 'native' if on_cpu and jax.process_count() == 1 else 'xla'


def retrieval_metrics(query_codes, query_labels, db_codes, db_labels, *,
                      R: Optional[int] = None, ties: str = 'index',
                      topk: Sequence[int] = (1, 5, 10), radius: int = 2,
                      chunk_size: Optional[int] = None,
                      progress: Optional[bool] = None,
                      per_query: bool = False,
                      curves: bool = True,
                      mesh: Optional[jax.sharding.Mesh] = None,
                      kernel: str = 'auto') -> dict:
  """mAP@R, P@k, precision within a Hamming radius and the PR curve, one pass.

  Args:
    query_codes: (Q, K) real codes (value > 0 is bit 1) or `PackedCodes`.
    query_labels: (Q,) int or (Q, C) multi-hot.
    db_codes: (N, K) real codes or `PackedCodes`.
    db_labels: (N,) int or (N, C) multi-hot.
    R: mAP cut-off; None or -1 = the whole database, else 1 <= R <= N.
    ties: 'index' (ties by ascending database index, as a stable sort) or
      'average' (expectation over all orders of tied items, closed form).
    topk: k values for P@k = (relevant in the top min(k, N)) / k.
    radius: Hamming radius for 'precision_at_radius_<radius>'.
    chunk_size: queries per call (default: ~512k query-item pairs per device
      for XLA, ~1e9 pairs for the native kernel).
    progress: tqdm bar over query chunks; None = only for >= 1e9 pairs.
    per_query: also return 'ap' (Q,) float64 per-query AP.
    curves: also the radius metrics and the PR curve (map_at_r skips them).
    mesh: devices for the XLA path; the database is split over all its axes
      (every process passes the same full arrays). None = the first device.
    kernel: 'native' (C kernel, CPU threads), 'xla' (jitted, on `mesh`) or
      'auto': native when it is built and the devices are this process's
      CPUs, else XLA. All give the same bits.

  Returns:
    dict: 'map_at_r', 'precision_at_<k>' for each k,
    'precision_at_radius_<radius>', 'recall_at_radius_<radius>',
    'pr_precision' and 'pr_recall' ((K + 1,) means over queries for radii
    0..K) when curves, and 'ap' when per_query. Scalars are python floats.
  """
  if ties not in TIES:
    raise ValueError(f'Unknown ties {ties!r}; expected one of {TIES}')
  query, db = packing.pack_codes(query_codes), packing.pack_codes(db_codes)
  if query.nbit != db.nbit:
    raise ValueError(f'query codes have {query.nbit} bits, database {db.nbit}')
  q_labels = packing.pack_labels(query_labels)
  d_labels = packing.pack_labels(db_labels)
  num_q, num_db, nbit = len(query.bits), len(db.bits), db.nbit
  if q_labels.shape[0] != num_q or d_labels.shape[0] != num_db:
    raise ValueError('labels and codes disagree in length')
  if q_labels.ndim != d_labels.ndim or q_labels.shape[1:] != d_labels.shape[1:]:
    raise ValueError('query and database labels must be the same kind and width')
  if num_db == 0 or num_q == 0:
    raise ValueError('empty query set or database')
  R = num_db if R is None or R == -1 else int(R)
  if not 1 <= R <= num_db:
    raise ValueError(f'R must be in [1, {num_db}] (or None / -1), got {R}')
  topk = tuple(int(k) for k in topk)
  if any(k < 1 for k in topk):
    raise ValueError(f'topk values must be >= 1, got {topk}')
  if radius < 0:
    raise ValueError(f'radius must be >= 0, got {radius}')

  ranked = ties == 'index'
  if progress is None:
    progress = num_q * num_db >= 10**9
  stats = (native.per_query_stats
           if pick_kernel(kernel, mesh, nbit, num_db) == 'native'
           else functools.partial(xla.per_query_stats, mesh=mesh))
  out = stats(query, q_labels, db, d_labels, R,
              tuple(min(k, num_db) for k in topk), ranked,
              chunk_size=chunk_size, progress=progress)

  hist, hist_rel = out['hist'], out['hist_rel']
  if ranked:
    ap = out['ap'].astype(np.float64)
    hits = out['hits'].astype(np.float64)
  else:
    # In row chunks: the closed form's float64 temporaries are ~10 per cell.
    rows = max(1, (1 << 20) // hist.shape[1])
    ap = np.concatenate([
        average_ties.expected_average_precision(
            hist[s:s + rows], hist_rel[s:s + rows], R)
        for s in range(0, num_q, rows)])
    hits = np.stack([average_ties.expected_hits(hist, hist_rel, min(k, num_db))
                     for k in topk], -1) if topk else np.zeros((num_q, 0))
  metrics = {'map_at_r': float(ap.mean())}
  for i, k in enumerate(topk):
    metrics[f'precision_at_{k}'] = float((hits[:, i] / k).mean())
  if curves:
    pr_precision, pr_recall = _radius_curve(hist, hist_rel)
    within = min(radius, nbit)  # a radius >= K retrieves everything
    metrics[f'precision_at_radius_{radius}'] = float(pr_precision[within])
    metrics[f'recall_at_radius_{radius}'] = float(pr_recall[within])
    metrics['pr_precision'] = pr_precision
    metrics['pr_recall'] = pr_recall
  if per_query:
    metrics['ap'] = ap
  return metrics


def map_at_r(query_codes, query_labels, db_codes, db_labels, *,
             R: Optional[int] = None, ties: str = 'index',
             chunk_size: Optional[int] = None,
             progress: Optional[bool] = None,
             mesh: Optional[jax.sharding.Mesh] = None,
             kernel: str = 'auto') -> float:
  """Mean average precision over the top R of a Hamming ranking (docs/method.md §5, §6.1).

  AP = sum_k P(k) rel(k) / (relevant in top R); a query with no relevant item
  in the top R scores 0; the mean runs over all queries.

  Args:
    query_codes: (Q, K) real codes (value > 0 is bit 1) or `PackedCodes`.
    query_labels: (Q,) int or (Q, C) multi-hot.
    db_codes: (N, K) real codes or `PackedCodes`.
    db_labels: (N,) int or (N, C) multi-hot.
    R: cut-off; None (or -1) = the whole database.
    ties: 'index' (ascending database index) or 'average' (expected AP over
      all orders of tied items).
    chunk_size: queries per call (see `retrieval_metrics`).
    progress: tqdm bar over query chunks; None = only for >= 1e9 pairs.
    mesh: devices for the XLA path, the database split over them; None = the
      first device.
    kernel: 'auto', 'native' or 'xla' (see `retrieval_metrics`).

  Returns:
    mAP@R as a python float.

  Raises:
    ValueError: NaN or inf in real-valued codes (their sign, the bit, is
      meaningless), naming how many query and database rows hold them.
  """
  _check_finite_codes(query_codes, db_codes)
  return retrieval_metrics(query_codes, query_labels, db_codes, db_labels, R=R,
                           ties=ties, topk=(), radius=0, chunk_size=chunk_size,
                           progress=progress, curves=False, mesh=mesh,
                           kernel=kernel)['map_at_r']


def _check_finite_codes(query_codes, db_codes):
  """Raises ValueError counting the rows of real codes with NaN/inf."""
  bad = {}
  for name, codes in (('query', query_codes), ('database', db_codes)):
    if isinstance(codes, packing.PackedCodes):
      continue  # Bits: always finite.
    codes = np.asarray(codes)
    if np.issubdtype(codes.dtype, np.floating):
      rows = ~np.isfinite(codes).reshape(len(codes), -1).all(axis=1)
      if rows.any():
        bad[name] = (int(rows.sum()), len(codes))
  if bad:
    counts = ' and '.join(f'{n} of {total} {name} rows'
                          for name, (n, total) in bad.items())
    raise ValueError(f'map_at_r: non-finite (NaN/inf) codes in {counts}; '
                     'a code bit is its sign, undefined for NaN: check the '
                     'model output (a diverged run?) before ranking')


# ------------------------------------------------------- encoded splits


def retrieval_cutoff(eval_cfg) -> Optional[int]:
  """config eval.R as `evaluation.map_at_r`'s R (None = whole database)."""
  return None if eval_cfg.R is None or eval_cfg.R < 0 else int(eval_cfg.R)


def precision_ks(num_database: int) -> tuple:
  """k = 1, 2, 5, 10, 20, 50, ... up to the database size (P@k-vs-k plots)."""
  ks, decade = [], 1
  while decade <= num_database:
    ks += [k for k in (decade, 2 * decade, 5 * decade) if k <= num_database]
    decade *= 10
  return tuple(ks)


def score(query: dict, database: dict, eval_cfg, *,
          curves: bool = False, mesh=None) -> dict:
  """mAP@R of encoded queries against an encoded database, beside chance.

  Args:
    query, database: `encode_split` results with 'codes' and 'labels'.
    eval_cfg: config `eval` (R, ties).
    curves: also the precision-recall curve over Hamming radii and P@k.
    mesh: devices the evaluator splits the database over (None: one).

  Returns:
    {'map_at_r', 'chance_map_at_r', 'num_queries', 'num_database'}; with
    `curves`, 'pr_precision', 'pr_recall' ((K + 1,) for radii 0..K) and
    'precision_at_k' {'k': [...], 'precision': [...]}.
  """
  ks = precision_ks(len(database['labels'])) if curves else ()
  metrics = retrieval_metrics(
      query['codes'], query['labels'], database['codes'], database['labels'],
      R=retrieval_cutoff(eval_cfg), ties=eval_cfg.ties, topk=ks, radius=0,
      mesh=mesh)
  out = {'map_at_r': float(metrics['map_at_r']),
         'chance_map_at_r': chance_map_at_r(query['labels'],
                                            database['labels']),
         'num_queries': len(query['labels']),
         'num_database': len(database['labels'])}
  if curves:
    out['pr_precision'] = metrics['pr_precision']
    out['pr_recall'] = metrics['pr_recall']
    out['precision_at_k'] = {
        'k': list(ks), 'precision': [metrics[f'precision_at_{k}'] for k in ks]}
  return out


def chance_map_at_r(query_labels, db_labels) -> float:
  """Expected mAP@R (R = whole database) of a uniformly random ranking.

  For a query with n relevant items among N, E[AP] =
  (n-1)/(N-1) + (H_N/N) (N-n)/(N-1) (H_N the harmonic number): about the
  fraction of relevant items, slightly above it for small N. Queries with
  n = 0 score 0.

  Args:
    query_labels: (Q,) int or (Q, C) multi-hot.
    db_labels: (N,) int or (N, C) multi-hot.

  Returns:
    The expectation, averaged over queries.
  """
  q, d = np.asarray(query_labels), np.asarray(db_labels)
  if q.ndim == 1:
    classes, counts = np.unique(d, return_counts=True)
    lookup = dict(zip(classes.tolist(), counts.tolist()))
    n = np.array([lookup.get(c, 0) for c in q.tolist()], np.float64)
  else:
    n = ((q.astype(np.float32) @ d.T.astype(np.float32)) > 0).sum(1)
    n = n.astype(np.float64)
  size = float(len(d))
  if size <= 1:
    return float(np.mean(n > 0))
  harmonic = np.sum(1.0 / np.arange(1, len(d) + 1))
  expected = (n - 1) / (size - 1) + harmonic / size * (size - n) / (size - 1)
  return float(np.mean(np.where(n > 0, expected, 0.0)))
