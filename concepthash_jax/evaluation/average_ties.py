"""`ties="average"`: the expected AP and P@k over all orders of tied items.

Needs only the per-distance counts of all and of relevant items: the expectation
has a closed form (harmonic numbers, plus a hypergeometric sum when R cuts inside
a tie block), evaluated in float64 on the host.
"""
import numpy as np
from scipy import special
from scipy import stats


def _harmonic_gap(start, count, psi):
  """H(start + count) - H(start) = sum_{p=1..count} 1 / (start + p), float64.

  `psi[k]` = digamma(k + 1) = H(k) - Euler's gamma: a lookup instead of two
  digamma calls per cell (same values; start and count are whole numbers).
  """
  start = np.asarray(start).astype(np.int64)
  return psi[start + np.asarray(count).astype(np.int64)] - psi[start]


def _expected_precision_sum(before, rel_before, size, rel, psi):
  """E[sum over relevant items of (relevant so far) / rank] for one tie block.

  The block's `size` items (`rel` relevant) sit at ranks before+1..before+size
  in uniformly random order; `rel_before` relevant items rank before it. With
  Pr(relevant at p) = rel/size and E[relevant among the first p-1 | relevant
  at p] = (p-1)(rel-1)/(size-1), the sum over p collapses to harmonic numbers.
  """
  size = np.asarray(size, np.float64)
  gap = _harmonic_gap(before, size, psi)
  with np.errstate(divide='ignore', invalid='ignore'):
    spread = np.where(size > 1, (rel - 1.0) / np.maximum(size - 1.0, 1.0), 0.0)
    term = (rel_before + 1.0) * gap + spread * (size - (before + 1.0) * gap)
    return np.where(size > 0, rel / np.maximum(size, 1.0) * term, 0.0)


def expected_average_precision(hist, hist_rel, R, *, max_grid=1 << 22):
  """Expected AP@R over all orders of Hamming-tied items (`ties="average"`).

  Args:
    hist: (Q, K + 1) items per distance.
    hist_rel: (Q, K + 1) relevant items per distance.
    R: cut-off, 1 <= R <= N.
    max_grid: bound on query x support cells per hypergeometric batch.

  Returns:
    (Q,) float64 expected AP@R (0 for queries with no relevant item in reach).
  """
  n = np.asarray(hist, np.float64)
  r = np.asarray(hist_rel, np.float64)
  before = np.cumsum(n, 1) - n
  rel_before = np.cumsum(r, 1) - r
  psi = special.digamma(np.arange(1.0, n.sum(1).max() + 2.0))  # up to H(N)
  inside = before + n <= R  # tie blocks wholly inside the top R
  block_sums = np.where(
      inside, _expected_precision_sum(before, rel_before, n, r, psi), 0.0)
  total = block_sums.sum(1)
  num_rel = np.where(inside, r, 0.0).sum(1)
  with np.errstate(divide='ignore', invalid='ignore'):
    ap = np.where(num_rel > 0, total / np.maximum(num_rel, 1.0), 0.0)
  # A block straddling R: X ~ Hypergeom(size, rel, m) of its relevant items
  # land in the m ranks left, and the AP denominator rel_before + X is random,
  # so average over X exactly.
  cut = (before < R) & (before + n > R)
  rows, cols = np.nonzero(cut)
  if rows.size == 0:
    return ap
  size, rel = n[rows, cols], r[rows, cols]
  start, rel_start = before[rows, cols], rel_before[rows, cols]
  draws = R - start
  lo = np.maximum(0.0, draws - (size - rel))
  hi = np.minimum(rel, draws)
  width = int((hi - lo).max()) + 1
  step = max(1, max_grid // width)
  for s in range(0, rows.size, step):
    sl = slice(s, s + step)
    x = lo[sl, None] + np.arange(width)
    valid = x <= hi[sl, None]
    pmf = np.where(valid, stats.hypergeom.pmf(
        x, size[sl, None], rel[sl, None], draws[sl, None]), 0.0)
    partial = _expected_precision_sum(start[sl, None], rel_start[sl, None],
                                      draws[sl, None], x, psi)
    denom = rel_start[sl, None] + x
    with np.errstate(divide='ignore', invalid='ignore'):
      value = np.where(valid & (denom > 0),
                       (total[rows[sl], None] + partial) / np.maximum(denom, 1.0),
                       0.0)
    ap[rows[sl]] = (pmf * value).sum(1)
  return ap


def expected_hits(hist, hist_rel, k):
  """E[relevant items in the top k] over tie orders (linearity of expectation)."""
  n = np.asarray(hist, np.float64)
  r = np.asarray(hist_rel, np.float64)
  before = np.cumsum(n, 1) - n
  take = np.clip(k - before, 0.0, n)  # items of each block inside the top k
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(n > 0, take * r / np.maximum(n, 1.0), 0.0).sum(1)
