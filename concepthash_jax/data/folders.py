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
import concurrent.futures
import functools
import os

import numpy as np
from PIL import Image

from concepthash_jax import errors
from concepthash_jax.data import core
from concepthash_jax.data import pixels as pixels_lib

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


# What Pillow raises for a file it cannot turn into pixels: missing or unreadable
# (OSError), a damaged or unknown format (ValueError, SyntaxError), or more pixels
# than Image.MAX_IMAGE_PIXELS allows (DecompressionBombError, not an OSError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path):
  """Reads an image file as uint8 (H, W, 3) RGB (16-bit and float scaled: data/pixels.py).

  Raises:
    CorruptImageError: naming `path`, when it is missing or not decodable.
  """
  try:
    with Image.open(path) as image:
      return pixels_lib.pil_to_rgb(image, path)
  except pixels_lib.ImageFormatError as e:
    raise core.CorruptImageError(str(e)) from e
  except UNREADABLE_IMAGE_ERRORS as e:
    raise core.CorruptImageError(f'Cannot read image {path}: {e}') from e


def check_image(path):
  """Decodes the whole file, as training will; raises CorruptImageError.

  `Image.verify()` alone passes a JPEG cut in half (it reads the header only),
  which then fails inside the training loop. A JPEG is decoded at 1/8 scale
  (`draft`): every byte of the entropy-coded data is still read, at a fraction
  of the cost of full-size pixels.
  """
  try:
    with Image.open(path) as image:
      image.draft('RGB', (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except UNREADABLE_IMAGE_ERRORS as e:
    raise core.CorruptImageError(f'Cannot read image {path}: {e}') from e


def _image_error(path):
  """The CorruptImageError of `path`, or None when it decodes."""
  try:
    check_image(path)
  except core.CorruptImageError as e:
    return e
  return None


def scan_images(paths, *, desc='checking images'):
  """Decodes every image in parallel threads (PIL releases the GIL).

  Returns:
    list of CorruptImageError or None, one per path, in order.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  workers = min(16, (os.cpu_count() or 1) + 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(tqdm.tqdm(pool.map(_image_error, paths), total=len(paths),
                          desc=desc, unit='img', leave=False,
                          disable=len(paths) < 200))


def _require(path, layout):
  """Returns `path`, or raises MissingFileError naming it and the layout."""
  if not os.path.exists(path):
    raise errors.MissingFileError(f'Missing {path}; expected the layout '
                                  f'{layout}')
  return path


def _read_table(path, layout, columns, *, exact=True):
  """Parses a whitespace-separated metadata file, one record per line.

  Args:
    path: the file (must exist: `layout` describes the folder otherwise).
    layout: the expected folder layout, for the missing-file message.
    columns: {name: type} of the fields, e.g. {'<image_id>': str, '<x>': float};
      with `exact=False` the last field takes the rest of the line (names
      with spaces).
    exact: whether a line must have exactly len(columns) fields.

  Returns:
    list of rows (lists of the converted fields), blank lines left out.

  Raises:
    DataError: naming the file, the line and the expected fields.
  """
  names, types = list(columns), list(columns.values())
  expected = ' '.join(names) + ('' if exact else ' ...')
  rows = []
  with open(_require(path, layout)) as f:
    for number, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) < len(names) or (exact and len(fields) > len(names)):
        raise errors.DataError(
            f'{path}, line {number}: expected "{expected}" ({len(names)} '
            f'fields), got {line.strip()!r}')
      if not exact:
        fields = fields[:len(names) - 1] + [' '.join(fields[len(names) - 1:])]
      try:
        rows.append([t(v) for t, v in zip(types, fields)])
      except ValueError:
        raise errors.DataError(
            f'{path}, line {number}: expected "{expected}" with numbers '
            f'where numbers belong, got {line.strip()!r}') from None
  if not rows:
    raise errors.DataError(f'{path} is empty; expected lines "{expected}"')
  return rows


def _lookup(table, keys, *, what, source, target):
  """[table[k] for k in keys], or a DataError naming the files that disagree."""
  missing = [k for k in keys if k not in table]
  if missing:
    raise errors.DataError(
        f'{len(missing)} {what}(s) listed in {source} are not in {target} '
        f'(first: {missing[0]!r}); the two files must describe the same '
        'images')
  return [table[k] for k in keys]


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
    if on_corrupt not in core.ON_CORRUPT:
      raise ValueError(f'Unknown data.on_corrupt {on_corrupt!r}; valid: '
                       f'{list(core.ON_CORRUPT)}')
    failures = scan_images(paths, desc=f'checking {len(paths)} '
                           f"{metadata.get('split', '')} images")
    bad = [e for e in failures if e is not None]
    if bad and on_corrupt == 'raise':
      raise core.CorruptImageError(
          f'{bad[0]}' + (f' (and {len(bad) - 1} more corrupt images)'
                         if len(bad) > 1 else '') +
          "; fix or remove the file, or set --config.data.on_corrupt=skip "
          'to leave corrupt images out')
    keep = [i for i, e in enumerate(failures) if e is None]
    skipped = [paths[i] for i, e in enumerate(failures) if e is not None]
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
  raise errors.MissingFileError(
      f'No {marker} under data.root={root!r} (tried {tried}); expected the '
      f'layout {layout}')


_ID_NAME = {'<id>': str, '<name>': str}  # Names may hold spaces: exact=False.


def _cub_like_parts(root, image_ids, layout):
  """Reads parts/parts.txt + parts/part_locs.txt, or (None, ()) when absent."""
  names_path = os.path.join(root, 'parts', 'parts.txt')
  locs_path = os.path.join(root, 'parts', 'part_locs.txt')
  if not os.path.exists(names_path):
    return None, ()
  parts = _read_table(names_path, layout, _ID_NAME, exact=False)
  part_names = [name for _, name in parts]
  part_ids = {part_id: p for p, (part_id, _) in enumerate(parts)}
  row_of = {image_id: i for i, image_id in enumerate(image_ids)}
  keypoints = np.zeros((len(image_ids), len(part_names), 3), np.float32)
  locs = _read_table(locs_path, layout, {
      '<image_id>': str, '<part_id>': str, '<x>': float, '<y>': float,
      '<visible>': float})
  part_of_row = _lookup(part_ids, [row[1] for row in locs], what='part id',
                        source=locs_path, target=names_path)
  for (image_id, _, x, y, visible), part in zip(locs, part_of_row):
    if image_id in row_of:
      keypoints[row_of[image_id], part] = (x, y, visible)
  return keypoints, part_names


def _cub_like_boxes(root, image_ids, layout):
  """Reads bounding_boxes.txt (id x y width height), or None when absent."""
  path = os.path.join(root, 'bounding_boxes.txt')
  if not os.path.exists(path):
    return None
  rows = _read_table(path, layout, {
      '<image_id>': str, '<x>': float, '<y>': float, '<width>': float,
      '<height>': float})
  box_of = {row[0]: row[1:] for row in rows}
  return np.array(_lookup(box_of, image_ids, what='image id',
                          source='the image list', target=path),
                  np.float32).reshape(-1, 4)


def _split_flag(split):
  """train_test_split.txt value of a split (1 = train)."""
  core.check_split(split)
  return '1' if split == 'train' else '0'


def _split_ids(path, layout, split):
  """Image ids of `split` in train_test_split.txt (`<image_id> <1|0>`)."""
  rows = _read_table(path, layout, {'<image_id>': str, '<is_training_image>':
                                    str})
  bad = [row for row in rows if row[1] not in ('0', '1')]
  if bad:
    raise errors.DataError(f'{path}: <is_training_image> must be 1 or 0, got '
                           f'{bad[0][1]!r} for image {bad[0][0]!r}')
  flag = _split_flag(split)
  return [image_id for image_id, f in rows if f == flag]


def _id_table(path, layout, value):
  """{id: value} of a two-column file such as images.txt (`<id> <value>`)."""
  return dict(_read_table(path, layout, {'<image_id>': str, value: str}))


def cub(root, split, *, on_corrupt='raise', **process):
  """CUB-200-2011 from its official folder (`root` = CUB_200_2011/ or its parent)."""
  root = _find_root(root, 'images.txt', ('', 'CUB_200_2011'), _CUB_LAYOUT)
  join = functools.partial(os.path.join, root)
  path_of = _id_table(join('images.txt'), _CUB_LAYOUT, '<image_name>')
  class_of = _id_table(join('image_class_labels.txt'), _CUB_LAYOUT,
                       '<class_id>')
  split_path = join('train_test_split.txt')
  ids = _split_ids(split_path, _CUB_LAYOUT, split)
  paths = _lookup(path_of, ids, what='image id', source=split_path,
                  target=join('images.txt'))
  order = sorted(range(len(ids)), key=lambda k: tuple(paths[k].split('/', 1)))
  ids, paths = [ids[k] for k in order], [paths[k] for k in order]
  classes = _read_table(join('classes.txt'), _CUB_LAYOUT, {
      '<class_id>': str, '<class_name>': str}, exact=False)
  class_index = {class_id: c for c, (class_id, _) in enumerate(classes)}
  # '001.Black_footed_Albatross' -> 'Black_footed_Albatross'.
  class_names = [name.split('.', 1)[-1] for _, name in classes]
  family_of, family_names = core.families_by_name('cub', class_names)
  keypoints, part_names = _cub_like_parts(root, ids, _CUB_LAYOUT)
  class_ids = _lookup(class_of, ids, what='image id', source=split_path,
                      target=join('image_class_labels.txt'))
  return FolderDataset(
      paths=[join('images', path) for path in paths],
      labels=_lookup(class_index, class_ids, what='class id',
                     source=join('image_class_labels.txt'),
                     target=join('classes.txt')),
      keypoints=keypoints, boxes=_cub_like_boxes(root, ids, _CUB_LAYOUT),
      on_corrupt=on_corrupt, name='cub', split=split, class_names=class_names,
      family_of=family_of, family_names=family_names, part_names=part_names,
      **process)


def nabirds(root, split, *, on_corrupt='raise', **process):
  """NABirds from its official folder (`root` = nabirds/ or its parent)."""
  root = _find_root(root, 'hierarchy.txt', ('', 'nabirds'), _NABIRDS_LAYOUT)
  join = functools.partial(os.path.join, root)
  path_of = _id_table(join('images.txt'), _NABIRDS_LAYOUT, '<image_name>')
  labels_rows = _read_table(join('image_class_labels.txt'), _NABIRDS_LAYOUT,
                            {'<image_id>': str, '<class_id>': str})
  class_of = dict(labels_rows)
  # The official code numbers classes by first appearance in this file.
  order = list(dict.fromkeys(class_id for _, class_id in labels_rows))
  class_index = {class_id: c for c, class_id in enumerate(order)}
  names = dict(_read_table(join('classes.txt'), _NABIRDS_LAYOUT, {
      '<class_id>': str, '<class_name>': str}, exact=False))
  parent = _id_table(join('hierarchy.txt'), _NABIRDS_LAYOUT, '<parent_id>')
  families = list(dict.fromkeys(parent.get(c, c) for c in order))
  family_of = [families.index(parent.get(c, c)) for c in order]
  split_path = join('train_test_split.txt')
  in_split = set(_split_ids(split_path, _NABIRDS_LAYOUT, split))
  _lookup(path_of, sorted(in_split), what='image id', source=split_path,
          target=join('images.txt'))
  ids = [i for i in path_of if i in in_split]  # images.txt order.
  keypoints, part_names = _cub_like_parts(root, ids, _NABIRDS_LAYOUT)
  class_ids = _lookup(class_of, ids, what='image id',
                      source=join('images.txt'),
                      target=join('image_class_labels.txt'))
  return FolderDataset(
      paths=[os.path.join(root, 'images', path_of[i]) for i in ids],
      labels=[class_index[c] for c in class_ids], keypoints=keypoints,
      boxes=_cub_like_boxes(root, ids, _NABIRDS_LAYOUT),
      on_corrupt=on_corrupt, name='nabirds', split=split,
      class_names=[names.get(c, c) for c in order], family_of=family_of,
      family_names=[names.get(f, f) for f in families], part_names=part_names,
      **process)


def _read_names(path, layout):
  """Non-empty stripped lines of a one-name-per-line file (variants.txt)."""
  with open(_require(path, layout)) as f:
    names = [line.strip() for line in f if line.strip()]
  if not names:
    raise errors.DataError(f'{path} is empty; expected one name per line')
  return names


_AIRCRAFT_ROW = {'<image_id>': str, '<name>': str}


def aircraft(root, split, *, on_corrupt='raise', **process):
  """FGVC-Aircraft, variant level (`root` = fgvc-aircraft-2013b/, its data/ or parent)."""
  root = _find_root(root, 'variants.txt',
                    ('', 'data', os.path.join('fgvc-aircraft-2013b', 'data')),
                    _AIRCRAFT_LAYOUT)
  join = functools.partial(os.path.join, root)
  class_names = _read_names(join('variants.txt'), _AIRCRAFT_LAYOUT)
  class_index = {name: c for c, name in enumerate(class_names)}
  _split_flag(split)
  subset = 'trainval' if split == 'train' else 'test'
  list_path = join(f'images_variant_{subset}.txt')
  rows = _read_table(list_path, _AIRCRAFT_LAYOUT, _AIRCRAFT_ROW, exact=False)
  ids = [image_id for image_id, _ in rows]
  labels = _lookup(class_index, [variant for _, variant in rows],
                   what='variant', source=list_path,
                   target=join('variants.txt'))
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
      variant_of.update(_read_table(path, _AIRCRAFT_LAYOUT, _AIRCRAFT_ROW,
                                    exact=False))
  family_of_variant = {}
  for subset in ('trainval', 'test'):
    path = os.path.join(root, f'images_family_{subset}.txt')
    if not os.path.exists(path):
      return None, None
    for image_id, family in _read_table(path, _AIRCRAFT_LAYOUT, _AIRCRAFT_ROW,
                                        exact=False):
      if image_id in variant_of:
        family_of_variant[variant_of[image_id]] = family
  families_path = os.path.join(root, 'families.txt')
  if os.path.exists(families_path):
    family_names = _read_names(families_path, _AIRCRAFT_LAYOUT)
  else:
    family_names = sorted(set(family_of_variant.values()))
  family_index = {name: i for i, name in enumerate(family_names)}
  if any(v not in family_of_variant for v in class_index):
    return None, None  # A variant without images: no reliable family table.
  return (_lookup(family_index, [family_of_variant[v] for v in class_index],
                  what='family', source='images_family_*.txt',
                  target=families_path), family_names)


def _load_mat(path, variable, fields=()):
  """One variable of a .mat file (scipy.io.loadmat, squeezed).

  Raises:
    DataError: naming the file when it is unreadable or lacks `variable` or
      one of its struct `fields`.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    value = scipy.io.loadmat(path, squeeze_me=True)[variable]
  except KeyError:
    raise errors.DataError(f'{path} has no variable {variable!r}; expected '
                           f'the Stanford Cars devkit file') from None
  except Exception as e:  # pylint: disable=broad-except
    # scipy raises ValueError, OSError, TypeError or its MatReadError.
    raise errors.DataError(f'{path} is not a readable .mat file '
                           f'({type(e).__name__}: {e}); re-download it') from e
  names = getattr(np.atleast_1d(value).dtype, 'names', None) or ()
  absent = [f for f in fields if f not in names]
  if absent:
    raise errors.DataError(f'{path}: {variable!r} lacks the fields {absent} '
                           f'(has {list(names)})')
  return value


def cars(root, split, *, on_corrupt='raise', **process):
  """Stanford Cars from the manual download (`root` = stanford_cars/)."""
  root = _find_root(root, os.path.join('devkit', 'cars_meta.mat'),
                    ('', 'stanford_cars'), _CARS_LAYOUT)
  meta = os.path.join(root, 'devkit', 'cars_meta.mat')
  class_names = [str(n) for n in np.atleast_1d(_load_mat(meta, 'class_names'))]
  _split_flag(split)
  if split == 'train':
    annos = os.path.join(root, 'devkit', 'cars_train_annos.mat')
    folder = 'cars_train'
  else:
    candidates = [os.path.join(root, 'cars_test_annos_withlabels.mat'),
                  os.path.join(root, 'devkit', 'cars_test_annos_withlabels.mat')]
    annos = next((p for p in candidates if os.path.exists(p)), candidates[0])
    folder = 'cars_test'
  annotations = np.atleast_1d(_load_mat(_require(annos, _CARS_LAYOUT),
                                        'annotations', ('fname', 'class')))
  fnames = [str(a['fname']) for a in annotations]
  labels = [int(a['class']) - 1 for a in annotations]  # .mat classes are 1-based.
  out_of_range = [l + 1 for l in labels if not 0 <= l < len(class_names)]
  if out_of_range:
    raise errors.DataError(
        f'{annos}: class {out_of_range[0]} is outside 1..{len(class_names)}, '
        f'the classes of {meta}')
  family_of, family_names = core.families_by_name('cars', class_names)
  return FolderDataset(
      paths=[os.path.join(root, folder, f) for f in fnames], labels=labels,
      on_corrupt=on_corrupt, name='cars', split=split, class_names=class_names,
      family_of=family_of, family_names=family_names, **process)


# data.name -> loader of its official layout (the 'folders' source).
LOADERS = {'cub': cub, 'cars': cars, 'aircraft': aircraft, 'nabirds': nabirds}


def build(data_cfg, split, *, process_index=0, process_count=1):
  """Builds `data_cfg.name` from `data_cfg.root` (see the module docstring)."""
  if data_cfg.name not in LOADERS:
    raise errors.ConfigError(
        f'data.source=folders has no layout for data.name={data_cfg.name!r}; '
        f'valid: {sorted(LOADERS)}')
  if not data_cfg.root:
    raise errors.ConfigError('data.source=folders needs data.root (the '
                             'dataset folder): --config.data.root=/path')
  if not os.path.isdir(data_cfg.root):
    raise errors.MissingFileError(
        f'data.root={data_cfg.root!r} is not a directory')
  return LOADERS[data_cfg.name](
      data_cfg.root, split, on_corrupt=data_cfg.on_corrupt,
      process_index=process_index, process_count=process_count)
