"""A searchable binary-code index: exact Hamming k-NN, saved as packed bits.

  index = CodeIndex(db_codes, db_labels)         # real codes, value > 0 is bit 1
  index.save('db.index.npz'); index = CodeIndex.load('db.index.npz')
  ids, dist = index.search(query_codes, k=10)     # (Q, 10) each, exact
  metrics = index.evaluate(query_codes, query_labels)  # mAP@R, P@k, PR curve
  flat = index.to_faiss('flat')                   # optional extra [faiss]
  ids, dist = faiss_search(flat, query_codes, k=10)

FAISS (`pip install -e ".[faiss]"`) is for databases too large for the exact
search here: `IndexBinaryFlat` is exact (same distances as `search`, but ties
are ordered by FAISS's heap, not by database position), `IndexBinaryHNSW`
approximate. The project's exact search stays the default.

Codes are stored 32 bits a word (K = 64 bits -> 8 bytes per item). Search
ranks by Hamming distance with ties broken by ascending database position, the
same rule as `evaluation.map_at_r(..., ties="index")`. Saving and loading are
this module's only file I/O: the index is an artifact users keep.
"""
import json
from typing import Optional
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from concepthash_jax import evaluation

_FORMAT = 1  # Bumped when the saved layout changes.
_ITEMS_PER_CHUNK = 1 << 22  # Query chunk x database items per distance call.


@jax.jit
def _distances(query_bits, db_bits):
  """(Q, N) Hamming distances as int16 (half the transfer of int32)."""
  return evaluation.hamming_distance(query_bits, db_bits).astype(jnp.int16)


