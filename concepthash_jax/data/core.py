"""The one dataset interface every source (synthetic, tfds, folders) returns.

A dataset is a random-access split: `len(ds)` images, `ds[i]` a record
  {'image': uint8 (H, W, 3) RGB, 'label': int,
   'keypoints': float32 (P, 3) x, y, visible (only when ds.part_names),
   'box': float32 (4,) object box x, y, width, height (only when ds.has_boxes)}
with keypoints and boxes in continuous pixel coordinates of the stored image. `len(ds)`
is the size of the whole split on every process; `ds.process_index` /
`ds.process_count` only tell `data.batches` which slice of each global batch
this process reads.
"""
import numpy as np

from concepthash_jax import errors


class CorruptImageError(errors.DataError):
  """An image file that is missing, unreadable or not an image."""


class Dataset:
  """Base class: labels and class metadata; subclasses implement `_load`."""

  def __init__(self, *, name, split, labels, class_names, family_of=None,
               family_names=None, part_names=(), process_index=0,
               process_count=1, skipped=()):
    """Stores the split's metadata.

    Args:
      name: dataset name ('synthetic', 'cub', ...).
      split: 'train' (the retrieval database) or 'test' (the queries).
      labels: int (N,) class index of every image, in index order.
      class_names: readable name of each class (list of C str).
      family_of: class -> family index (list of C int), or None.
      family_names: name of each family, or None.
      part_names: names of the P keypoints ('' tuple when there are none).
      process_index: this process's index among `process_count`.
      process_count: number of processes reading the split.
      skipped: paths left out because they were corrupt (on_corrupt='skip').
    """
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in '
                       f'[0, {process_count})')
    self.name = name
    self.split = split
    self.labels = np.asarray(labels, np.int64)
    self.class_names = list(class_names)
    self.family_of = None if family_of is None else list(family_of)
    self.family_names = None if family_names is None else list(family_names)
    self.part_names = tuple(part_names)
    self.process_index = process_index
    self.process_count = process_count
    self.skipped = tuple(skipped)

  @property
  def num_classes(self):
    """C, the number of classes."""
    return len(self.class_names)

  @property
  def num_skipped(self):
    """How many corrupt images were left out of this split."""
    return len(self.skipped)

  @property
  def has_keypoints(self):
    """Whether records carry part keypoints."""
    return bool(self.part_names)

  @property
  def has_boxes(self):
    """Whether records carry an object box (subclasses set `boxes`)."""
    return getattr(self, 'boxes', None) is not None

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} images')
    return self._load(index)

  def _load(self, index):
    """Returns the record of image `index`."""
    raise NotImplementedError

  def __repr__(self):
    return (f'{type(self).__name__}(name={self.name!r}, split={self.split!r}, '
            f'images={len(self)}, classes={self.num_classes}, '
            f'skipped={self.num_skipped})')


SPLITS = ('train', 'test')  # The database/training split and the queries.
ON_CORRUPT = ('raise', 'skip')  # data.on_corrupt: fail naming the file, or leave it out.


def check_split(split: str):
  """Raises ValueError for a split name outside SPLITS."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; valid: {list(SPLITS)}')


def family_by_word(class_names, word):
  """Groups classes by one word of their name ('first' or 'last').

  Words are split on spaces and underscores, so 'Laysan_Albatross' and
  'Laysan Albatross' both give 'Albatross'. Families are numbered in order of
  first appearance.

  Returns:
    (family_of list of C int, family_names list of str).
  """
  family_names, family_of = [], []
  for name in class_names:
    words = name.replace('_', ' ').split()
    key = (words[0] if word == 'first' else words[-1]) if words else name
    if key not in family_names:
      family_names.append(key)
    family_of.append(family_names.index(key))
  return family_of, family_names


def data_warnings(train, test):
  """Readable warnings about a dataset's train/test splits (empty when all is well).

  Args:
    train: the train split (training set and retrieval database).
    test: the test split (queries).

  Returns:
    list of str: corrupt images left out (how many, which), and classes with
    no training image (their queries can never find a relevant item).
  """
  messages = []
  for ds in (train, test):
    if ds.num_skipped:
      shown = ', '.join(ds.skipped[:10])
      more = f' and {ds.num_skipped - 10} more' if ds.num_skipped > 10 else ''
      messages.append(f"{ds.split} split: skipped {ds.num_skipped} corrupt "
                      f"image(s) (data.on_corrupt='skip'): {shown}{more}")
  counts = np.bincount(train.labels, minlength=train.num_classes)
  empty = [train.class_names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    messages.append(
        f'{len(empty)} of {train.num_classes} classes have no training image, '
        'so the model never sees them and their queries find no relevant '
        f'database item: {", ".join(empty)}')
  return messages


# Which word of a class name is its family, by dataset ('cars': the make,
# 'AM General Hummer SUV 2000'); any other dataset: the last word, as CUB's
# 'Laysan Albatross' -> 'Albatross'.
_FAMILY_WORD = {'cars': 'first'}


def families_by_name(dataset_name: str, class_names):
  """The family-name rule: (family_of, family_names) from the class names.

  For datasets that ship no family list (CUB, Cars, tfds copies), and for
  tools reading a dataset that did not give one.
  """
  return family_by_word(class_names, _FAMILY_WORD.get(dataset_name, 'last'))


def families(ds):
  """(family_of, family_names) of a built split: its own, else by name."""
  if ds.family_of is not None:
    return ds.family_of, ds.family_names
  return families_by_name(ds.name, ds.class_names)
