"""The native kernel's binding: per-query statistics from `_hamming_src/stats.c` on CPU threads.

The kernel (built by `pip install`) walks the database once per query in
database order and reads the ranks off running histograms, with the GIL
released; it returns the same statistics, to the bit, as the XLA stages.
"""
import os

import numpy as np
import tqdm

try:  # Built by setup.py; optional, the XLA path covers every platform.
  from concepthash_jax import _hamming
except ImportError:  # pragma: no cover - depends on the install
  _hamming = None


def kernel_module():
  """The compiled `_hamming` extension, or None where it is not built."""
  return _hamming


def cpu_threads() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def words64(bits):
  """(N, W) uint32 code words -> (N, ceil(W / 2)) uint64 (same bit order)."""
  if bits.shape[1] % 2:
    bits = np.pad(bits, ((0, 0), (0, 1)))
  bits = bits.astype(np.uint64)
  return np.ascontiguousarray(bits[:, 0::2] | (bits[:, 1::2] << np.uint64(32)))


def per_query_stats(query, q_labels, db, d_labels, R, topk, ranked, *,
                  chunk_size, progress):
  """Per-query statistics from the native kernel (same contract as XLA's).

  Returns:
    dict: 'hist', 'hist_rel' (Q, K + 1) int64; when ranked also 'ap' (Q,)
    float64 and 'hits' (Q, len(topk)) int64.
  """
  qbits, dbits = words64(query.bits), words64(db.bits)
  num_q, num_db, bins = len(qbits), len(dbits), db.nbit + 1
  if q_labels.ndim == 1:
    # Relevant items of a query = its class's run in the label-sorted order,
    # ascending database index inside it (stable sort).
    order = np.argsort(d_labels, kind='stable')
    ordered = d_labels[order]
    q_lab, d_lab, order = None, None, order.astype(np.int64)
    qstart = np.searchsorted(ordered, q_labels, 'left').astype(np.int64)
    qend = np.searchsorted(ordered, q_labels, 'right').astype(np.int64)
  else:
    q_lab = np.ascontiguousarray(q_labels, np.uint32)
    d_lab = np.ascontiguousarray(d_labels, np.uint32)
    order = qstart = qend = None
  part = lambda x, sl: None if x is None else x[sl]
  out = {'hist': np.zeros((num_q, bins), np.int64),
         'hist_rel': np.zeros((num_q, bins), np.int64),
         'ap': np.zeros(num_q), 'hits': np.zeros((num_q, len(topk)), np.int64)}
  if chunk_size is None:  # ~2^30 pairs a call: bounded work per bar tick
    chunk_size = max(256, (1 << 30) // num_db)
  topk = np.asarray(topk, np.int64)
  threads = cpu_threads()
  for s in tqdm.trange(0, num_q, chunk_size, desc='retrieval metrics',
                       unit='chunk', disable=not progress, leave=False):
    sl = slice(s, s + chunk_size)
    _hamming.stats(qbits[sl], dbits, db.nbit, part(q_lab, sl), d_lab, order,
                   part(qstart, sl), part(qend, sl), ranked, R, topk,
                   out['hist'][sl], out['hist_rel'][sl], out['ap'][sl],
                   out['hits'][sl], threads)
  return out
