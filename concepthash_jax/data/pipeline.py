"""Batches for training and encoding: order, sharding, padding, parallel decode with grain.

`batches` yields one epoch (encoding, figures); `train_batches` yields the
steps of a whole run, across epoch boundaries, from one grain pipeline, so its
worker threads or processes start once per run rather than once per epoch
(process workers take seconds to start: each imports this package anew).
Both are views of one sequence: element i of a run is (epoch, dataset index)
of global step start_step + i // batch_size.

Determinism: the epoch's order is a permutation drawn from (seed, epoch), and
each image's augmentation uses its own generator seeded by (seed, epoch,
dataset index). Neither depends on which process or worker decodes the image,
nor on where an iterator starts, so the batches are identical for any
`data.num_workers`, any `data.worker_type`, one iterator per epoch or one per
run, and a run resumed mid-epoch.

Multi-process: a global batch is `batch_size * process_count` consecutive
positions of the epoch's order; process p reads positions
[p * batch_size, (p + 1) * batch_size) of each global batch, so the hosts'
batches are disjoint and, stacked in process order, form the global batch.
"""
import gc

from absl import flags
import grain
from grain import multiprocessing as grain_mp
import numpy as np

from concepthash_jax.data import cache as cache_lib
from concepthash_jax.data import transforms

_PAD = -1  # 'index' (and 'label') of padding rows.
# data.worker_type: decode in threads (the per-image Python work holds the GIL,
# so they stop scaling after a few cores) or processes (scale with cores).
WORKER_TYPES = ('thread', 'process')


def epoch_order(num_images, *, shuffle, seed, epoch):
  """Dataset indices in the order an epoch visits them.

  Args:
    num_images: N, the split size.
    shuffle: permute (train) or keep index order (eval).
    seed: the run's seed.
    epoch: 0-based epoch; each epoch has its own permutation.

  Returns:
    int64 (N,) indices.
  """
  if not shuffle:
    return np.arange(num_images)
  return np.random.default_rng([seed, epoch, 0]).permutation(num_images)


