"""The deterministic first stage of the transforms, computed once per dataset.

Train ('released'): Resize(resize_size, bilinear); test: Resize(resize_size,
bicubic) + CenterCrop(image_size). Both are the same for every epoch and
every seed, and decoding + resizing is much of an image's host time
(BENCHMARKS.md, "Input pipeline"), so the input pipeline reads their uint8
output from disk instead. A cache is a folder under `data.cache_dir`:

  manifest.json   what it was built from: cache format, Pillow version,
                  the ops with their settings, (path, bytes, mtime_ns)
                  of every source file, and under 'sha256' their hashes
  pixels.npy      uint8 (total,): image i is pixels[offsets[i]:][:H*W*3]
  shapes.npy      int64 (N, 3): (H, W, 3) of each cached image
  offsets.npy     int64 (N,)
  source_sizes.npy  int64 (N, 2): (W, H) of each source image, which
                  places the keypoints (the cache holds no annotation)

It is reused while the manifest matches (every later epoch and run) and
rebuilt when a source file, its size or mtime, the ops or Pillow change.
That check is cheap (one stat per file) and trusts (size, mtime): a file
rewritten with other content of the same size and its old mtime keeps its
stale pixels. `data.cache` says how much to trust:

  True       the cheap check above (the default)
  'verify'   also hashes every source file (sha256, stored at build time) and
             rebuilds the cache when any differs; once per process
  'rebuild'  rebuilds the cache now, whatever it holds; once per process
  False      no cache: every image is decoded each time

It is built in a temporary folder that then replaces the old one whole, so a
killed build never leaves a cache that looks valid; a cache whose arrays are
torn (a truncated pixels.npy) is rebuilt with a warning naming it. Each cache
folder carries the marker `.concepthash_jax` of kind 'cache' (safe_files).

Sources with files on disk are cached: 'folders' (one file per image) and
'tfds' (the split's array_record shards). 'synthetic' generates its images
in memory and is read directly.
"""
import concurrent.futures
import errno
import hashlib
import json
import os
import shutil
import socket

from absl import logging
import numpy as np
import PIL
from PIL import Image
import tqdm

from concepthash_jax import errors
from concepthash_jax import safe_files

_FORMAT = 1  # Bump when the folder layout changes.
# Errors that mean the cache folder cannot be written: a config fix.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT, errno.ENOTDIR)
_ARRAYS = ('pixels', 'shapes', 'offsets', 'source_sizes')
CACHE_KIND = 'cache'  # safe_files marker kind of a cache folder.
MODES = (True, False, 'verify', 'rebuild')  # Values of data.cache.
_HASHES = 'sha256'  # Manifest key of the source files' hashes (not compared).
# (folder, data.cache) already verified or rebuilt by this process: 'verify'
# and 'rebuild' act once per process, not at every epoch's or evaluation's
# batches.
_checked_this_process = set()


