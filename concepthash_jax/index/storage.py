"""The index file: a magic header, JSON metadata, 64-byte-aligned raw arrays.

  offset 0   MAGIC (8 bytes) | header length H (uint64, little-endian)
  offset 16  H bytes of UTF-8 JSON: format, nbit, num_concepts, count,
             fingerprint, info, class_names and the array table
             {name: {"offset", "dtype", "shape"}}
  then       each array's raw bytes, C order, at a multiple of 64 bytes

Arrays: 'words' (N, W) uint64 codes (bit i at word i // 64, bit i % 64: what
`knn.Searcher` reads), optional 'labels', 'ids', and the paths as one UTF-8
blob 'path_bytes' with 'path_offsets' (N + 1,) int64. `read` maps every array
with np.memmap, so opening a 100M-item index reads the header only and the
search never makes one Python object per item.

Format 1 (a .npz of 32-bit words) is still read, fully into memory, so an index
kept in it stays usable; `write` always writes the current format.
"""
import json
import os
import struct
import zipfile

import numpy as np

from concepthash_jax import errors
from concepthash_jax import safe_files
from concepthash_jax.evaluation import native

MAGIC = b'\x93CHINDEX'
FORMAT = 2
LEGACY_FORMAT = 1  # A .npz of 32-bit words: read, never written.
_ALIGN = 64
_PREFIX = struct.Struct('<8sQ')
_COPY_ROWS = 1 << 20  # Rows per write when streaming a mapped array.


class IndexFileError(errors.UserError, ValueError):
  """A path given as an index is not a readable code index."""


class Paths:
  """Image paths of an index, decoded one at a time from a UTF-8 blob."""

  def __init__(self, blob, offsets):
    self.blob, self.offsets = blob, offsets

  @classmethod
  def from_strings(cls, strings) -> 'Paths':
    encoded = [str(s).encode('utf-8') for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return cls(np.frombuffer(b''.join(encoded), np.uint8), offsets)

  def __len__(self):
    return len(self.offsets) - 1

  def _one(self, i) -> str:
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f'path {i} of {len(self)}')
    return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode('utf-8')

  def __getitem__(self, item):
    if isinstance(item, (int, np.integer)):
      return self._one(item)
    rows = np.arange(len(self))[item] if isinstance(item, slice) else item
    return [self._one(i) for i in np.asarray(rows).ravel()]

  def __iter__(self):
    return (self._one(i) for i in range(len(self)))


