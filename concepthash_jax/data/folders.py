"""Datasets read from their official folder layouts (CUB, NABirds, Aircraft, Cars).

Splits follow the official ConceptHash protocol: 'train' is both the training
set and the retrieval database, 'test' the queries. Image order within a split
is the order of the official split lists (`data/<ds>/{train,test}.txt`), which
matters for mAP@R's tie rule 'index':
  cub       train_test_split.txt (1 = train); images sorted by (class folder,
            file name), as the official preparation notebook lists them.
            Classes from classes.txt; keypoints from parts/ and boxes from
            bounding_boxes.txt when present (NABirds likewise).
  nabirds   the same files plus hierarchy.txt; images in images.txt order;
            classes numbered by first appearance in image_class_labels.txt;
            family = the class's parent in hierarchy.txt.
  aircraft  data/images_variant_{trainval,test}.txt in file order; variant-level
            classes in variants.txt order; family from
            images_family_{trainval,test}.txt when present.
  cars      devkit/cars_train_annos.mat (train) and
            cars_test_annos_withlabels.mat (test) in file order; classes from
            devkit/cars_meta.mat; family = make (first word of the class name).
"""
import functools
import os

import numpy as np
from PIL import Image

from concepthash_jax.data import core

_CUB_LAYOUT = ('CUB_200_2011/ with images/, images.txt, image_class_labels.txt, '
               'train_test_split.txt, classes.txt (optional parts/parts.txt, '
               'parts/part_locs.txt)')
_NABIRDS_LAYOUT = ('nabirds/ with images/, images.txt, image_class_labels.txt, '
                   'train_test_split.txt, classes.txt, hierarchy.txt (optional '
                   'parts/)')
_AIRCRAFT_LAYOUT = ('fgvc-aircraft-2013b/data/ with images/, variants.txt, '
                    'images_variant_trainval.txt, images_variant_test.txt')
_CARS_LAYOUT = ('stanford_cars/ with cars_train/, cars_test/, '
                'devkit/cars_train_annos.mat, devkit/cars_meta.mat, '
                'cars_test_annos_withlabels.mat')


def load_image(path):
  """Reads an image file as uint8 (H, W, 3) RGB.

  Raises:
    CorruptImageError: naming `path`, when it is missing or not decodable.
  """
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:
    raise core.CorruptImageError(f'Cannot read image {path}: {e}') from e


def check_image(path):
  """Cheap integrity check (header + PNG checksums); raises CorruptImageError."""
  try:
    with Image.open(path) as image:
      image.verify()
  except (OSError, ValueError, SyntaxError) as e:
    raise core.CorruptImageError(f'Cannot read image {path}: {e}') from e