def process_positions(order, *, batch_size, process_index, process_count,
                      drop_remainder):
  """This process's dataset indices, batch-major, padded with -1.

  Args:
    order: (N,) epoch order over the whole split.
    batch_size: per-process batch size B.
    process_index: p in [0, process_count).
    process_count: number of processes P; the global batch is B * P.
    drop_remainder: drop the last incomplete global batch (train) instead of
      padding it with -1 (eval).

  Returns:
    int64 (num_batches * B,) indices, -1 for padding.
  """
  global_batch = batch_size * process_count
  if drop_remainder:
    num_batches = len(order) // global_batch
    order = order[:num_batches * global_batch]
  else:
    num_batches = -(-len(order) // global_batch)
    order = np.concatenate([order, np.full(
        num_batches * global_batch - len(order), _PAD, order.dtype)])
  batches = order.reshape(num_batches, process_count, batch_size)
  return batches[:, process_index].reshape(-1)


class _Elements:
  """(epoch, dataset index) of this process's elements of steps [start, stop).

  A lazy sequence (the grain source): element i is row i % B of the batch of
  global step start_step + i // B (0-based), which lies in epoch
  step // steps_per_epoch. An epoch's positions are drawn when first asked
  for and kept with the previous epoch's (prefetching straddles a boundary),
  so a run of many epochs holds, and pickles to each worker, two epochs at
  most. The dict of them is replaced whole, never changed in place, so
  thread workers read it without a lock.
  """

  def __init__(self, num_images, *, shuffle, seed, batch_size, process_index,
               process_count, drop_remainder, start_step, stop_step):
    self.num_images = num_images
    self.shuffle = shuffle
    self.seed = seed
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    self.start_step = start_step
    self.num_steps = max(0, stop_step - start_step)
    self.steps_per_epoch = num_batches(
        num_images, batch_size=batch_size, process_count=process_count,
        drop_remainder=drop_remainder)
    self._epochs = {}  # epoch -> process_positions of that epoch.

  def __len__(self):
    return self.num_steps * self.batch_size

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    step, row = divmod(i, self.batch_size)
    epoch, batch = divmod(self.start_step + step, self.steps_per_epoch)
    return epoch, int(self._positions(epoch)[batch * self.batch_size + row])

  def _positions(self, epoch):
    """This process's positions of `epoch` (batch-major, -1 padding)."""
    known = self._epochs  # One read: another thread may replace the dict.
    if epoch not in known:
      order = epoch_order(self.num_images, shuffle=self.shuffle,
                          seed=self.seed, epoch=epoch)
      known = {e: p for e, p in known.items() if e == epoch - 1}
      known[epoch] = process_positions(
          order, batch_size=self.batch_size,
          process_index=self.process_index,
          process_count=self.process_count,
          drop_remainder=self.drop_remainder)
      self._epochs = known
    return known[epoch]


class _Example:
  """Loads and augments one (epoch, dataset index) element (picklable).

  The epoch travels with the element, not with this object, so one pipeline
  can span epochs: the augmentation is seeded by (seed, epoch, index) either
  way.

  With a first-stage cache the image comes from it and only the rest of the
  transform runs (`Compose.finish`); the annotations come from the dataset's
  arrays, so nothing is decoded. Both ways give the same uint8 pixels.
  """

  def __init__(self, dataset, transform, *, seed, train, image_size,
               cache=None, display=False):
    self.display = display  # Also emit the uint8 image under 'display'.
    self.dataset = dataset
    self.transform = transform
    self.cache = cache
    self.first, self.rest = transform.split()
    self.seed = seed
    self.train = train
    self.image_size = image_size
    self.num_parts = len(dataset.part_names)
    self.has_boxes = dataset.has_boxes

  def __call__(self, element):
    epoch, index = element
    if index == _PAD:
      example = {
          'image': np.zeros((self.image_size, self.image_size, 3), np.uint8),
          'label': np.int32(_PAD), 'index': np.int32(_PAD),
          'mask': np.bool_(False)}
      if self.num_parts:
        example['keypoints'] = np.zeros((self.num_parts, 3), np.float32)
      if self.has_boxes:
        example['box'] = np.zeros(4, np.float32)
      if self.display:
        example['display'] = np.zeros((self.image_size, self.image_size, 3),
                                      np.uint8)
      return example
    record = (self._annotations(index) if self.cache is not None
              else self.dataset[index])
    # Augmentation randomness is a function of the image, not of the worker.
    rng = (np.random.default_rng([self.seed, epoch, index, 1])
           if self.train else None)
    points = record.get('keypoints') if self.num_parts else None
    if self.has_boxes:
      # The box's four corners travel as extra points; the new box is their
      # axis-aligned hull (exact for resize / crop / flip).
      x, y, w, h = np.asarray(record['box'], np.float32)
      corners = np.array([[x, y, 1], [x + w, y, 1], [x, y + h, 1],
                          [x + w, y + h, 1]], np.float32)
      points = corners if points is None else np.concatenate([points,
                                                              corners])
    if self.cache is not None:
      pixels, source_size = self.cache[index]
      points, _ = self.first.points(points, source_size)
      image, points = self.rest.finish(pixels, points, rng)
    else:
      image, points = self.transform.pixels(record['image'], points, rng)
    example = {'image': image, 'label': np.int32(record['label']),
               'index': np.int32(index), 'mask': np.bool_(True)}
    if self.display:
      example['display'] = image
    if self.num_parts:
      example['keypoints'] = points[:self.num_parts]
    if self.has_boxes:
      low = points[-4:, :2].min(0)
      high = points[-4:, :2].max(0)
      example['box'] = np.concatenate([low, high - low]).astype(np.float32)
    return example


  def _annotations(self, index):
    """Image `index`'s record without its image (nothing decoded)."""
    record = {'label': self.dataset.labels[index]}
    if self.num_parts:
      record['keypoints'] = self.dataset.keypoints[index]
    if self.has_boxes:
      record['box'] = self.dataset.boxes[index]
    return record


def make_transform(data_cfg, *, train):
  """The configured train or test transform."""
  if train:
    return transforms.train_transform(data_cfg.train_augment,
                                      image_size=data_cfg.image_size,
                                      resize_size=data_cfg.resize_size)
  return transforms.test_transform(image_size=data_cfg.image_size,
                                   resize_size=data_cfg.resize_size)


def batches(dataset, data_cfg, *, train, batch_size, seed, epoch,
            drop_remainder, display=False):
  """Iterates over this process's batches of one epoch.

  Args:
    dataset: a `data.build` dataset (its process_index / process_count pick
      this process's slice of every global batch).
    data_cfg: config `data` (image_size, resize_size, train_augment,
      num_workers, worker_type, cache, cache_dir).
    train: shuffle + train augmentation (True) or index order + test
      transform (False).
    batch_size: per-process batch size B.
    seed: run seed; with `epoch` it fixes order and augmentation.
    epoch: 0-based epoch.
    drop_remainder: drop the last incomplete global batch, else pad it.
    display: also yield 'display', the same images as uint8 (B, S, S, 3)
      before normalisation (for figures).

  The deterministic first stage of the transform is read from a cache
  (data/cache.py; built on first use) when `data.cache` is on and the
  source has files; the pixels are the same either way.

  Its workers live as long as the iterator: training, which runs many
  epochs, uses `train_batches` so that they start once.

  Returns:
    An iterator of dicts of numpy arrays: 'image' uint8 (B, S, S, 3) pixels
    (`transforms.to_model_input` normalises them inside the jitted step),
    'label' int32 (B,), 'index' int32 (B,) dataset index, 'mask' bool (B,)
    (False and label = index = -1 on padding rows), 'keypoints' float32
    (B, P, 3) in the transformed image's pixels when the dataset has parts,
    and 'box' float32 (B, 4) x, y, w, h in the same frame when it has boxes
    (not clipped to the crop), and 'display' when asked. Its close() stops
    the workers now rather than when it is garbage-collected.
  """
  per_epoch = num_batches(len(dataset), batch_size=batch_size,
                          process_count=dataset.process_count,
                          drop_remainder=drop_remainder)
  return _step_batches(dataset, data_cfg, train=train, batch_size=batch_size,
                       seed=seed, drop_remainder=drop_remainder,
                       start_step=epoch * per_epoch,
                       stop_step=(epoch + 1) * per_epoch, display=display)


def train_batches(dataset, data_cfg, *, batch_size, seed, start_step,
                  stop_step):
  """This process's train batches of global steps start_step + 1 .. stop_step.

  One pipeline over all the epochs these steps span: its thread pool or
  worker processes start once, not once per epoch (on an accelerator an epoch
  can take no longer than process workers take to start). Batch k is the one
  `batches(train=True, drop_remainder=True)` yields for the same (seed, epoch,
  step in epoch), bit for bit, also when start_step is inside an epoch (a
  resumed run).

  Args:
    dataset: the train split from `data.build`.
    data_cfg: config `data`, as for `batches`.
    batch_size: per-process batch size B.
    seed: run seed.
    start_step: optimizer steps already done; the first batch is step
      start_step + 1's.
    stop_step: the last step's number.

  Returns:
    An iterator of `batches`' dicts, stop_step - start_step of them; close()
    stops its workers (call it when training ends or is interrupted).
  """
  return _step_batches(dataset, data_cfg, train=True, batch_size=batch_size,
                       seed=seed, drop_remainder=True, start_step=start_step,
                       stop_step=stop_step)


def _step_batches(dataset, data_cfg, *, train, batch_size, seed,
                  drop_remainder, start_step, stop_step, display=False):
  """Batches of the 0-based global steps [start_step, stop_step) (`batches`)."""
  if data_cfg.worker_type not in WORKER_TYPES:
    raise ValueError(f'Unknown data.worker_type {data_cfg.worker_type!r}; '
                     f'valid: {list(WORKER_TYPES)}')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  elements = _Elements(
      len(dataset), shuffle=train, seed=seed, batch_size=batch_size,
      process_index=dataset.process_index,
      process_count=dataset.process_count, drop_remainder=drop_remainder,
      start_step=start_step, stop_step=stop_step)
  transform = make_transform(data_cfg, train=train)
  first_stage = None
  if data_cfg.cache:
    first_stage = cache_lib.first_stage_cache(
        dataset, transform.split()[0], cache_dir=data_cfg.cache_dir,
        num_workers=data_cfg.num_workers, mode=data_cfg.cache)
  load = _Example(dataset, transform, seed=seed, train=train,
                  image_size=data_cfg.image_size, cache=first_stage,
                  display=display)
  ds = grain.MapDataset.source(elements).map(load)
  num_workers = data_cfg.num_workers
  if num_workers <= 0:  # In-process, no threads: the cheapest for tiny images.
    ds = ds.batch(batch_size)
    return (ds[i] for i in range(len(ds)))
  if data_cfg.worker_type == 'thread':
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_workers, prefetch_buffer_size=2 * batch_size)).batch(
            batch_size))
  # grain reads absl flags in its workers; outside an absl app (tests,
  # notebooks) they are unparsed, so take their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # Whole batches are made in the workers (only they cross the process
  # boundary, through shared memory); worker w makes batches w, w + W, ...
  ds = ds.batch(batch_size).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return _ProcessBatches(iter(ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers))))


