"""Exact k-nearest-neighbour search over binary codes (Hamming, or by concept).

  words = knn.words64(db_codes)                  # (N, ceil(K / 64)) uint64
  searcher = knn.Searcher(words, nbit=K, num_concepts=M)
  positions, distances = searcher.search(knn.words64(query_codes), k=10)
  w = knn.concept_weights(M, concepts=[0, 3])    # concept 0 and 3 only
  positions, distances = searcher.search(query_words, 10, weights=w)

Distances are sum_m weights[m] * hamming(sub-code m) (plain Hamming without
weights); results are in ascending distance, ties by ascending database
position, the rule of `evaluation.map_at_r(..., ties="index")`.

Three engines, same results: 'brute' (native: one pass over the database per
block of queries, each query keeping its k best under a running threshold),
'multi_index' (native multi-index hashing, Norouzi, Punjani & Fleet 2012:
exact and sub-linear on codes with near neighbours, e.g. clustered real
codes) and 'xla' (jitted distances + numpy selection, for accelerators and
meshes, and wherever the native kernel is not built). 'auto' takes the native
engines on CPU and picks multi-index hashing where an estimate on a sample of
the database says it probes less than a brute pass costs (and its tables,
built on the first multi-index search and kept: a copy of the codes per table
plus 2^b bucket offsets, stay under 4 GiB).
"""
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from concepthash_jax import evaluation
from concepthash_jax.evaluation import native

_hamming = native.kernel_module()
_NATIVE = _hamming is not None and hasattr(_hamming, 'knn')

METHODS = ('auto', 'brute', 'multi_index', 'xla')
_PAIRS_PER_CALL = 1 << 30  # Query x item pairs per native call (bar ticks).
_XLA_PAIRS = 1 << 22  # Query chunk x database items per XLA distance call.
_MAX_TABLE_BITS = 24  # Widest multi-index substring (2^b + 1 bucket offsets).
_PROBE_COST = 64  # Cost of one bucket probe, in brute-force item checks.
_SAMPLE = 16384  # Database items the 'auto' estimate looks at.
_PROBE_QUERIES = 16  # Queries of the estimate, and of the batch-level check.
_AUTO_TABLE_BYTES = 1 << 32  # 'auto' builds no larger multi-index tables.


def words64(codes) -> np.ndarray:
  """(N, K) real codes (value > 0 is bit 1) or `PackedCodes` -> uint64 words.

  Returns:
    (N, ceil(K / 64)) uint64, C-contiguous: bit i at word i // 64, bit i % 64;
    padding bits are 0.
  """
  return native.words64(evaluation.pack_codes(codes).bits)


def concept_weights(num_concepts: int, *, concepts=None,
                    weights=None) -> Optional[np.ndarray]:
  """The per-concept weights of a query.

  Args:
    num_concepts: M.
    concepts: indices of the concepts to count (weight 1 each, others 0).
    weights: M non-negative integers. At most one of the two.

  Returns:
    (M,) int64 weights, or None when the query is the plain Hamming distance
    (neither given, or every weight 1).

  Raises:
    ValueError: naming the bad value.
  """
  if concepts is not None and weights is not None:
    raise ValueError('give concepts or weights, not both')
  if concepts is None and weights is None:
    return None
  if concepts is not None:
    concepts = np.asarray(concepts).reshape(-1)
    if concepts.size and not np.issubdtype(concepts.dtype, np.integer):
      raise ValueError(f'concepts must be integer indices, got {concepts}')
    bad = concepts[(concepts < 0) | (concepts >= num_concepts)]
    if bad.size:
      raise ValueError(f'concept {int(bad[0])} is out of range: there are '
                       f'{num_concepts} concepts (0 to {num_concepts - 1})')
    out = np.zeros(num_concepts, np.int64)
    out[concepts.astype(np.int64)] = 1
  else:
    raw = np.asarray(weights)
    if raw.shape != (num_concepts,):
      raise ValueError(f'weights must be {num_concepts} values (one per '
                       f'concept), got shape {raw.shape}')
    if not (np.issubdtype(raw.dtype, np.integer) or
            np.all(np.mod(raw, 1) == 0)):
      raise ValueError(f'weights must be integers, got {raw}')
    out = raw.astype(np.int64)
    negative = np.flatnonzero(out < 0)
    if negative.size:
      raise ValueError(f'weight {out[negative[0]]} of concept {negative[0]} '
                       'is negative; weights must be >= 0')
  if not out.any():
    raise ValueError('all concept weights are zero: the query would match '
                     'every item equally; choose at least one concept')
  return None if np.all(out == 1) else out


