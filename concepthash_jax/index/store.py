"""Codes in a LanceDB table: local disk, object storage or a LanceDB server.

  index.to_store('data/codes.lance', table='codes')       # or s3://bucket/path
  ids, dist = search('data/codes.lance', query_codes, 10)  # full-code Hamming
  ids, dist = search('data/codes.lance', query_codes, 10, concepts=[1, 3])

A row holds `code` (fixed-size list of uint8: the code's bytes, padding bits
0), `position` (row in the index it came from), `id`, `label` and `path`.
LanceDB searches `code` with distance_type("hamming") (flat, or IVF_FLAT after
`create_ivf`). Its order among equal distances is not ours; `search` re-sorts
what it returns by (distance, position), so results equal `CodeIndex.search`
wherever the k-th distance is not tied. A concept-weighted query is not a
Hamming distance LanceDB computes: `search` then reads the code column in
batches and ranks it with the index's own exact search.
"""
import json

import numpy as np

from concepthash_jax import errors
from concepthash_jax import index as index_lib
from concepthash_jax import knn
from concepthash_jax.index import concepts as concepts_lib
from concepthash_jax.index import storage

_BATCH_ROWS = 1 << 18  # Rows per Arrow batch written or scanned.


class StoreError(errors.UserError, ValueError):
  """A store URI or table that cannot be used as asked."""


def _lancedb():
  try:
    import lancedb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('LanceDB is an optional extra: pip install -e ".[store]" '
                      '(or pip install lancedb).') from e
  return lancedb


def _table_meta(index) -> dict:
  return {'nbit': str(index.nbit), 'num_concepts': str(index.num_concepts or 0),
          'fingerprint': index.fingerprint or '',
          'info': json.dumps(index.info)}


def write(index, uri: str, *, table: str = 'codes', mode: str = 'create'):
  """Writes an index's codes, positions, ids, labels and paths to a table.

  Args:
    index: a CodeIndex.
    uri: LanceDB database URI (a folder, s3://..., gs://..., db://...).
    table: table name.
    mode: 'create' (refuse an existing table) or 'overwrite'.

  Returns:
    The LanceDB table.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  lancedb = _lancedb()
  num_bytes = index.words.shape[1] * 8
  schema = pa.schema([
      ('code', pa.list_(pa.uint8(), num_bytes)), ('position', pa.int64()),
      ('id', pa.int64()), ('label', pa.int64()), ('path', pa.string()),
  ], metadata={k.encode(): v.encode() for k, v in _table_meta(index).items()})

  def batches():
    for start in range(0, len(index), _BATCH_ROWS):
      stop = min(start + _BATCH_ROWS, len(index))
      rows = np.arange(start, stop)
      codes = np.ascontiguousarray(index.words[start:stop]).view(np.uint8)
      ids = rows if index.ids is None else np.asarray(index.ids[start:stop])
      labels = (np.full(len(rows), -1) if index.labels is None or
                np.ndim(index.labels) != 1 else index.labels[start:stop])
      paths = ([''] * len(rows) if index.paths is None
               else index.paths[start:stop])
      yield pa.RecordBatch.from_arrays([
          pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), num_bytes),
          pa.array(rows, pa.int64()), pa.array(ids, pa.int64()),
          pa.array(np.asarray(labels, np.int64)), pa.array(paths, pa.string()),
      ], schema=schema)

  db = lancedb.connect(uri)
  if mode == 'create' and table in _table_names(db):
    raise StoreError(f'{uri} already has a table {table!r}; choose another '
                     'table name, or write with mode="overwrite".')
  reader = pa.RecordBatchReader.from_batches(schema, batches())
  return db.create_table(table, reader, schema=schema, mode=mode)


def _table_names(db) -> list:
  listed = db.list_tables()
  return list(getattr(listed, 'tables', listed))


def open_table(uri: str, table: str = 'codes'):
  """(table, meta) of a store written by `write` (meta: strings of _table_meta)."""
  lancedb = _lancedb()
  try:
    db = lancedb.connect(uri)
    names = _table_names(db)
  except (OSError, ValueError, RuntimeError) as e:
    raise StoreError(f'{uri}: cannot open the store ({e}); give the URI '
                     'CodeIndex.to_store wrote.') from e
  if table not in names:
    raise StoreError(f'{uri} has no table {table!r} (it has {names}); give '
                     '--store_table or write it with CodeIndex.to_store.')
  tbl = db.open_table(table)
  meta = {k.decode(): v.decode() for k, v in (tbl.schema.metadata or {}).items()}
  if 'nbit' not in meta or 'code' not in tbl.schema.names:
    raise StoreError(f'{uri} table {table!r} was not written by '
                     'CodeIndex.to_store; write it with to_store.')
  return tbl, meta


def _empty_index(meta: dict, words=None, **fields):
  nbit = int(meta['nbit'])
  if words is None:
    words = np.zeros((0, -(-nbit // 64)), np.uint64)
  return index_lib.CodeIndex.from_words(
      words, nbit, num_concepts=int(meta.get('num_concepts', 0)) or None,
      fingerprint=meta.get('fingerprint') or None,
      info=json.loads(meta.get('info') or '{}'), **fields)


def describe(uri: str, table: str = 'codes'):
  """A CodeIndex with the store's nbit, num_concepts, fingerprint, info and no rows."""
  return _empty_index(open_table(uri, table)[1])