class _ProcessBatches:
  """grain's multi-process iterator, its shared memory unlinked as it goes.

  Process workers hand each batch over in POSIX shared memory: its arrays are
  grain `SharedMemoryArray`s that unlink their segment when collected, and
  not then but through grain's deleter thread pool (`enable_async_del`).
  multiprocessing's exit handler terminates that pool before the process
  ends, dropping the requests still queued, and arrays alive then (batches
  the caller keeps, or ones in reference cycles) are never unlinked: the
  resource tracker reports them as leaked and unlinks them itself.

  So each batch's segments are unlinked as it arrives. A POSIX segment keeps
  its memory while it is mapped, so the arrays stay valid, with no copy;
  unlinking only removes the name (in /dev/shm) and the tracker's record. The
  memory goes with the arrays or the process. Batches that never reach us,
  prefetched in grain's buffers, go to the deleter when grain is closed, and
  `close` waits for it.
  """

  def __init__(self, iterator):
    self._iterator = iterator
    self._closed = False

  def __iter__(self):
    return self

  def __next__(self):
    try:
      batch = next(self._iterator)
    except StopIteration:
      self.close()
      raise
    for array in batch.values():
      _unlink_now(array)
    return batch

  def close(self):
    """Stops the worker processes and unlinks the shared memory left over."""
    if not self._closed:
      self._closed = True
      self._iterator.close()  # Drops the batches in grain's prefetch buffers.
      # A batch that grain's prefetch thread held when its worker's stream
      # ended stays in a cycle through the StopIteration's traceback.
      gc.collect()
      _wait_for_grain_unlinks()


