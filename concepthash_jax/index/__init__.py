"""A searchable binary-code index: exact (concept-weighted) Hamming k-NN on disk.

  index = CodeIndex(db_codes, db_labels, num_concepts=4)   # value > 0 is bit 1
  index.save('db.chindex'); index = CodeIndex.load('db.chindex')  # memory-mapped
  ids, dist = index.search(query_codes, k=10)               # (Q, 10) each, exact
  ids, dist = index.search(query_codes, 10, concepts=[1, 3])  # those sub-codes only
  ids, dist = index.search(query_codes, 10, weights=[1, 0, 2, 1])
  ids, dist = index.search(compose([(a, [0, 1]), (b, [2])], 4), 10)
  index = index.extend(new_codes, new_labels, paths=new_paths)  # old codes kept
  metrics = index.evaluate(query_codes, query_labels)       # mAP@R, P@k, PR curve
  index.to_store('data/codes.lance', table='codes')          # extra [store]

Search ranks by distance with ties broken by ascending database position, the
same rule as `evaluation.map_at_r(..., ties="index")`. The file format is in
`storage`; concept weights and composite queries in `concepts`; LanceDB in
`store`; FAISS (`to_faiss`, extra [faiss]) is kept for its HNSW graphs.
"""
from typing import Optional

import numpy as np

from concepthash_jax import evaluation
from concepthash_jax import knn
from concepthash_jax.index import storage
from concepthash_jax.index.concepts import compose
from concepthash_jax.index.concepts import concept_distances
from concepthash_jax.index.concepts import concept_weights
from concepthash_jax.index.concepts import ConceptQuery
from concepthash_jax.index.storage import IndexFileError
from concepthash_jax.index.storage import is_index

__all__ = ['CodeIndex', 'ConceptQuery', 'IndexFileError', 'compose',
           'concept_distances', 'concept_weights', 'faiss_search', 'is_index',
           'words64']


words64 = knn.words64


def _nbit_of(codes) -> int:
  if isinstance(codes, evaluation.PackedCodes):
    return codes.nbit
  return np.shape(codes)[-1]