def _smallest_k(dist, k):
  """Exact k smallest entries per row, ties by ascending column.

  O(N) per row: introselect finds the k-th smallest distance t; every entry
  below t is taken, and among those equal to t the first k - #below by column.
  lax.top_k (a full sort on CPU) measured 15x slower at 1M items.

  Args:
    dist: (Q, N) int distances.
    k: 1 <= k <= N.

  Returns:
    columns (Q, k) int64 and their distances (Q, k), ascending.
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
          np.take_along_axis(picked, order, 1))


class CodeIndex:
  """Binary codes of a database (bit-packed), with optional labels and ids."""

  def __init__(self, codes, labels=None, *, ids=None, paths=None, info=None):
    """Builds the index.

    Args:
      codes: (N, K) real codes (value > 0 is bit 1) or `evaluation.PackedCodes`.
      labels: optional (N,) int or (N, C) multi-hot labels, for `evaluate`.
      ids: optional (N,) identifiers returned by `search` instead of positions
        (e.g. dataset indices).
      paths: optional (N,) image file of each item ('' when it has none).
      info: optional JSON-able dict saved with the index (e.g. where the
        database came from and its class names).
    """
    self.packed = evaluation.pack_codes(codes)
    num = len(self.packed.bits)
    self.labels = None if labels is None else np.asarray(labels)
    self.ids = None if ids is None else np.asarray(ids)
    self.paths = None if paths is None else np.asarray(paths, dtype=str)
    self.info = dict(info or {})
    for name, value in (('labels', self.labels), ('ids', self.ids),
                        ('paths', self.paths)):
      if value is not None and len(value) != num:
        raise ValueError(f'{name} has {len(value)} rows, codes have {num}')

  def __len__(self):
    """Number of database items."""
    return len(self.packed.bits)

  @property
  def nbit(self) -> int:
    """Code length K."""
    return self.packed.nbit

  def search(self, query_codes, k: int, *, chunk_size: Optional[int] = None,
             progress: Optional[bool] = None):
    """Exact k nearest database items by Hamming distance.

    Args:
      query_codes: (Q, K) real codes or `evaluation.PackedCodes`.
      k: neighbours per query, 1 <= k <= len(self).
      chunk_size: queries per device call (default ~4M query-item pairs).
      progress: tqdm bar over chunks; None = only for >= 1e9 pairs.

    Returns:
      (ids, distances), each (Q, k): `ids` are database positions (int64) or
      the `ids` given at construction; distances are int32, ascending, ties
      by ascending database position.
    """
    query = self._check_queries(query_codes)
    num_db, num_q = len(self), len(query.bits)
    if not 1 <= k <= num_db:
      raise ValueError(f'k must be in [1, {num_db}], got {k}')
    db_bits = jnp.asarray(self.packed.bits)
    if chunk_size is None:
      chunk_size = max(1, _ITEMS_PER_CHUNK // num_db)
    chunk_size = max(1, min(int(chunk_size), num_q))
    num_chunks = -(-num_q // chunk_size)
    bits = np.pad(query.bits, ((0, num_chunks * chunk_size - num_q), (0, 0)))
    if progress is None:
      progress = num_q * num_db >= 10**9
    positions, distances = [], []
    for c in tqdm.trange(num_chunks, desc='search', unit='chunk',
                         disable=not progress, leave=False):
      dist = np.asarray(_distances(
          jnp.asarray(bits[c * chunk_size:(c + 1) * chunk_size]), db_bits))
      pos, dist = _smallest_k(dist, int(k))
      positions.append(pos)
      distances.append(dist.astype(np.int32))
    positions = np.concatenate(positions)[:num_q]
    distances = np.concatenate(distances)[:num_q]
    ids = positions if self.ids is None else self.ids[positions]
    return ids, distances

  def codes(self, positions) -> np.ndarray:
    """±1 int8 codes (n, K) of database rows, unpacked from the bits."""
    words = self.packed.bits[np.asarray(positions)]
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    bits = bits.reshape(len(words), -1)[:, :self.nbit]
    return np.where(bits > 0, 1, -1).astype(np.int8)

  def _check_queries(self, query_codes) -> evaluation.PackedCodes:
    """Packed queries; ValueError when their code length is not the index's."""
    query = evaluation.pack_codes(query_codes)
    if query.nbit != self.nbit:
      raise ValueError(f'queries have {query.nbit} bits, the index {self.nbit}: '
                       'the index was built with another model; rebuild it '
                       'with the model that encodes the queries.')
    return query

  def to_faiss(self, kind: str = 'flat', *, hnsw_neighbors: int = 32):
    """This database as a FAISS binary index (needs the [faiss] extra).

    Args:
      kind: 'flat' (faiss.IndexBinaryFlat, exact) or 'hnsw'
        (faiss.IndexBinaryHNSW, approximate).
      hnsw_neighbors: HNSW graph degree M.

    Returns:
      The FAISS index; its dimension is the packed width (32 bits a word,
      padding bits 0 in database and queries alike, so distances are exact).
    """
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('FAISS is an optional extra: pip install -e ".[faiss]" '
                        '(or pip install faiss-cpu).') from e
    dim = self.packed.bits.shape[1] * 32
    if kind == 'flat':
      index = faiss.IndexBinaryFlat(dim)
    elif kind == 'hnsw':
      index = faiss.IndexBinaryHNSW(dim, hnsw_neighbors)
    else:
      raise ValueError(f"Unknown FAISS index kind {kind!r}; valid: 'flat', 'hnsw'")
    index.add(_as_bytes(self.packed.bits))
    return index

  def evaluate(self, query_codes, query_labels, **kwargs) -> dict:
    """Retrieval metrics of queries against this database.

    Args:
      query_codes: (Q, K) real codes or `evaluation.PackedCodes`.
      query_labels: (Q,) int or (Q, C) multi-hot, same kind as the index's.
      **kwargs: passed to `evaluation.retrieval_metrics` (R, ties, topk, ...).

    Returns:
      The `evaluation.retrieval_metrics` dict (mAP@R, P@k, radius precision,
      PR curve).
    """
    if self.labels is None:
      raise ValueError('this index was built without labels')
    return evaluation.retrieval_metrics(query_codes, query_labels, self.packed,
                                        self.labels, **kwargs)

  def save(self, path: str) -> None:
    """Writes the index to `path` (an .npz; the name is kept as given)."""
    arrays = {'format': np.int32(_FORMAT), 'bits': self.packed.bits,
              'nbit': np.int32(self.nbit)}
    if self.labels is not None:
      arrays['labels'] = self.labels
    if self.ids is not None:
      arrays['ids'] = self.ids
    if self.paths is not None:
      arrays['paths'] = self.paths
    if self.info:
      arrays['info'] = np.asarray(json.dumps(self.info))
    with open(path, 'wb') as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: str) -> 'CodeIndex':
    """Reads an index written by `save` (ValueError naming a corrupt file)."""
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
      fmt = int(arrays['format'])
      packed = evaluation.PackedCodes(arrays['bits'], int(arrays['nbit']))
      info = json.loads(str(arrays['info'])) if 'info' in arrays else None
    except (OSError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as e:
      raise ValueError(f'{path} is not a readable code index ({e}); rebuild it.'
                       ) from e
    if fmt != _FORMAT:
      raise ValueError(f'{path}: index format {fmt}, this code reads '
                       f'{_FORMAT}; rebuild the index.')
    return cls(packed, arrays.get('labels'), ids=arrays.get('ids'),
               paths=arrays.get('paths'), info=info)


def concept_distances(query_codes, db_codes, num_concepts: int):
  """Hamming distance of every concept's sub-code (K/M bits each).

  Args:
    query_codes: (Q, K) real codes (value > 0 is bit 1).
    db_codes: (N, K) real codes.
    num_concepts: M; K must be divisible by it.

  Returns:
    (Q, N, M) int32; summed over M it is the full Hamming distance.
  """
  query, db = np.asarray(query_codes) > 0, np.asarray(db_codes) > 0
  nbit = query.shape[1]
  if nbit % num_concepts or db.shape[1] != nbit:
    raise ValueError(f'codes of {nbit} and {db.shape[1]} bits cannot be split '
                     f'into {num_concepts} equal sub-codes')
  query = query.reshape(len(query), 1, num_concepts, -1)
  db = db.reshape(1, len(db), num_concepts, -1)
  return (query != db).sum(-1, dtype=np.int32)


def _as_bytes(words):
  """(N, W) uint32 packed codes -> (N, 4W) uint8 for FAISS (same bit count)."""
  return np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.uint8)


def faiss_search(faiss_index, query_codes, k: int):
  """k nearest neighbours through a `CodeIndex.to_faiss` index.

  Args:
    faiss_index: from `CodeIndex.to_faiss`.
    query_codes: (Q, K) real codes or `evaluation.PackedCodes`.
    k: neighbours per query.

  Returns:
    (positions (Q, k) int64, distances (Q, k) int32), ascending distance. For
    'flat' the distances equal `CodeIndex.search`'s; equal-distance items may
    come in another order (FAISS does not break ties by database position).
  """
  query = evaluation.pack_codes(query_codes)
  if query.bits.shape[1] * 32 != faiss_index.d:
    raise ValueError(f'queries pack to {query.bits.shape[1] * 32} bits, the '
                     f'FAISS index has {faiss_index.d}: built with another model.')
  distances, positions = faiss_index.search(_as_bytes(query.bits), int(k))
  return positions.astype(np.int64), distances.astype(np.int32)