def _unlink_now(array):
  """Unlinks the segment behind a batch array from grain; the array stays valid.

  Args:
    array: a value of a batch from grain's process workers.
  """
  # grain's `unlink_on_del()` sets `_unlink_on_del` on the arrays it opens
  # here: this process is the one to unlink them. Private to grain, so read
  # with a default: should a grain release rename it, batches still work and
  # grain's own (late) unlinking is back; the shared-memory test in
  # tests/test_data.py then fails and says so.
  if (isinstance(array, grain_mp.SharedMemoryArray)
      and getattr(array, '_unlink_on_del', False)):
    array.shm.unlink()
    # Else grain's __del__ unlinks it again: the FileNotFoundError would end
    # its deleter task before the task frees its slot of the deleter's queue.
    array._unlink_on_del = False  # pylint: disable=protected-access


def _wait_for_grain_unlinks(timeout_s=60):
  """Returns once grain's deleter has run the requests queued before the call.

  grain makes its deleter pool with one thread (`enable_async_del(1)`), which
  runs requests in order: once a no-op queued after them has run, so have
  they.

  Args:
    timeout_s: give up after this long (a stuck deleter must not hang the
      caller's shutdown).
  """
  # Private to grain, read with a default as in _unlink_now.
  pool = getattr(grain_mp.SharedMemoryArray, '_del_thread_pool', None)
  if pool is None:  # No process iterator has started: nothing is queued.
    return
  try:
    pool.apply_async(lambda: None).wait(timeout_s)
  except ValueError:  # Already terminated (interpreter exit): nothing runs.
    pass


def num_batches(num_images, *, batch_size, process_count, drop_remainder):
  """How many batches `batches` yields per process."""
  global_batch = batch_size * process_count
  if drop_remainder:
    return num_images // global_batch
  return -(-num_images // global_batch)