def _require(path, layout):
  """Returns `path`, or raises FileNotFoundError naming it and the layout."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'Missing {path}; expected the layout {layout}')
  return path


def _read_rows(path, layout):
  """Splits each non-empty line of a text file on whitespace."""
  with open(_require(path, layout)) as f:
    return [line.split() for line in f if line.strip()]


class FolderDataset(core.Dataset):
  """Images listed by path; decoded on access."""

  def __init__(self, *, paths, labels, keypoints=None, boxes=None,
               on_corrupt='raise', **metadata):
    """Checks every image and keeps the readable ones.

    Args:
      paths: image file paths, in split order.
      labels: class index of each path.
      keypoints: optional float (N, P, 3) keypoints per path.
      boxes: optional float (N, 4) object boxes x, y, width, height.
      on_corrupt: 'raise' (error naming the file) or 'skip' (leave the image
        out; the dataset's `skipped` lists it).
      **metadata: the core.Dataset fields (name, split, class_names, ...).
    """
    if on_corrupt not in ('raise', 'skip'):
      raise ValueError(f"Unknown data.on_corrupt {on_corrupt!r}; valid: "
                       "'raise', 'skip'")
    keep, skipped = [], []
    for i, path in enumerate(paths):
      try:
        check_image(path)
        keep.append(i)
      except core.CorruptImageError:
        if on_corrupt == 'raise':
          raise
        skipped.append(path)
    super().__init__(labels=np.asarray(labels, np.int64)[keep],
                     skipped=skipped, **metadata)
    self.paths = [paths[i] for i in keep]
    self.keypoints = None if keypoints is None else np.asarray(
        keypoints, np.float32)[keep]
    self.boxes = None if boxes is None else np.asarray(boxes,
                                                       np.float32)[keep]

  def _load(self, index):
    record = {'image': load_image(self.paths[index]),
              'label': int(self.labels[index])}
    if self.keypoints is not None:
      record['keypoints'] = self.keypoints[index]
    if self.boxes is not None:
      record['box'] = self.boxes[index]
    return record


def _find_root(root, marker, candidates, layout):
  """The first of root/<candidate> that holds `marker`."""
  for sub in candidates:
    path = os.path.join(root, sub)
    if os.path.exists(os.path.join(path, marker)):
      return path
  tried = ', '.join(os.path.join(root, sub, marker) for sub in candidates)
  raise FileNotFoundError(f'No {marker} under data.root={root!r} (tried '
                          f'{tried}); expected the layout {layout}')


def _cub_like_parts(root, image_ids, layout):
  """Reads parts/parts.txt + parts/part_locs.txt, or (None, ()) when absent."""
  names_path = os.path.join(root, 'parts', 'parts.txt')
  locs_path = os.path.join(root, 'parts', 'part_locs.txt')
  if not os.path.exists(names_path):
    return None, ()
  part_names = [' '.join(row[1:]) for row in _read_rows(names_path, layout)]
  part_ids = {row[0]: p for p, row in enumerate(_read_rows(names_path, layout))}
  row_of = {image_id: i for i, image_id in enumerate(image_ids)}
  keypoints = np.zeros((len(image_ids), len(part_names), 3), np.float32)
  for image_id, part_id, x, y, visible in _read_rows(locs_path, layout):
    if image_id in row_of:
      keypoints[row_of[image_id], part_ids[part_id]] = (
          float(x), float(y), float(visible))
  return keypoints, part_names


def _cub_like_boxes(root, image_ids, layout):
  """Reads bounding_boxes.txt (id x y width height), or None when absent."""
  path = os.path.join(root, 'bounding_boxes.txt')
  if not os.path.exists(path):
    return None
  box_of = {row[0]: [float(v) for v in row[1:5]]
            for row in _read_rows(path, layout)}
  return np.array([box_of[i] for i in image_ids], np.float32).reshape(-1, 4)


def _split_flag(split):
  """train_test_split.txt value of a split (1 = train)."""
  if split not in ('train', 'test'):
    raise ValueError(f"Unknown split {split!r}; valid: 'train', 'test'")
  return '1' if split == 'train' else '0'


def cub(root, split, *, on_corrupt='raise', **process):
  """CUB-200-2011 from its official folder (`root` = CUB_200_2011/ or its parent)."""
  root = _find_root(root, 'images.txt', ('', 'CUB_200_2011'), _CUB_LAYOUT)
  join = functools.partial(os.path.join, root)
  path_of = dict(_read_rows(join('images.txt'), _CUB_LAYOUT))
  class_of = dict(_read_rows(join('image_class_labels.txt'), _CUB_LAYOUT))
  flag = _split_flag(split)
  ids = [i for i, f in _read_rows(join('train_test_split.txt'), _CUB_LAYOUT)
         if f == flag]
  ids.sort(key=lambda i: tuple(path_of[i].split('/', 1)))
  classes = _read_rows(join('classes.txt'), _CUB_LAYOUT)
  class_index = {row[0]: c for c, row in enumerate(classes)}
  # '001.Black_footed_Albatross' -> 'Black_footed_Albatross'.
  class_names = [' '.join(row[1:]).split('.', 1)[-1] for row in classes]
  family_of, family_names = core.families_by_name('cub', class_names)
  keypoints, part_names = _cub_like_parts(root, ids, _CUB_LAYOUT)
  return FolderDataset(
      paths=[join(os.path.join('images', path_of[i])) for i in ids],
      labels=[class_index[class_of[i]] for i in ids], keypoints=keypoints,
      boxes=_cub_like_boxes(root, ids, _CUB_LAYOUT),
      on_corrupt=on_corrupt, name='cub', split=split, class_names=class_names,
      family_of=family_of, family_names=family_names, part_names=part_names,
      **process)


def nabirds(root, split, *, on_corrupt='raise', **process):
  """NABirds from its official folder (`root` = nabirds/ or its parent)."""
  root = _find_root(root, 'hierarchy.txt', ('', 'nabirds'), _NABIRDS_LAYOUT)
  join = functools.partial(os.path.join, root)
  images = _read_rows(join('images.txt'), _NABIRDS_LAYOUT)
  labels_rows = _read_rows(join('image_class_labels.txt'), _NABIRDS_LAYOUT)
  class_of = dict(labels_rows)
  # The official code numbers classes by first appearance in this file.
  order = list(dict.fromkeys(class_id for _, class_id in labels_rows))
  class_index = {class_id: c for c, class_id in enumerate(order)}
  names = {row[0]: ' '.join(row[1:])
           for row in _read_rows(join('classes.txt'), _NABIRDS_LAYOUT)}
  parent = dict(_read_rows(join('hierarchy.txt'), _NABIRDS_LAYOUT))
  families = list(dict.fromkeys(parent.get(c, c) for c in order))
  family_of = [families.index(parent.get(c, c)) for c in order]
  flag = _split_flag(split)
  is_split = {i: f == flag for i, f in
              _read_rows(join('train_test_split.txt'), _NABIRDS_LAYOUT)}
  ids = [i for i, _ in images if is_split[i]]
  path_of = dict(images)
  keypoints, part_names = _cub_like_parts(root, ids, _NABIRDS_LAYOUT)
  return FolderDataset(
      paths=[os.path.join(root, 'images', path_of[i]) for i in ids],
      labels=[class_index[class_of[i]] for i in ids], keypoints=keypoints,
      boxes=_cub_like_boxes(root, ids, _NABIRDS_LAYOUT),
      on_corrupt=on_corrupt, name='nabirds', split=split,
      class_names=[names.get(c, c) for c in order], family_of=family_of,
      family_names=[names.get(f, f) for f in families], part_names=part_names,
      **process)


def aircraft(root, split, *, on_corrupt='raise', **process):
  """FGVC-Aircraft, variant level (`root` = fgvc-aircraft-2013b/, its data/ or parent)."""
  root = _find_root(root, 'variants.txt',
                    ('', 'data', os.path.join('fgvc-aircraft-2013b', 'data')),
                    _AIRCRAFT_LAYOUT)
  join = functools.partial(os.path.join, root)
  with open(join('variants.txt')) as f:
    class_names = [line.strip() for line in f if line.strip()]
  class_index = {name: c for c, name in enumerate(class_names)}
  _split_flag(split)
  subset = 'trainval' if split == 'train' else 'test'
  rows = _read_rows(join(f'images_variant_{subset}.txt'), _AIRCRAFT_LAYOUT)
  ids = [row[0] for row in rows]
  labels = []
  for row in rows:
    variant = ' '.join(row[1:])
    if variant not in class_index:
      raise ValueError(f'Variant {variant!r} of image {row[0]} is not in '
                       f'{join("variants.txt")}')
    labels.append(class_index[variant])
  family_of, family_names = _aircraft_families(root, class_index)
  return FolderDataset(
      paths=[os.path.join(root, 'images', f'{i}.jpg') for i in ids],
      labels=labels, on_corrupt=on_corrupt, name='aircraft', split=split,
      class_names=class_names, family_of=family_of, family_names=family_names,
      **process)


def _aircraft_families(root, class_index):
  """Variant -> family from images_family_*.txt, or (None, None) if absent."""
  variant_of = {}
  for subset in ('trainval', 'test'):
    path = os.path.join(root, f'images_variant_{subset}.txt')
    if os.path.exists(path):
      variant_of.update({row[0]: ' '.join(row[1:])
                         for row in _read_rows(path, _AIRCRAFT_LAYOUT)})
  family_of_variant = {}
  for subset in ('trainval', 'test'):
    path = os.path.join(root, f'images_family_{subset}.txt')
    if not os.path.exists(path):
      return None, None
    for row in _read_rows(path, _AIRCRAFT_LAYOUT):
      if row[0] in variant_of:
        family_of_variant[variant_of[row[0]]] = ' '.join(row[1:])
  families_path = os.path.join(root, 'families.txt')
  if os.path.exists(families_path):
    with open(families_path) as f:
      family_names = [line.strip() for line in f if line.strip()]
  else:
    family_names = sorted(set(family_of_variant.values()))
  family_index = {name: i for i, name in enumerate(family_names)}
  if any(v not in family_of_variant for v in class_index):
    return None, None  # A variant without images: no reliable family table.
  return ([family_index[family_of_variant[v]] for v in class_index],
          family_names)


def _load_mat(path):
  """scipy.io.loadmat with squeezed arrays."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  return scipy.io.loadmat(path, squeeze_me=True)


def cars(root, split, *, on_corrupt='raise', **process):
  """Stanford Cars from the manual download (`root` = stanford_cars/)."""
  root = _find_root(root, os.path.join('devkit', 'cars_meta.mat'),
                    ('', 'stanford_cars'), _CARS_LAYOUT)
  class_names = [str(n) for n in _load_mat(
      os.path.join(root, 'devkit', 'cars_meta.mat'))['class_names']]
  _split_flag(split)
  if split == 'train':
    annos = os.path.join(root, 'devkit', 'cars_train_annos.mat')
    folder = 'cars_train'
  else:
    candidates = [os.path.join(root, 'cars_test_annos_withlabels.mat'),
                  os.path.join(root, 'devkit', 'cars_test_annos_withlabels.mat')]
    annos = next((p for p in candidates if os.path.exists(p)), candidates[0])
    folder = 'cars_test'
  annotations = np.atleast_1d(
      _load_mat(_require(annos, _CARS_LAYOUT))['annotations'])
  fnames = [str(a['fname']) for a in annotations]
  labels = [int(a['class']) - 1 for a in annotations]  # .mat classes are 1-based.
  family_of, family_names = core.families_by_name('cars', class_names)
  return FolderDataset(
      paths=[os.path.join(root, folder, f) for f in fnames], labels=labels,
      on_corrupt=on_corrupt, name='cars', split=split, class_names=class_names,
      family_of=family_of, family_names=family_names, **process)


LOADERS = {'cub': cub, 'nabirds': nabirds, 'aircraft': aircraft, 'cars': cars}


def build(data_cfg, split, *, process_index=0, process_count=1):
  """Builds `data_cfg.name` from `data_cfg.root` (see the module docstring)."""
  if data_cfg.name not in LOADERS:
    raise ValueError(f'data.source=folders has no layout for data.name='
                     f'{data_cfg.name!r}; valid: {sorted(LOADERS)}')
  if not data_cfg.root:
    raise ValueError('data.source=folders needs data.root (the dataset '
                     'folder)')
  if not os.path.isdir(data_cfg.root):
    raise FileNotFoundError(f'data.root={data_cfg.root!r} is not a directory')
  return LOADERS[data_cfg.name](
      data_cfg.root, split, on_corrupt=data_cfg.on_corrupt,
      process_index=process_index, process_count=process_count)