class _Tables(NamedTuple):
  """Multi-index hash tables (CSR), all tables' arrays concatenated."""
  starts: np.ndarray  # (m,) int64 first bit of each substring
  widths: np.ndarray  # (m,) int64 bits of each substring
  bases: np.ndarray  # (m,) int64 where each table's offsets begin
  offsets: np.ndarray  # (sum 2^b_t + 1,) uint32 bucket starts, per table
  items: np.ndarray  # (m * N,) uint32 database positions, sorted by key
  codes: np.ndarray  # (m * N, W) uint64 their codes, in the same order


def _table_split(nbit: int, num_db: int):
  """(starts, widths) of the substrings: about log2(N) bits each."""
  per_table = min(_MAX_TABLE_BITS, max(1.0, np.log2(max(num_db, 2))))
  num = max(int(round(nbit / per_table)), -(-nbit // _MAX_TABLE_BITS), 1)
  widths = np.full(num, nbit // num, np.int64)
  widths[num - nbit % num:] += 1  # the wider ones last
  starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
  return starts, widths


def _substrings(words, start: int, width: int) -> np.ndarray:
  """Bits [start, start + width) of every code as uint64 keys (width <= 32)."""
  word, shift = divmod(start, 64)
  keys = words[:, word] >> np.uint64(shift)
  if shift + width > 64:
    keys = keys | (words[:, word + 1] << np.uint64(64 - shift))
  return keys & np.uint64((1 << width) - 1)


def _plane_masks(weights, nbit: int, num_concepts: int) -> np.ndarray:
  """(P, W) uint64: plane p has the bits of concepts whose weight has bit p."""
  per_concept = nbit // num_concepts
  planes = max(1, int(weights.max()).bit_length())
  words = -(-nbit // 64)
  bits = np.zeros((planes, words * 64), bool)
  for p in range(planes):
    chosen = (weights >> p) & 1
    bits[p, :nbit] = np.repeat(chosen, per_concept) > 0
  weights64 = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
  return (bits.reshape(planes, words, 64) * weights64).sum(-1, dtype=np.uint64)


@jax.jit
def _xla_distances(query_bits, db_bits, masks):
  """(Q, N) distances sum_p 2^p popcount((q ^ d) & masks[p]) (uint32 words)."""
  xor = query_bits[:, None, :] ^ db_bits[None, :, :]
  out = jnp.zeros(xor.shape[:2], jnp.int32)
  for p in range(masks.shape[0]):
    count = jax.lax.population_count(xor & masks[p]).astype(jnp.int32)
    out = out + (jnp.sum(count, axis=-1) << p)
  return out


def _smallest_k(dist, k):
  """Exact k smallest entries per row, ties by ascending column.

  O(N) per row: introselect finds the k-th smallest distance t; every entry
  below t is taken, and among those equal to t the first k - #below by column
  (a full sort would cost O(N log N) per row).

  Args:
    dist: (Q, N) int distances.
    k: 1 <= k <= N.

  Returns:
    columns (Q, k) int64 and their distances (Q, k) int32, ascending.
  """
  rows = dist.shape[0]
  kth = np.partition(dist, k - 1, axis=1)[:, k - 1:k]
  below = dist < kth
  tied = dist == kth
  need = k - below.sum(1, keepdims=True)
  take = below | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
  columns = np.nonzero(take)[1].reshape(rows, k)  # ascending within each row
  picked = np.take_along_axis(dist, columns, 1)
  order = np.argsort(picked, axis=1, kind='stable')
  return (np.take_along_axis(columns, order, 1).astype(np.int64),
          np.take_along_axis(picked, order, 1).astype(np.int32))


def _native_ready() -> bool:
  """Whether the native k-NN kernel is built and the default device is a CPU."""
  return (_NATIVE and jax.devices()[0].platform == 'cpu' and
          jax.process_count() == 1)


def _check_method(method, masks) -> None:
  """ValueError when `method` is unknown or cannot search these queries."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; expected one of {METHODS}')
  if method in ('brute', 'multi_index') and not _NATIVE:
    raise ValueError(f'method={method!r} needs the native kernel, which is '
                     'not built; `pip install -e .` builds it (needs a C '
                     "compiler), or use method='xla'")
  if method == 'multi_index' and masks is not None:
    raise ValueError("method='multi_index' searches plain Hamming distance; "
                     "weighted queries go by 'brute' or 'xla'")


class Searcher:
  """Exact k-NN over a database of uint64 code words (see the module doc)."""

  def __init__(self, words, nbit: int, *, num_concepts: Optional[int] = None):
    """Wraps the database words without copying them.

    Args:
      words: (N, ceil(nbit / 64)) uint64, C-contiguous; may be an np.memmap
        (read in place, never loaded whole).
      nbit: K, bits per code.
      num_concepts: M (K % M == 0); needed for weighted queries.
    """
    if not isinstance(words, np.ndarray):
      raise TypeError(f'words must be a numpy uint64 array (words64), got '
                      f'{type(words).__name__}')
    num_words = -(-int(nbit) // 64)
    if nbit < 1 or words.dtype != np.uint64 or words.ndim != 2 or (
        words.shape[1] != num_words):
      raise ValueError(f'words must be (N, {num_words}) uint64 for {nbit}-bit '
                       f'codes (knn.words64), got {words.shape} {words.dtype}')
    if not words.flags.c_contiguous:
      raise ValueError('words must be C-contiguous (knn.words64 returns them '
                       'so); a strided view would be copied on every search')
    if len(words) < 1 or len(words) >= 1 << 32:
      raise ValueError(f'the database must hold 1 to 2^32 - 1 codes, got '
                       f'{len(words)}')
    if num_concepts is not None and (num_concepts < 1 or nbit % num_concepts):
      raise ValueError(f'{nbit}-bit codes cannot be split into {num_concepts} '
                       'equal concept sub-codes')
    self.words = words
    self.nbit = int(nbit)
    self.num_concepts = num_concepts
    self.last_method = None
    self._tables = None
    self._device_words = None  # The database on the device, for 'xla'.
    self._sample = None  # the 'auto' estimate's database sample and keys

  def __len__(self):
    """Number of database items."""
    return len(self.words)

  def search(self, query_words, k: int, *, weights=None, method: str = 'auto',
             threads: Optional[int] = None, progress: Optional[bool] = None):
    """Exact k nearest database items of every query.

    Args:
      query_words: (Q, W) uint64 words of the queries (`words64`).
      k: neighbours per query, 1 <= k <= N.
      weights: None (plain Hamming) or (M,) non-negative int weights per
        concept (`concept_weights`).
      method: 'auto', 'brute', 'multi_index' or 'xla' (see the module doc).
      threads: native threads (default: the CPU cores this process may use).
      progress: tqdm bar over query chunks; None = only for >= 1e10 pairs.

    Returns:
      (positions (Q, k) int64, distances (Q, k) int32): ascending distance,
      ties by ascending database position.
    """
    query = np.ascontiguousarray(query_words)
    num_db, num_words = self.words.shape
    if query.dtype != np.uint64 or query.ndim != 2 or (
        query.shape[1] != num_words):
      raise ValueError(f'query words must be (Q, {num_words}) uint64 '
                       f'(knn.words64), got {query.shape} {query.dtype}')
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
        1 <= k <= num_db):
      raise ValueError(f'k must be an integer in [1, {num_db}], got {k!r}')
    k = int(k)
    masks = self._masks(weights)
    _check_method(method, masks)
    if threads is None:
      threads = native.cpu_threads()
    if isinstance(threads, bool) or not isinstance(
        threads, (int, np.integer)) or threads < 1:
      raise ValueError(f'threads must be a positive integer, got {threads!r}')
    if progress is None:
      progress = len(query) * num_db >= 10**10
    positions = np.zeros((len(query), k), np.int64)
    distances = np.zeros((len(query), k), np.int32)
    if not len(query):
      return positions, distances
    if method == 'xla' or (method == 'auto' and not _native_ready()):
      self._xla(query, k, masks, positions, distances, progress)
      self.last_method = 'xla'
    elif method == 'brute' or masks is not None or not (
        method == 'multi_index' or self._multi_index_pays(query, k)):
      self._brute(query, k, masks, positions, distances, threads, progress)
      self.last_method = 'brute'
    else:
      self.last_method = self._multi_index(
          query, k, positions, distances, threads, progress,
          budget=None if method == 'multi_index' else num_db // 4)
    return positions, distances

  def _masks(self, weights) -> Optional[np.ndarray]:
    """(P, W) uint64 plane masks of `weights`, None for plain Hamming."""
    if weights is None:
      return None
    if self.num_concepts is None:
      raise ValueError('weighted queries need num_concepts: '
                       'Searcher(words, nbit, num_concepts=M)')
    weights = concept_weights(self.num_concepts, weights=weights)
    if weights is None:
      return None
    largest = int(weights.sum()) * (self.nbit // self.num_concepts)
    if largest >= 1 << 31:
      raise ValueError(f'weights {weights.tolist()} are too large: the '
                       'largest distance must stay below 2^31')
    return _plane_masks(weights, self.nbit, self.num_concepts)

  def _chunks(self, num_q, progress, desc):
    """Query slices of ~_PAIRS_PER_CALL pairs, with an optional bar."""
    size = max(1, _PAIRS_PER_CALL // len(self.words))
    starts = range(0, num_q, size)
    bar = tqdm.tqdm(starts, desc=desc, unit='chunk', disable=not progress,
                    leave=False)
    return (slice(s, s + size) for s in bar)

  def _brute(self, query, k, masks, positions, distances, threads, progress):
    """Native one-pass search with a running threshold."""
    for sl in self._chunks(len(query), progress, 'search'):
      _hamming.knn(query[sl], self.words, self.nbit, masks, k, positions[sl],
                   distances[sl], threads)

  def _xla(self, query, k, masks, positions, distances, progress):
    """Jitted distance chunks + exact numpy selection."""
    if masks is None:
      masks = np.full((1, self.words.shape[1]), ~np.uint64(0))
    to_32 = lambda w: np.ascontiguousarray(w).view(np.uint32)
    if self._device_words is None:  # Uploaded once, not per search.
      self._device_words = jnp.asarray(to_32(self.words))
    db_bits = self._device_words
    mask_bits = jnp.asarray(to_32(masks))
    num_q, num_db = len(query), len(self.words)
    chunk = max(1, min(_XLA_PAIRS // num_db, num_q))
    num_chunks = -(-num_q // chunk)
    # One compiled shape for every chunk: the last one is padded.
    bits = np.pad(to_32(query), ((0, num_chunks * chunk - num_q), (0, 0)))
    for c in tqdm.trange(num_chunks, desc='search', unit='chunk',
                         disable=not progress, leave=False):
      dist = np.asarray(_xla_distances(
          jnp.asarray(bits[c * chunk:(c + 1) * chunk]), db_bits, mask_bits))
      pos, dist = _smallest_k(dist, k)
      rows = slice(c * chunk, min((c + 1) * chunk, num_q))
      positions[rows] = pos[:rows.stop - rows.start]
      distances[rows] = dist[:rows.stop - rows.start]

  def _multi_index_pays(self, query, k) -> bool:
    """Estimate on a sample: multi-index probes cost less than a brute pass.

    On a strided sample of the database, the distances of a few queries give
    the radius a multi-index search needs (the smallest s with an expected k
    items below m * (s + 1)), hence its bucket probes and candidates, which
    are weighed against the N item checks of a brute pass.
    """
    num_db = len(self.words)
    starts, widths = _table_split(self.nbit, num_db)
    # Each table holds every code again (read in bucket order) + its offsets.
    table_bytes = len(widths) * num_db * (4 + 8 * self.words.shape[1]) + int(
        ((1 << widths) + 1).sum()) * 4
    if self._tables is None and table_bytes > _AUTO_TABLE_BYTES:
      return False
    if self._sample is None:
      sample = np.ascontiguousarray(self.words[::max(1, num_db // _SAMPLE)])
      self._sample = sample, [_substrings(sample, s, w)
                              for s, w in zip(starts, widths)]
    sample, sample_keys = self._sample
    scale = num_db / len(sample)
    probe = query[:_PROBE_QUERIES]
    # The k-th nearest of the whole database ~ the (k / scale)-th of the sample.
    rank = min(len(sample), max(1, int(np.ceil(k / scale))))
    nearest_pos = np.zeros((len(probe), rank), np.int64)
    nearest_dist = np.zeros((len(probe), rank), np.int32)
    _hamming.knn(probe, sample, self.nbit, None, rank, nearest_pos,
                 nearest_dist, 1)
    radius = np.minimum(nearest_dist[:, -1] // len(widths), int(widths.max()))
    probes = np.cumsum([sum(math.comb(int(w), s) for w in widths)
                        for s in range(int(widths.max()) + 1)])[radius]
    costs = probes * _PROBE_COST
    if np.median(costs) >= num_db / 8:  # the probes alone cost too much
      return False
    nearest = np.full((len(probe), len(sample)), 255, np.uint8)
    for start, width, keys in zip(starts, widths, sample_keys):
      query_keys = _substrings(probe, start, width)
      np.minimum(nearest, np.bitwise_count(query_keys[:, None] ^ keys[None]),
                 out=nearest)
    candidates = (nearest <= radius[:, None]).sum(1) * scale
    return float(np.median(costs + candidates)) < num_db / 8

  def _multi_index(self, query, k, positions, distances, threads, progress,
                   budget) -> str:
    """Native multi-index search; queries past `budget` go by brute force.

    Returns:
      The method that searched most queries ('multi_index' or 'brute').
    """
    tables = self._build_tables(threads)
    unlimited = budget is None
    budget = np.iinfo(np.int64).max if unlimited else budget
    fell_back = np.zeros(len(query), np.uint8)
    done = 0
    if not unlimited:
      # Batch-level rule: when most of the first queries overrun the budget,
      # the rest go by a brute pass (cheaper per query than a failed probe).
      first = slice(0, min(_PROBE_QUERIES, len(query)))
      _hamming.multi_index(query[first], self.words, self.nbit, k, *tables,
                           budget, _PROBE_COST, positions[first],
                           distances[first], fell_back[first], threads)
      done = first.stop
      if fell_back[first].mean() > 0.5:
        rest = slice(done, len(query))
        if rest.stop > rest.start:
          self._brute(query[rest], k, None, positions[rest], distances[rest],
                      threads, progress)
        return 'brute'
    for sl in self._chunks(len(query) - done, progress, 'search'):
      sl = slice(sl.start + done, min(sl.stop + done, len(query)))
      _hamming.multi_index(query[sl], self.words, self.nbit, k, *tables,
                           budget, _PROBE_COST, positions[sl], distances[sl],
                           fell_back[sl], threads)
    return 'multi_index'

  def _build_tables(self, threads: int) -> _Tables:
    """The multi-index tables, built on first use and kept."""
    if self._tables is None:
      num_db = len(self.words)
      starts, widths = _table_split(self.nbit, num_db)
      sizes = (1 << widths) + 1
      bases = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
      offsets = np.empty(int(sizes.sum()), np.uint32)
      items = np.empty(len(widths) * num_db, np.uint32)
      codes = np.empty((len(widths) * num_db, self.words.shape[1]), np.uint64)
      _hamming.build_tables(self.words, self.nbit, starts, widths, bases,
                            offsets, items, codes, threads)
      self._tables = _Tables(starts, widths, bases, offsets, items, codes)
    return self._tables