def rows(uri: str, positions, *, table: str = 'codes'):
  """The rows at `positions` as a small CodeIndex, and where each one is in it.

  Returns:
    (CodeIndex of the distinct rows, positions.shape int64 rows in it).
  """
  tbl, meta = open_table(uri, table)
  wanted, local = np.unique(np.asarray(positions), return_inverse=True)
  found = (tbl.search().where(
      f'position IN ({", ".join(map(str, wanted.tolist()))})')
           .select(['code', 'position', 'id', 'label', 'path'])
           .limit(None).to_arrow().sort_by('position'))
  codes = found['code'].combine_chunks().values.to_numpy()
  words = np.ascontiguousarray(codes.reshape(len(found), -1)).view('<u8')
  index = _empty_index(meta, words, labels=found['label'].to_numpy(),
                       ids=found['id'].to_numpy(),
                       paths=storage.Paths.from_strings(found['path'].to_pylist()))
  return index, local.reshape(np.shape(positions)).astype(np.int64)


def create_ivf(uri: str, table: str = 'codes', *, num_partitions: int = 16):
  """Builds LanceDB's IVF_FLAT index (Hamming) on the code column."""
  tbl, _ = open_table(uri, table)
  tbl.create_index(metric='hamming', vector_column_name='code',
                   index_type='IVF_FLAT', num_partitions=num_partitions,
                   replace=True)


def search(uri: str, query_codes, k: int, *, table: str = 'codes',
           concepts=None, weights=None, ids: bool = True):
  """k nearest rows of a store to each query.

  Args:
    uri: the store's URI; table: its table.
    query_codes: (Q, K) real codes or a `concepts.ConceptQuery`.
    k: neighbours per query.
    concepts, weights: a concept query, as `CodeIndex.search`.
    ids: return the rows' ids (True) or their positions.

  Returns:
    (ids or positions (Q, k) int64, distances (Q, k) int32), ascending
    distance, equal distances by ascending position.
  """
  tbl, meta = open_table(uri, table)
  nbit = int(meta['nbit'])
  num_concepts = int(meta.get('num_concepts', 0)) or None
  if isinstance(query_codes, concepts_lib.ConceptQuery):
    query_codes, weights = query_codes
  query_codes = np.atleast_2d(query_codes)
  if query_codes.shape[1] != nbit:
    raise StoreError(f'queries have {query_codes.shape[1]} bits, the store '
                     f'{uri} holds {nbit}-bit codes: built with another model.')
  weights = concepts_lib.concept_weights(num_concepts, concepts=concepts,
                                         weights=weights)
  query = index_lib.words64(query_codes)
  if weights is None:
    return _lancedb_hamming(tbl, query, k, ids)
  return _scan(tbl, query, k, nbit, num_concepts, weights, ids)


def _lancedb_hamming(tbl, query, k, ids):
  key = 'id' if ids else 'position'
  out_ids, out_dist = [], []
  for row in np.ascontiguousarray(query).view(np.uint8):
    found = (tbl.search(row, vector_column_name='code').distance_type('hamming')
             .select(['position', 'id', '_distance']).limit(k).to_arrow())
    dist = found['_distance'].to_numpy().astype(np.int64)
    position = found['position'].to_numpy()
    order = np.lexsort((position, dist))
    out_ids.append(found[key].to_numpy()[order])
    out_dist.append(dist[order])
  return np.stack(out_ids).astype(np.int64), np.stack(out_dist).astype(np.int32)


def _scan(tbl, query, k, nbit, num_concepts, weights, ids):
  """Exact weighted search over the code column, read in batches."""
  best_pos = np.zeros((len(query), 0), np.int64)
  best_dist = np.zeros((len(query), 0), np.int64)
  key_of = {}
  scan = tbl.search().select(['code', 'position', 'id']).limit(None)
  for batch in scan.to_batches(batch_size=_BATCH_ROWS):
    codes = batch['code'].values.to_numpy().reshape(len(batch), -1)
    words = np.ascontiguousarray(codes).view('<u8')
    position = batch['position'].to_numpy()
    found, dist = knn.Searcher(words, nbit, num_concepts=num_concepts).search(
        query, min(k, len(words)), weights=weights)
    if ids:
      key_of.update(zip(position[found].ravel().tolist(),
                        batch['id'].to_numpy()[found].ravel().tolist()))
    dist = np.concatenate([best_dist, dist], 1)
    pos = np.concatenate([best_pos, position[found]], 1)
    order = np.lexsort((pos, dist), axis=1)[:, :k]
    best_pos = np.take_along_axis(pos, order, 1)
    best_dist = np.take_along_axis(dist, order, 1)
  out = (np.vectorize(key_of.get, otypes=[np.int64])(best_pos) if ids
         else best_pos)
  return out.astype(np.int64), best_dist.astype(np.int32)