class CodeIndex:
  """Codes of a database (uint64 words), with optional labels, ids and paths."""

  def __init__(self, codes, labels=None, *, ids=None, paths=None, info=None,
               num_concepts: Optional[int] = None,
               fingerprint: Optional[str] = None):
    """Builds the index.

    Args:
      codes: (N, K) real codes (value > 0 is bit 1) or `evaluation.PackedCodes`.
      labels: optional (N,) int or (N, C) multi-hot labels, for `evaluate`.
      ids: optional (N,) identifiers returned by `search` instead of positions.
      paths: optional (N,) image file of each item ('' when it has none).
      info: optional JSON-able dict saved with the index (where the database
        came from, its class names).
      num_concepts: M, for concept queries (default info['num_concepts']).
      fingerprint: of the model that encoded the codes (`ConceptHasher.fingerprint`).
    """
    words = words64(codes)
    info = dict(info or {})
    if num_concepts is None:
      num_concepts = info.get('num_concepts')
    self._init(words, _nbit_of(codes), labels=labels, ids=ids,
               paths=None if paths is None else storage.Paths.from_strings(paths),
               info=info, num_concepts=num_concepts, fingerprint=fingerprint)

  def _init(self, words, nbit, *, labels, ids, paths, info, num_concepts,
            fingerprint):
    self.words, self._nbit = words, int(nbit)
    as_array = lambda x: x if x is None or isinstance(x, np.ndarray) else (
        np.asarray(x))  # An np.memmap stays one: nothing is read.
    self.labels, self.ids = as_array(labels), as_array(ids)
    self.paths, self.info = paths, info
    self.num_concepts = None if num_concepts is None else int(num_concepts)
    self.fingerprint = fingerprint
    if self.num_concepts and self._nbit % self.num_concepts:
      raise ValueError(f'{self._nbit}-bit codes cannot be split into '
                       f'{self.num_concepts} concepts')
    for name, value in (('labels', self.labels), ('ids', self.ids),
                        ('paths', self.paths)):
      if value is not None and len(value) != len(words):
        raise ValueError(f'{name} has {len(value)} rows, codes have {len(words)}')
    self._searcher = None

  @classmethod
  def from_words(cls, words, nbit, **fields) -> 'CodeIndex':
    """An index over (N, ceil(K / 64)) uint64 words (e.g. memory-mapped)."""
    index = cls.__new__(cls)
    fields.setdefault('info', {})
    for name in ('labels', 'ids', 'paths', 'num_concepts', 'fingerprint'):
      fields.setdefault(name, None)
    index._init(words, nbit, **fields)  # pylint: disable=protected-access
    return index

  def __len__(self):
    """Number of database items."""
    return len(self.words)

  @property
  def nbit(self) -> int:
    """Code length K."""
    return self._nbit

  @property
  def packed(self) -> evaluation.PackedCodes:
    """The codes as 32-bit words (what `evaluation` reads)."""
    bits = np.ascontiguousarray(self.words).view('<u4')
    return evaluation.PackedCodes(bits[:, :-(-self.nbit // 32)], self.nbit)

  # -------------------------------------------------------------- search

  def _query_words(self, query_codes) -> np.ndarray:
    """uint64 words of the queries; ValueError when their length is not ours."""
    nbit = _nbit_of(query_codes)
    if nbit != self.nbit:
      raise ValueError(f'queries have {nbit} bits, the index {self.nbit}: '
                       'the index was built with another model; rebuild it '
                       'with the model that encodes the queries.')
    return words64(query_codes)

  def search_positions(self, query_codes, k: int, *, concepts=None,
                       weights=None):
    """Like `search`, returning database positions (not ids)."""
    if isinstance(query_codes, ConceptQuery):
      if concepts is not None or weights is not None:
        raise ValueError('a composite query carries its own weights; give no '
                         'concepts or weights with it')
      query_codes, weights = query_codes
    query_codes = np.atleast_2d(query_codes) if not isinstance(
        query_codes, evaluation.PackedCodes) else query_codes
    weights = concept_weights(self.num_concepts, concepts=concepts,
                              weights=weights)
    query = self._query_words(query_codes)
    if not 1 <= k <= len(self):
      raise ValueError(f'k must be in [1, {len(self)}], got {k}')
    if self._searcher is None:
      self._searcher = knn.Searcher(self.words, self.nbit,
                                    num_concepts=self.num_concepts)
    return self._searcher.search(query, int(k), weights=weights)

  def search(self, query_codes, k: int, *, concepts=None, weights=None):
    """Exact k nearest database items.

    Args:
      query_codes: (Q, K) / (K,) real codes, `evaluation.PackedCodes`, or a
        `ConceptQuery` (from `compose`).
      k: neighbours per query, 1 <= k <= len(self).
      concepts: count only these concepts' sub-codes (needs num_concepts).
      weights: (M,) non-negative int weight of each concept's distance.

    Returns:
      (ids, distances), each (Q, k): `ids` are database positions (int64) or
      the `ids` given at construction; distances are int32 (weighted sums of
      sub-code distances), ascending, ties by ascending database position.
    """
    positions, distances = self.search_positions(
        query_codes, k, concepts=concepts, weights=weights)
    return (positions if self.ids is None else np.asarray(self.ids)[positions],
            distances)

  def codes(self, positions) -> np.ndarray:
    """±1 int8 codes (n, K) of database rows, unpacked from the words."""
    rows = np.ascontiguousarray(self.words[np.asarray(positions)]).view(np.uint8)
    bits = np.unpackbits(rows, axis=-1, bitorder='little')[:, :self.nbit]
    return np.where(bits > 0, 1, -1).astype(np.int8)

  # ------------------------------------------------------------ growing

  def _joined(self, codes, labels, ids, paths):
    """The arrays of this index then new items, as lists of parts per field.

    Fields this index has and the new items lack get -1 (labels, ids) or ''
    (paths), and the other way round.
    """
    new = CodeIndex(codes, labels, ids=ids, paths=paths)
    if new.nbit != self.nbit:
      raise ValueError(f'new codes have {new.nbit} bits, the index {self.nbit}')
    parts = {'words': [self.words, new.words]}
    for name in ('labels', 'ids'):
      old, added = getattr(self, name), getattr(new, name)
      if old is None and added is None:
        continue
      if added is not None and old is not None and added.shape[1:] != old.shape[1:]:
        raise ValueError(f'new {name} have shape {added.shape[1:]} per item, '
                         f'the index {old.shape[1:]}')
      dtype = (old if old is not None else added).dtype
      fill = lambda num, like: np.full((num, *like.shape[1:]), -1, dtype)
      parts[name] = [fill(len(self), added) if old is None else old,
                     fill(len(new), old) if added is None else added.astype(dtype)]
    if self.paths is not None or new.paths is not None:
      blank = lambda num: storage.Paths.from_strings([''] * num)
      old = blank(len(self)) if self.paths is None else self.paths
      added = blank(len(new)) if new.paths is None else new.paths
      parts['path_bytes'] = [np.asarray(old.blob, np.uint8), added.blob]
      parts['path_offsets'] = [np.asarray(old.offsets, np.int64),
                               added.offsets[1:] + old.offsets[-1]]
    return parts

  def extend(self, codes, labels=None, *, ids=None, paths=None) -> 'CodeIndex':
    """A new index in memory: this one's items, then these (not re-encoded).

    To grow an index file without reading its rows into memory, use
    `append_to_file`.
    """
    parts = {name: np.concatenate([np.asarray(p) for p in value])
             for name, value in self._joined(codes, labels, ids, paths).items()}
    return CodeIndex.from_words(
        parts['words'], self.nbit, labels=parts.get('labels'),
        ids=parts.get('ids'), paths=None if 'path_offsets' not in parts else
        storage.Paths(parts['path_bytes'], parts['path_offsets']),
        info=dict(self.info), num_concepts=self.num_concepts,
        fingerprint=self.fingerprint)

  # ------------------------------------------------------------ on disk

  def _meta(self, count: int, info: dict) -> dict:
    return {'nbit': self.nbit, 'num_concepts': self.num_concepts,
            'count': count, 'fingerprint': self.fingerprint, 'info': info,
            'class_names': info.get('class_names')}

  def save(self, path: str) -> None:
    """Writes the index atomically to `path` (refused over a file not an index)."""
    arrays = {'words': self.words}
    for name, value in (('labels', self.labels), ('ids', self.ids)):
      if value is not None:
        arrays[name] = value
    if self.paths is not None:
      arrays['path_bytes'] = np.asarray(self.paths.blob, np.uint8)
      arrays['path_offsets'] = np.asarray(self.paths.offsets, np.int64)
    storage.write(path, self._meta(len(self), self.info), arrays)

  def append_to_file(self, path: str, codes, labels=None, *, ids=None,
                     paths=None, info: Optional[dict] = None) -> int:
    """Writes this index then new items to `path`, streaming the old rows.

    The usual use: `CodeIndex.load(path).append_to_file(path, new_codes, ...)`
    grows an index file atomically; the old rows are copied from the memory
    map in blocks, never loaded whole, and never re-encoded.

    Args:
      path: the file to write (the loaded index's own file is fine).
      codes, labels, ids, paths: the new items, as `CodeIndex`.
      info: replaces the index's info (e.g. grown class names).

    Returns:
      The number of items now in the file.
    """
    parts = self._joined(codes, labels, ids, paths)
    count = sum(len(p) for p in parts['words'])
    storage.write(path, self._meta(count, dict(info or self.info)), parts)
    return count

  @classmethod
  def load(cls, path: str) -> 'CodeIndex':
    """Opens an index file (memory-mapped) or a format-1 .npz (loaded).

    Raises:
      IndexFileError: a folder, a truncated or foreign file, bad codes.
    """
    meta, arrays = storage.read(path)
    words = arrays['words']
    if words.dtype != np.uint64 or words.ndim != 2 or (
        words.shape[1] * 64 < int(meta.get('nbit', 0))):
      raise IndexFileError(f'{path}: its codes are {words.dtype} '
                           f'{words.shape}, not packed bits; rebuild the index.')
    paths = None
    if 'path_offsets' in arrays:
      paths = storage.Paths(arrays['path_bytes'], arrays['path_offsets'])
    try:
      return cls.from_words(
          words, meta['nbit'], labels=arrays.get('labels'),
          ids=arrays.get('ids'), paths=paths, info=meta.get('info') or {},
          num_concepts=meta.get('num_concepts'),
          fingerprint=meta.get('fingerprint'))
    except (KeyError, ValueError) as e:
      raise IndexFileError(f'{path}: inconsistent index ({e}); rebuild it.'
                           ) from e

  # ------------------------------------------------------------- others

  def to_faiss(self, kind: str = 'flat', *, hnsw_neighbors: int = 32):
    """This database as a FAISS binary index (needs the [faiss] extra).

    Args:
      kind: 'flat' (faiss.IndexBinaryFlat, exact; ties in FAISS's heap order,
        not by position) or 'hnsw' (faiss.IndexBinaryHNSW, approximate).
      hnsw_neighbors: HNSW graph degree M.

    Returns:
      The FAISS index; its dimension is the packed width (64 bits a word,
      padding bits 0 in database and queries alike, so distances are exact).
    """
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('FAISS is an optional extra: pip install -e ".[faiss]" '
                        '(or pip install faiss-cpu).') from e
    dim = self.words.shape[1] * 64
    if kind == 'flat':
      index = faiss.IndexBinaryFlat(dim)
    elif kind == 'hnsw':
      index = faiss.IndexBinaryHNSW(dim, hnsw_neighbors)
    else:
      raise ValueError(f"Unknown FAISS index kind {kind!r}; valid: 'flat', 'hnsw'")
    index.add(_as_bytes(self.words))
    return index

  def to_store(self, uri: str, *, table: str = 'codes', mode: str = 'create'):
    """Writes the codes to a LanceDB table (extra [store]); see `store`."""
    from concepthash_jax.index import store  # pylint: disable=g-import-not-at-top
    return store.write(self, uri, table=table, mode=mode)

  def evaluate(self, query_codes, query_labels, **kwargs) -> dict:
    """Retrieval metrics of queries against this database.

    Args:
      query_codes: (Q, K) real codes or `evaluation.PackedCodes`.
      query_labels: (Q,) int or (Q, C) multi-hot, same kind as the index's.
      **kwargs: passed to `evaluation.retrieval_metrics` (R, ties, topk, ...).

    Returns:
      The `evaluation.retrieval_metrics` dict (mAP@R, P@k, PR curve).
    """
    if self.labels is None:
      raise ValueError('this index was built without labels')
    return evaluation.retrieval_metrics(query_codes, query_labels, self.packed,
                                        np.asarray(self.labels), **kwargs)


def _as_bytes(words):
  """(N, W) uint64 words -> (N, 8W) uint8 for FAISS (same bit order)."""
  return np.ascontiguousarray(words).view(np.uint8)


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
  query = words64(query_codes)
  if query.shape[1] * 64 != faiss_index.d:
    raise ValueError(f'queries pack to {query.shape[1] * 64} bits, the '
                     f'FAISS index has {faiss_index.d}: built with another model.')
  distances, positions = faiss_index.search(_as_bytes(query), int(k))
  return positions.astype(np.int64), distances.astype(np.int32)