def is_index(path: str) -> bool:
  """True when `path` is an index file this product wrote (any format)."""
  try:
    with open(path, 'rb') as f:
      if f.read(len(MAGIC)) == MAGIC:
        return True
    with zipfile.ZipFile(path) as archive:
      return {'format.npy', 'bits.npy', 'nbit.npy'} <= set(archive.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def _aligned(offset: int) -> int:
  return -(-offset // _ALIGN) * _ALIGN


def write(path: str, meta: dict, arrays: dict) -> None:
  """Writes an index file atomically; refuses to replace a file not ours.

  Args:
    path: destination; an existing file must be an index (any format).
    meta: JSON-able fields (nbit, num_concepts, fingerprint, info, ...).
    arrays: name -> array, or a list of arrays written one after the other
      (rows concatenated); np.memmaps are copied in row blocks, so an index
      grows on disk without its old rows in memory.
  """
  safe_files.check_replaceable(path, 'code index', is_ours=is_index)
  arrays = {name: parts if isinstance(parts, list) else [parts]
            for name, parts in arrays.items()}
  table = {}
  # The header's length depends on the offsets it lists: lay the arrays out
  # after a generous header estimate, then pad the real header up to it.
  estimate = len(json.dumps(meta)) + 200 * (len(arrays) + 1)
  start = _aligned(_PREFIX.size + estimate)
  offset = start
  for name, parts in arrays.items():
    rows = sum(len(part) for part in parts)
    table[name] = {'offset': offset, 'dtype': parts[0].dtype.str,
                   'shape': [rows, *parts[0].shape[1:]]}
    offset = _aligned(offset + sum(part.nbytes for part in parts))
  header = json.dumps(dict(meta, format=FORMAT, arrays=table)).encode('utf-8')
  if _PREFIX.size + len(header) > start:
    raise AssertionError('index header outgrew its estimate')
  with safe_files.atomic_write(
      path, fix='choose a writable folder for the index') as f:
    f.write(_PREFIX.pack(MAGIC, len(header)) + header)
    for name, parts in arrays.items():
      f.write(b'\0' * (table[name]['offset'] - f.tell()))
      for array in parts:
        for row in range(0, len(array), _COPY_ROWS):
          f.write(np.ascontiguousarray(array[row:row + _COPY_ROWS]).tobytes())
    f.write(b'\0' * (_aligned(f.tell()) - f.tell()))


def _check_path(path: str) -> None:
  if os.path.isdir(path):
    raise IndexFileError(f'{path} is a folder, not a code index; give the '
                         'index file (written by concepthash-search --index).')
  if not os.path.exists(path):
    raise IndexFileError(f'{path} does not exist; build it with '
                         'concepthash-search --db_folder/--db_split --index.')


def read(path: str) -> tuple:
  """(meta, arrays) of an index file; arrays memory-mapped read-only.

  Raises:
    IndexFileError: a folder, a foreign or truncated file (naming the fix).
  """
  _check_path(path)
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(_PREFIX.size)
    if prefix[:len(MAGIC)] != MAGIC:
      return _read_legacy(path)
    if len(prefix) < _PREFIX.size:
      raise _truncated(path, size, _PREFIX.size)
    _, length = _PREFIX.unpack(prefix)
    if _PREFIX.size + length > size:
      raise _truncated(path, size, _PREFIX.size + length)
    try:
      meta = json.loads(f.read(length).decode('utf-8'))
      table = meta.pop('arrays')
      fmt = int(meta['format'])
    except (ValueError, KeyError, TypeError) as e:
      raise IndexFileError(f'{path}: the index header is damaged ({e}); '
                           'rebuild the index.') from e
  if fmt != FORMAT:
    raise IndexFileError(f'{path}: index format {fmt}, this version reads '
                         f'{LEGACY_FORMAT} and {FORMAT}; update concepthash_jax '
                         'or rebuild the index.')
  arrays = {}
  for name, entry in table.items():
    dtype, shape = np.dtype(entry['dtype']), tuple(entry['shape'])
    end = entry['offset'] + dtype.itemsize * int(np.prod(shape))
    if end > size:
      raise _truncated(path, size, end)
    arrays[name] = (np.zeros(shape, dtype) if 0 in shape else np.memmap(
        path, dtype=dtype, mode='r', offset=entry['offset'], shape=shape))
  return meta, arrays


def _truncated(path, size, needed):
  return IndexFileError(f'{path} is truncated ({size} bytes, its header needs '
                        f'{needed}); rebuild the index.')


def _read_legacy(path: str) -> tuple:
  """(meta, arrays) of a format-1 .npz index, loaded fully."""
  try:
    with np.load(path, allow_pickle=False) as data:
      stored = {k: data[k] for k in data.files}
    fmt = int(stored['format'])
    bits, nbit = stored['bits'], int(stored['nbit'])
    info = json.loads(str(stored['info'])) if 'info' in stored else {}
  except (OSError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise IndexFileError(
        f'{path} is not a code index (neither format {FORMAT} nor a format-'
        f'{LEGACY_FORMAT} .npz: {e}); give an index written by concepthash-'
        'search --index, or rebuild it.') from e
  if fmt != LEGACY_FORMAT:
    raise IndexFileError(f'{path}: .npz index format {fmt}, this version reads '
                         f'{LEGACY_FORMAT}; rebuild the index.')
  if bits.dtype != np.uint32 or bits.ndim != 2 or bits.shape[1] * 32 < nbit:
    raise IndexFileError(
        f'{path}: its codes are {bits.dtype} {bits.shape}, not {nbit} bits '
        'packed in uint32 words; rebuild the index with concepthash-search.')
  words = native.words64(bits)
  arrays = {'words': words}
  for name in ('labels', 'ids'):
    if name in stored:
      arrays[name] = stored[name]
  if 'paths' in stored:
    paths = Paths.from_strings(stored['paths'])
    arrays['path_bytes'], arrays['path_offsets'] = paths.blob, paths.offsets
  meta = {'format': LEGACY_FORMAT, 'nbit': nbit,
          'num_concepts': info.get('num_concepts'), 'fingerprint': None,
          'info': info, 'count': len(words)}
  return meta, arrays