def default_dir():
  """$XDG_CACHE_HOME/concepthash_jax, else ~/.cache/concepthash_jax."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'concepthash_jax')


def source_files(dataset):
  """The files whose bytes define the split, or None when it has none."""
  files = getattr(dataset, 'paths', None) or getattr(dataset, 'source_files',
                                                      None)
  if not files or not all(os.path.isfile(f) for f in files):
    return None
  return [os.path.abspath(f) for f in files]


def _describe(ops):
  """The ops and their settings as text (part of the manifest)."""
  return [f'{name}:{sorted(fn.keywords.items())}' for name, fn, _ in ops.ops]


def manifest(dataset, first_stage):
  """What a cache of `first_stage` over `dataset` is valid for (JSON-able)."""
  files = source_files(dataset)
  stats = [os.stat(f) for f in files]
  return {'format': _FORMAT, 'pillow': PIL.__version__,
          'dataset': dataset.name, 'split': dataset.split,
          'images': len(dataset), 'ops': _describe(first_stage),
          'files': [[f, s.st_size, s.st_mtime_ns]
                    for f, s in zip(files, stats)]}


def _folder(cache_dir, meta):
  """cache_dir/<dataset>-<split>-<hash of what does not change in place>."""
  key = json.dumps([meta['dataset'], meta['split'], meta['ops'],
                    [f for f, _, _ in meta['files']]])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser(cache_dir),
                      f"{meta['dataset']}-{meta['split']}-{digest}")


def _read_manifest(folder):
  """The manifest stored in `folder`, or None when absent or unreadable."""
  try:
    with open(os.path.join(folder, 'manifest.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _without_hashes(stored):
  """A stored manifest without the hashes (what the cheap check compares)."""
  if not isinstance(stored, dict):
    return stored
  return {k: v for k, v in stored.items() if k != _HASHES}


def file_hashes(files, num_workers=1):
  """sha256 of each file, in order (threads: hashing releases the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    return list(pool.map(safe_files.sha256_file, files))


def torn(folder, meta):
  """Why the arrays of a cache folder cannot serve `meta`, or '' when intact."""
  try:
    shapes = np.load(os.path.join(folder, 'shapes.npy'))
    offsets = np.load(os.path.join(folder, 'offsets.npy'))
    sizes = np.load(os.path.join(folder, 'source_sizes.npy'))
    pixels = np.load(os.path.join(folder, 'pixels.npy'), mmap_mode='r')
  except (OSError, ValueError, EOFError) as e:
    return f'{type(e).__name__}: {e}'
  count = meta['images']
  if len(shapes) != count or len(offsets) != count or len(sizes) != count:
    return f'{len(offsets)} images stored, {count} in the split'
  want = int(np.prod(shapes, axis=1).sum()) if count else 0
  if pixels.size != want:
    return f'pixels.npy holds {pixels.size} values, the shapes need {want}'
  return ''


def _is_ours(folder):
  """Whether `folder` is a cache this module built (marker, manifest or arrays)."""
  if safe_files.folder_kind(folder) == CACHE_KIND:
    return True
  if os.path.exists(os.path.join(folder, 'manifest.json')):
    return True
  own = {f'{name}.npy' for name in _ARRAYS}
  return set(os.listdir(folder)) <= own


class FirstStageCache:
  """Random access to cached first-stage images (picklable: reopens lazily).

  cache[i] -> (uint8 (H, W, 3) read-only view, (W, H) of the source image).
  """

  def __init__(self, folder):
    self.folder = folder
    self._arrays = None

  def _open(self):
    if self._arrays is None:
      self._arrays = {
          name: np.load(os.path.join(self.folder, f'{name}.npy'),
                        mmap_mode='r' if name == 'pixels' else None)
          for name in _ARRAYS}
    return self._arrays

  def __len__(self):
    return len(self._open()['offsets'])

  def __getitem__(self, index):
    arrays = self._open()
    shape = tuple(int(v) for v in arrays['shapes'][index])
    start = int(arrays['offsets'][index])
    pixels = arrays['pixels'][start:start + int(np.prod(shape))]
    width, height = (int(v) for v in arrays['source_sizes'][index])
    return pixels.reshape(shape), (width, height)

  def __getstate__(self):  # Workers map the file themselves.
    return {'folder': self.folder, '_arrays': None}


def _source_size(dataset, index):
  """(W, H) of image `index` from its file header when it has one."""
  paths = getattr(dataset, 'paths', None)
  if paths:
    with Image.open(paths[index]) as image:
      return image.size
  height, width = dataset[index]['image'].shape[:2]
  return width, height


def _remove_stale_builds(folder):
  """Deletes this host's temporary folders of builds whose process died."""
  parent, name = os.path.split(folder)
  prefix = f'{name}.tmp-{socket.gethostname()}-'
  for entry in os.listdir(parent):
    if not entry.startswith(prefix):
      continue
    try:
      os.kill(int(entry[len(prefix):]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except (ValueError, PermissionError):
      pass


def _build(dataset, first_stage, meta, folder, num_workers):
  """Writes the cache into a temporary folder that then replaces `folder`."""
  if os.path.isdir(folder) and not _is_ours(folder):
    raise errors.ConfigError(
        f'{folder} is in the way of the image cache and was not written by '
        'concepthash_jax; move it away, or set data.cache_dir to another '
        'folder')
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  _remove_stale_builds(folder)
  tmp = f'{folder}.tmp-{socket.gethostname()}-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write(dataset, first_stage, meta, tmp, num_workers)
    safe_files.replace_folder(tmp, folder)
  except BaseException:  # Interrupted or failed: leave nothing half-written.
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write(dataset, first_stage, meta, tmp, num_workers):
  """Fills folder `tmp` with the cache's arrays, then its manifest."""
  n = len(dataset)
  # Output sizes follow from the source sizes (file headers): the pixel file
  # is allocated once and filled in place.
  source_sizes = np.array([_source_size(dataset, i) for i in range(n)],
                          np.int64).reshape(n, 2)
  shapes = np.array([first_stage.points(None, tuple(s))[1][::-1] + (3,)
                     for s in source_sizes], np.int64).reshape(n, 3)
  sizes = shapes.prod(1)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  pixels = np.lib.format.open_memmap(os.path.join(tmp, 'pixels.npy'),
                                     mode='w+', dtype=np.uint8,
                                     shape=(int(sizes.sum()),))

  def fill(index):
    image, _ = first_stage.pixels(dataset[index]['image'])
    if image.shape != tuple(shapes[index]):
      where = (dataset.paths[index] if getattr(dataset, 'paths', None)
               else f'image {index} of {dataset!r}')
      promised = tuple(int(v) for v in shapes[index][1::-1])
      raise errors.DataError(
          f'{where} decoded to {image.shape[1::-1]} pixels after '
          f'{first_stage.names}, its header promised {promised}; re-save '
          'the file, or set data.cache=False')
    pixels[offsets[index]:offsets[index] + sizes[index]] = image.reshape(-1)

  # PIL decodes and resizes without the GIL, so threads scale.
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    list(tqdm.tqdm(pool.map(fill, range(n)), total=n, leave=False,
                   desc=f'caching {dataset.name} {dataset.split} '
                   f'(once) in {os.path.dirname(tmp)}'))
  pixels.flush()
  pixels = None  # Closes the map before the folder is renamed.
  for name, value in (('shapes', shapes), ('offsets', offsets),
                      ('source_sizes', source_sizes)):
    np.save(os.path.join(tmp, f'{name}.npy'), value)
  hashes = file_hashes([f for f, _, _ in meta['files']], num_workers)
  safe_files.write_marker(tmp, CACHE_KIND)
  # The manifest last: a folder without it is never taken for a cache.
  safe_files.write_json(os.path.join(tmp, 'manifest.json'),
                        {**meta, _HASHES: hashes})


def _why_rebuild(folder, meta, mode, num_workers):
  """Why the cache in `folder` must be (re)built for `meta`, or '' to reuse it."""
  stored = _read_manifest(folder)
  if _without_hashes(stored) != meta:
    return 'new' if stored is None else 'out of date'
  damage = torn(folder, meta)
  if damage:
    logging.warning('The image cache %s is damaged (%s); rebuilding it.',
                    folder, damage)
    return 'damaged'
  if mode not in ('verify', 'rebuild') or (folder, mode) in _checked_this_process:
    return ''
  _checked_this_process.add((folder, mode))
  if mode == 'rebuild':
    logging.warning('data.cache=rebuild: rebuilding the image cache %s.',
                    folder)
    return 'rebuild'
  hashes = file_hashes([f for f, _, _ in meta['files']], num_workers)
  changed = [f for (f, _, _), old, new in zip(
      meta['files'], stored.get(_HASHES) or [None] * len(hashes), hashes)
             if old != new]
  if changed:
    logging.warning('data.cache=verify: %d source file(s) of the image cache '
                    '%s changed without a new size or mtime (first: %s); '
                    'rebuilding it.', len(changed), folder, changed[0])
    return 'changed'
  return ''


def check_mode(mode):
  """Refuses a data.cache value that is not one of MODES (ConfigError)."""
  if isinstance(mode, bool) or mode in ('verify', 'rebuild'):
    return
  raise errors.ConfigError(
      f'data.cache={mode!r}; valid: True (reuse while file sizes and mtimes '
      "match), 'verify' (also compare file hashes), 'rebuild' (rebuild now), "
      'False (no cache)')


def first_stage_cache(dataset, first_stage, *, cache_dir, num_workers=1,
                      mode=True):
  """The dataset's cache of `first_stage`, built (with a progress bar) if needed.

  Args:
    dataset: a `data.build` dataset.
    first_stage: transforms.Compose of deterministic ops (non-empty).
    cache_dir: parent folder of the caches ('' = `default_dir()`).
    num_workers: decode threads for a build.
    mode: data.cache: True, 'verify' or 'rebuild' (module doc).

  Returns:
    A FirstStageCache, or None when the dataset has no files to key a cache
    on (the synthetic source).

  Raises:
    errors.ConfigError: `cache_dir` is a file or cannot be written, or `mode`
      is not a valid data.cache.
  """
  check_mode(mode)
  if not first_stage.ops or source_files(dataset) is None:
    return None
  root = os.path.expanduser(cache_dir or default_dir())
  if os.path.exists(root) and not os.path.isdir(root):
    raise errors.ConfigError(
        f'data.cache_dir={root!r} is a file, not a folder; set data.cache_dir '
        f"to a folder ('' for {default_dir()}), or data.cache=False")
  meta = manifest(dataset, first_stage)
  folder = _folder(root, meta)
  if _why_rebuild(folder, meta, mode, num_workers):
    try:
      _build(dataset, first_stage, meta, folder, num_workers)
    except OSError as e:
      if e.errno not in _UNWRITABLE:
        raise
      raise errors.ConfigError(
          f'Cannot write the image cache in {os.path.dirname(folder)} '
          f'({e.strerror}); set data.cache_dir to a writable folder with '
          'space, or data.cache=False') from e
    _checked_this_process.add((folder, mode))
  return FirstStageCache(folder)
