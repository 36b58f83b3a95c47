"""Tests for concepthash_jax.data: sources (synthetic, folders, tfds) and the batch pipeline."""
import io
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from PIL import Image

import data_testlib
from concepthash_jax import data
from concepthash_jax import errors
from concepthash_jax.data import core
from concepthash_jax.data import pipeline
from concepthash_jax.data import synthetic
from concepthash_jax.data import transforms
from concepthash_jax.configs import base


_SYNTHETIC_KEYS = ('num_classes', 'num_families', 'train_per_class',
                   'test_per_class', 'seed', 'clutter')


def _data_cfg(**overrides):
  """config.data from configs/base.py with top-level overrides."""
  cfg = base.get_config().data
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _small_synthetic(**overrides):
  """Synthetic 64-px data, 12 classes / 4 families, 6 + 3 images per class.

  Keys of data.synthetic (num_classes, seed, ...) go there, others to data.
  """
  cfg = _data_cfg(source='synthetic', name='synthetic', image_size=64,
                  resize_size=72, num_workers=0)
  cfg.synthetic.update(dict(train_per_class=6, test_per_class=3,
                            image_size=64))
  for key, value in overrides.items():
    if key in _SYNTHETIC_KEYS:
      cfg.synthetic[key] = value
    else:
      cfg[key] = value
  return cfg


# ------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_seeded():
  cfg = _small_synthetic()
  a, b = data.build(cfg, 'train'), data.build(cfg, 'train')
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.keypoints, b.keypoints)
  test = data.build(cfg, 'test')
  assert not np.array_equal(a.images[:len(test)], test.images)
  other = data.build(_small_synthetic(seed=1), 'train')
  assert not np.array_equal(a.images, other.images)


def test_synthetic_structure():
  ds = data.build(_small_synthetic(), 'train')
  assert len(ds) == 12 * 6 and ds.num_classes == 12
  np.testing.assert_array_equal(np.bincount(ds.labels), np.full(12, 6))
  record = ds[5]
  assert record['image'].shape == (64, 64, 3)
  assert record['image'].dtype == np.uint8
  assert record['keypoints'].shape == (len(ds.part_names), 3)
  # Families: 4 groups of 3 classes sharing the family word and tail colour.
  assert sorted(np.bincount(ds.family_of)) == [3, 3, 3, 3]
  assert len(set(ds.class_names)) == 12
  for c, name in enumerate(ds.class_names):
    assert name.split()[-1] == ds.family_names[ds.family_of[c]]
  for f in range(4):
    members = [c for c in range(12) if ds.family_of[c] == f]
    assert len({ds.class_parts[c]['tail'] for c in members}) == 1
  # Every class uses each palette colour once: same colour budget.
  for parts in ds.class_parts:
    assert sorted(parts.values()) == sorted(synthetic.COLOUR_WORDS)


def test_synthetic_keypoints_sit_on_their_parts():
  ds = data.build(_small_synthetic(), 'train')
  visible = ds.keypoints[..., 2] > 0
  assert visible.mean() > 0.9
  xy = ds.keypoints[..., :2][visible]
  assert np.all((xy >= 0) & (xy < 64))
  # Boxes hold the bird: every visible keypoint lies inside its box (up to
  # a pixel: the beak's sharp tip covers no whole sample).
  low, size = ds.boxes[:, None, :2], ds.boxes[:, None, 2:]
  inside = np.all((ds.keypoints[..., :2] >= low - 1) &
                  (ds.keypoints[..., :2] <= low + size + 1), axis=-1)
  assert inside[visible].all()
  head = ds.part_names.index('head')
  hits = 0
  for image, keypoints, label in zip(ds.images, ds.keypoints, ds.labels):
    x, y = keypoints[head, :2].astype(int)
    colour = synthetic.COLOUR_WORDS.index(ds.class_parts[label]['head'])
    distance = np.abs(image[y, x].astype(float) - synthetic.PALETTE[colour])
    hits += distance.max() < 60
  assert hits >= 0.9 * len(ds)


def test_synthetic_parts_have_equal_visible_area():
  for family in range(4):
    areas = synthetic._Geometry(family).areas()  # pylint: disable=protected-access
    np.testing.assert_allclose(list(areas.values()), synthetic._PART_AREA,  # pylint: disable=protected-access
                               rtol=0.03)


def _colour_histogram(pixels, bins=4):
  """Normalised joint RGB histogram with bins^3 cells."""
  q = pixels.reshape(-1, 3).astype(np.int64) * bins // 256
  counts = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2],
                       minlength=bins ** 3).astype(np.float64)
  return counts / counts.sum()


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
  """Accuracy of the nearest class mean (Euclidean)."""
  centroids = np.stack([train_x[train_y == c].mean(0)
                        for c in range(train_y.max() + 1)])
  distances = ((test_x[:, None] - centroids[None]) ** 2).sum(-1)
  return float((distances.argmin(1) == test_y).mean())


def test_synthetic_classes_need_parts_not_global_colour():
  cfg = _small_synthetic(train_per_class=20, test_per_class=10)
  train, test = data.build(cfg, 'train'), data.build(cfg, 'test')

  def global_features(ds):
    return np.stack([_colour_histogram(image) for image in ds.images])

  def part_features(ds, r=3):
    parts = [ds.part_names.index(p) for p in synthetic.COLOURED_PARTS]
    features = []
    for image, keypoints in zip(ds.images, ds.keypoints):
      crops = []
      for p in parts:
        x, y = np.clip(keypoints[p, :2].astype(int), r, 63 - r)
        crops.append(_colour_histogram(image[y - r:y + r + 1,
                                             x - r:x + r + 1]))
      features.append(np.concatenate(crops))
    return np.stack(features)

  chance = 1 / 12
  global_acc = _nearest_centroid_accuracy(
      global_features(train), train.labels, global_features(test),
      test.labels)
  part_acc = _nearest_centroid_accuracy(
      part_features(train), train.labels, part_features(test), test.labels)
  assert global_acc < chance + 0.1, global_acc  # ~chance: no global cue.
  assert part_acc > 0.8, part_acc  # The parts carry the class.


def test_synthetic_rejects_impossible_structures():
  with pytest.raises(ValueError, match='num_classes'):
    data.build(_small_synthetic(num_classes=30), 'train')
  with pytest.raises(ValueError, match='num_families'):
    data.build(_small_synthetic(num_families=13), 'train')
  with pytest.raises(ValueError, match='split'):
    data.build(_small_synthetic(), 'val')


# -------------------------------------------------------------------- folders


def _write_image(path, colour, size=(20, 16), fmt=None):
  """Writes a solid-colour image file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size, colour).save(path, format=fmt)


def _write_lines(path, lines):
  """Writes text lines."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(line + '\n' for line in lines))


def _make_cub(root, corrupt=False):
  """A 3-class CUB_200_2011 folder; image 6 is corrupt when asked."""
  cub = os.path.join(root, 'CUB_200_2011')
  classes = ['001.Black_footed_Albatross', '002.Laysan_Albatross',
             '003.Sooty_Albatross']
  # images.txt order is not path order (as in the real file).
  images = [(1, '001.Black_footed_Albatross/B_0046.jpg', 1, 1),
            (2, '001.Black_footed_Albatross/B_0009.jpg', 1, 0),
            (3, '002.Laysan_Albatross/L_0002.jpg', 2, 1),
            (4, '002.Laysan_Albatross/L_0001.jpg', 2, 0),
            (5, '003.Sooty_Albatross/S_0003.jpg', 3, 1),
            (6, '003.Sooty_Albatross/S_0004.jpg', 3, 1)]
  for i, path, label, _ in images:
    _write_image(os.path.join(cub, 'images', path), (10 * i, 0, 0))
  if corrupt:
    with open(os.path.join(cub, 'images', images[5][1]), 'wb') as f:
      f.write(b'not a jpeg')
  _write_lines(os.path.join(cub, 'images.txt'),
               [f'{i} {p}' for i, p, _, _ in images])
  _write_lines(os.path.join(cub, 'image_class_labels.txt'),
               [f'{i} {c}' for i, _, c, _ in images])
  _write_lines(os.path.join(cub, 'train_test_split.txt'),
               [f'{i} {t}' for i, _, _, t in images])
  _write_lines(os.path.join(cub, 'classes.txt'),
               [f'{c + 1} {n}' for c, n in enumerate(classes)])
  _write_lines(os.path.join(cub, 'bounding_boxes.txt'),
               [f'{i} {i}.0 2.0 10.0 8.0' for i, *_ in images])
  _write_lines(os.path.join(cub, 'parts', 'parts.txt'),
               ['1 back', '2 left eye'])
  _write_lines(os.path.join(cub, 'parts', 'part_locs.txt'),
               [f'{i} {p} {i + p}.0 {p}.0 {p - 1}' for i, *_ in images
                for p in (1, 2)])
  return cub


def test_cub_folder_split_order_names_and_keypoints(tmp_path):
  cub = _make_cub(str(tmp_path))
  cfg = _data_cfg(source='folders', name='cub', root=str(tmp_path))
  train = data.build(cfg, 'train')
  assert [os.path.basename(p) for p in train.paths] == [
      'B_0046.jpg', 'L_0002.jpg', 'S_0003.jpg', 'S_0004.jpg']
  np.testing.assert_array_equal(train.labels, [0, 1, 2, 2])
  assert train.class_names == ['Black_footed_Albatross', 'Laysan_Albatross',
                               'Sooty_Albatross']
  assert train.family_names == ['Albatross'] and train.family_of == [0, 0, 0]
  assert train.part_names == ('back', 'left eye')
  record = train[1]  # Image id 3.
  assert record['image'].shape == (16, 20, 3) and record['label'] == 1
  np.testing.assert_allclose(record['keypoints'],
                             [[4.0, 1.0, 0.0], [5.0, 2.0, 1.0]])
  np.testing.assert_allclose(record['box'], [3.0, 2.0, 10.0, 8.0])
  # Test transform on 20 x 16 images: Resize(32) scales by 2 (40 x 32), the
  # 24-px centre crop starts at (8, 4).
  cfg.image_size, cfg.resize_size, cfg.num_workers = 24, 32, 0
  batch = next(data.batches(train, cfg, train=False, batch_size=4, seed=0,
                            epoch=0, drop_remainder=False))
  np.testing.assert_allclose(batch['box'][1], [3 * 2 - 8, 2 * 2 - 4, 20, 16])
  np.testing.assert_allclose(batch['keypoints'][1], [[0, -2, 0], [2, 0, 1]])
  test = data.build(_data_cfg(source='folders', name='cub', root=cub), 'test')
  assert [os.path.basename(p) for p in test.paths] == ['B_0009.jpg',
                                                       'L_0001.jpg']
  np.testing.assert_array_equal(test.labels, [0, 1])


def test_corrupt_images_raise_or_are_skipped(tmp_path):
  _make_cub(str(tmp_path), corrupt=True)
  bad = os.path.join('003.Sooty_Albatross', 'S_0004.jpg')
  cfg = _data_cfg(source='folders', name='cub', root=str(tmp_path))
  with pytest.raises(data.CorruptImageError, match=bad):
    data.build(cfg, 'train')
  cfg.on_corrupt = 'skip'
  train = data.build(cfg, 'train')
  assert len(train) == 3 and train.num_skipped == 1
  assert train.skipped[0].endswith(bad)
  np.testing.assert_array_equal(train.labels, [0, 1, 2])
  assert train[2]['keypoints'][0, 0] == 6.0  # Image 5 kept its keypoints.


def test_truncated_jpeg_is_caught_by_the_up_front_scan(tmp_path):
  # Image.verify() passes a JPEG cut in half; the scan decodes it in full.
  cub = _make_cub(str(tmp_path))
  bad = os.path.join(cub, 'images', '002.Laysan_Albatross', 'L_0002.jpg')
  pixels = np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)
  Image.fromarray(pixels).save(bad, format='JPEG')
  with open(bad, 'rb') as f:
    content = f.read()
  with open(bad, 'wb') as f:
    f.write(content[:len(content) // 2])
  with Image.open(bad) as image:
    image.verify()  # Header only: no error.
  cfg = _data_cfg(source='folders', name='cub', root=str(tmp_path))
  with pytest.raises(data.CorruptImageError,
                     match=r'L_0002\.jpg.*truncated.*on_corrupt=skip'):
    data.build(cfg, 'train')
  cfg.on_corrupt = 'skip'
  train = data.build(cfg, 'train')
  assert train.skipped == (bad,) and len(train) == 3
  # It was Laysan's only training image: that class is now empty too.
  assert core.data_warnings(train, data.build(cfg, 'test')) == [
      f"train split: skipped 1 corrupt image(s) (data.on_corrupt='skip'): "
      f'{bad}',
      '1 of 3 classes have no training image, so the model never sees them '
      'and their queries find no relevant database item: Laysan_Albatross']


def test_a_decompression_bomb_is_a_corrupt_image_on_every_read_path(tmp_path,
                                                                   monkeypatch):
  # Pillow raises DecompressionBombError (not an OSError) past 2x MAX_IMAGE_PIXELS:
  # the scan and a direct read (ConceptHasher.encode(path)) both name the file.
  from concepthash_jax.data import folders  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'big.png')
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
  for read in (folders.load_image, folders.check_image):
    with pytest.raises(data.CorruptImageError, match='big.png'):
      read(path)


@pytest.mark.parametrize('file,lines,message', [
    ('images.txt', ['1 001.Black_footed_Albatross/B_0046.jpg', '2'],
     r'images\.txt, line 2: expected "<image_id> <image_name>" \(2 fields\), '
     r"got '2'"),
    ('images.txt', [], r'images\.txt is empty; expected lines '
     r'"<image_id> <image_name>"'),
    ('train_test_split.txt', ['1 1', '2 yes'],
     r"train_test_split\.txt: <is_training_image> must be 1 or 0, got 'yes'"),
    ('train_test_split.txt', ['1 1', '99 1'],
     r"1 image id\(s\) listed in .*train_test_split\.txt are not in "
     r".*images\.txt \(first: '99'\)"),
    ('bounding_boxes.txt', ['1 1.0 2.0 x 4.0'],
     r'bounding_boxes\.txt, line 1: expected "<image_id> <x> <y> <width> '
     r'<height>" with numbers'),
])
def test_malformed_cub_metadata_names_file_line_and_expected(tmp_path, file,
                                                             lines, message):
  cub = _make_cub(str(tmp_path))
  _write_lines(os.path.join(cub, file), lines)
  cfg = _data_cfg(source='folders', name='cub', root=str(tmp_path))
  with pytest.raises(errors.DataError, match=message):
    data.build(cfg, 'train')


def test_missing_files_name_the_path_and_layout(tmp_path):
  cub = _make_cub(str(tmp_path))
  os.remove(os.path.join(cub, 'classes.txt'))
  cfg = _data_cfg(source='folders', name='cub', root=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='classes.txt.*CUB_200_2011/'):
    data.build(cfg, 'train')
  cfg.root = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    data.build(cfg, 'train')
  cfg.root = str(tmp_path / 'CUB_200_2011' / 'images')
  with pytest.raises(FileNotFoundError, match='images.txt'):
    data.build(cfg, 'train')


def test_nabirds_numbers_classes_by_first_appearance(tmp_path):
  root = str(tmp_path / 'nabirds')
  ids = ['aa', 'bb', 'cc', 'dd']
  class_ids = ['817', '295', '817', '296']
  for i, uid in enumerate(ids):
    _write_image(os.path.join(root, 'images', f'{i:04d}', f'{uid}.jpg'),
                 (0, 50 * i, 0))
  _write_lines(os.path.join(root, 'images.txt'),
               [f'{u} {i:04d}/{u}.jpg' for i, u in enumerate(ids)])
  _write_lines(os.path.join(root, 'image_class_labels.txt'),
               [f'{u} {c}' for u, c in zip(ids, class_ids)])
  _write_lines(os.path.join(root, 'train_test_split.txt'),
               ['aa 1', 'bb 1', 'cc 0', 'dd 1'])
  _write_lines(os.path.join(root, 'classes.txt'), [
      '0 Birds', '22 Hawks', '30 Owls', '295 Red-tailed Hawk (Adult)',
      '296 Red-tailed Hawk (Immature)', '817 Barn Owl'])
  _write_lines(os.path.join(root, 'hierarchy.txt'),
               ['295 22', '296 22', '817 30', '22 0', '30 0'])
  cfg = _data_cfg(source='folders', name='nabirds', root=str(tmp_path))
  train = data.build(cfg, 'train')
  assert train.class_names == ['Barn Owl', 'Red-tailed Hawk (Adult)',
                               'Red-tailed Hawk (Immature)']
  np.testing.assert_array_equal(train.labels, [0, 1, 2])
  assert train.family_of == [0, 1, 1]
  assert train.family_names == ['Owls', 'Hawks']
  assert train.part_names == ()
  test = data.build(cfg, 'test')
  np.testing.assert_array_equal(test.labels, [0])
  assert abs(int(test[0]['image'][0, 0, 1]) - 100) <= 3  # JPEG.


def test_aircraft_variants_and_families(tmp_path):
  root = str(tmp_path / 'fgvc-aircraft-2013b' / 'data')
  variants = ['707-320', 'A300B4', 'Cessna 172']
  families = ['Boeing 707', 'A300', 'Cessna 172']
  train = [('0001', 2), ('0002', 0), ('0003', 1)]
  test = [('0004', 1), ('0005', 2)]
  for i, _ in train + test:
    _write_image(os.path.join(root, 'images', f'{i}.jpg'), (0, 0, int(i) * 9))
  _write_lines(os.path.join(root, 'variants.txt'), variants)
  _write_lines(os.path.join(root, 'families.txt'), families)
  for subset, rows in (('trainval', train), ('test', test)):
    _write_lines(os.path.join(root, f'images_variant_{subset}.txt'),
                 [f'{i} {variants[c]}' for i, c in rows])
    _write_lines(os.path.join(root, f'images_family_{subset}.txt'),
                 [f'{i} {families[c]}' for i, c in rows])
  cfg = _data_cfg(source='folders', name='aircraft', root=str(tmp_path))
  ds = data.build(cfg, 'train')
  assert ds.class_names == variants
  np.testing.assert_array_equal(ds.labels, [2, 0, 1])
  assert ds.family_of == [0, 1, 2] and ds.family_names == families
  cfg.root = os.path.dirname(root)  # fgvc-aircraft-2013b/ works as well.
  test_ds = data.build(cfg, 'test')
  np.testing.assert_array_equal(test_ds.labels, [1, 2])
  assert abs(int(test_ds[1]['image'][0, 0, 2]) - 45) <= 3  # JPEG.


def test_cars_from_mat_files(tmp_path):
  root = str(tmp_path / 'stanford_cars')
  names = ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012',
           'Acura TL Sedan 2012']
  data_testlib.write_cars_mats(root, names,
                               [('00002.jpg', 3), ('00001.jpg', 1)],
                               [('00001.jpg', 2)], box=(1, 1, 5, 5))
  for folder, fname in (('cars_train', '00001.jpg'), ('cars_train',
                                                      '00002.jpg'),
                        ('cars_test', '00001.jpg')):
    _write_image(os.path.join(root, folder, fname), (1, 2, 3))
  Image.new('L', (9, 7), 50).save(os.path.join(root, 'cars_train',
                                               '00002.jpg'))  # Grayscale.
  cfg = _data_cfg(source='folders', name='cars', root=root)
  train = data.build(cfg, 'train')
  assert train.class_names == names
  np.testing.assert_array_equal(train.labels, [2, 0])  # 1-based in the .mat.
  assert train.family_names == ['AM', 'Acura'] and train.family_of == [0, 1, 1]
  assert train[0]['image'].shape == (7, 9, 3)  # Converted to RGB.
  np.testing.assert_array_equal(data.build(cfg, 'test').labels, [1])


def test_malformed_cars_aircraft_nabirds_files_name_the_file(tmp_path):
  cars = str(tmp_path / 'stanford_cars')
  data_testlib.write_cars_mats(cars, ['A 1', 'B 2'], [('1.jpg', 3)],
                               [('1.jpg', 1)])
  cfg = _data_cfg(source='folders', name='cars', root=cars)
  with pytest.raises(errors.DataError, match=r'cars_train_annos\.mat: class 3 '
                     r'is outside 1\.\.2, the classes of .*cars_meta\.mat'):
    data.build(cfg, 'train')
  meta = os.path.join(cars, 'devkit', 'cars_meta.mat')
  with open(meta, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(errors.DataError,
                     match=r'cars_meta\.mat is not a readable \.mat file'):
    data.build(cfg, 'train')
  scipy.io.savemat(meta, {'names': np.array(['A 1'], dtype=object)})
  with pytest.raises(errors.DataError,
                     match=r"cars_meta\.mat has no variable 'class_names'"):
    data.build(cfg, 'train')

  aircraft = str(tmp_path / 'fgvc-aircraft-2013b' / 'data')
  _write_lines(os.path.join(aircraft, 'variants.txt'), ['707-320'])
  _write_lines(os.path.join(aircraft, 'images_variant_trainval.txt'),
               ['0001 707-320', '0002'])
  cfg = _data_cfg(source='folders', name='aircraft', root=aircraft)
  with pytest.raises(errors.DataError, match=r'images_variant_trainval\.txt, '
                     r"line 2: expected \"<image_id> <name> \.\.\.\" \(2 "
                     r"fields\), got '0002'"):
    data.build(cfg, 'train')
  _write_lines(os.path.join(aircraft, 'images_variant_trainval.txt'),
               ['0001 A300B4'])
  with pytest.raises(errors.DataError, match=r"1 variant\(s\) listed in "
                     r".*images_variant_trainval\.txt are not in "
                     r".*variants\.txt \(first: 'A300B4'\)"):
    data.build(cfg, 'train')

  nabirds = str(tmp_path / 'nabirds')
  _write_lines(os.path.join(nabirds, 'hierarchy.txt'), ['295 22', '22'])
  cfg = _data_cfg(source='folders', name='nabirds', root=nabirds)
  for name in ('images.txt', 'image_class_labels.txt', 'classes.txt',
               'train_test_split.txt'):
    _write_lines(os.path.join(nabirds, name), ['aa 1'])
  with pytest.raises(errors.DataError,
                     match=r'hierarchy\.txt, line 2: expected "<image_id> '
                     r'<parent_id>" \(2 fields\), got \'22\''):
    data.build(cfg, 'train')


# ----------------------------------------------------------------------- tfds


class ConcepthashTinyBirds(tfds.core.GeneratorBasedBuilder):
  """A real TFDS builder, prepared offline from PNG bytes (no TensorFlow)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=3),
            'label_name': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(9),
            'test': self._generate_examples(4)}

  def _generate_examples(self, count):
    names = ['black_footed_albatross', 'laysan_albatross', 'blue_jay']
    for i in range(count):
      buffer = io.BytesIO()
      Image.new('RGB', (8 + i, 6), (20 * i, 0, 0)).save(buffer, 'PNG')
      yield i, {'image': buffer.getvalue(), 'label': i % 3,
                'label_name': names[i % 3]}


def test_tfds_data_source_reads_array_record_without_tensorflow(tmp_path):
  with pytest.raises(ModuleNotFoundError):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  cfg = _data_cfg(source='tfds', tfds_name='concepthash_tiny_birds',
                  tfds_data_dir=str(tmp_path), image_size=16, resize_size=18,
                  cache_dir=str(tmp_path / 'cache'))
  train = data.build(cfg, 'train')  # Prepares it (array_record) on the way.
  assert len(train) == 9
  assert train.class_names == ['black_footed_albatross', 'laysan_albatross',
                               'blue_jay']
  assert train.family_names == ['albatross', 'jay']
  assert train.family_of == [0, 0, 1]
  by_label = {int(l): i for i, l in enumerate(train.labels)}
  record = train[by_label[2]]
  assert record['label'] == 2 and record['image'].dtype == np.uint8
  test = data.build(cfg, 'test')
  assert len(test) == 4 and test.class_names == train.class_names
  batch = next(data.batches(test, cfg, train=False, batch_size=4, seed=0,
                            epoch=0, drop_remainder=False))
  assert batch['image'].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch['label'], test.labels[:4])
  # Keyed on the split's array_record shards, the first-stage cache gives
  # the pixels of a direct read.
  assert len(os.listdir(os.path.join(cfg.cache_dir))) == 1
  cfg.cache = False
  direct = next(data.batches(test, cfg, train=False, batch_size=4, seed=0,
                             epoch=0, drop_remainder=False))
  np.testing.assert_array_equal(batch['image'], direct['image'])


def test_tfds_mock_data_caltech_birds():
  # mock_data's USE_CODE policy generates records from the builder's code:
  # no metadata files, no TensorFlow.
  cfg = _data_cfg(source='tfds', tfds_name='caltech_birds2011')
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.build(cfg, 'test')
  assert len(ds) == 6 and ds.num_classes == 200 and ds.name == 'cub'
  record = ds[4]
  assert record['image'].ndim == 3 and record['image'].shape[-1] == 3
  assert record['label'] == ds.labels[4]
  batch = next(data.batches(ds, _data_cfg(image_size=32, resize_size=36,
                                          num_workers=0), train=True,
                            batch_size=4, seed=0, epoch=0,
                            drop_remainder=True))
  assert batch['image'].shape == (4, 32, 32, 3)


def test_tfds_cars196_explains_the_dead_download(tmp_path):
  cfg = _data_cfg(source='tfds', tfds_name='cars196',
                  tfds_data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='download URL is gone'):
    data.build(cfg, 'train')


# ------------------------------------------------------------------- pipeline


def _collect(ds, cfg, **kwargs):
  """All batches of one epoch as a list."""
  return list(data.batches(ds, cfg, **kwargs))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_identical_for_any_worker_count():
  cfg = _small_synthetic(train_per_class=2, test_per_class=1)
  ds = data.build(cfg, 'train')
  kwargs = dict(train=True, batch_size=5, seed=3, epoch=1,
                drop_remainder=True)
  reference = _collect(ds, cfg, **kwargs)
  assert len(reference) == 24 // 5
  for workers, kind in ((2, 'thread'), (3, 'thread'), (2, 'process')):
    cfg.num_workers, cfg.worker_type = workers, kind
    _assert_same_batches(reference, _collect(ds, cfg, **kwargs))


def _worker_pids():
  return {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize('workers,kind', [(0, 'thread'), (2, 'thread'),
                                          (2, 'process')])
def test_run_iterator_equals_the_epochs_batches_and_starts_workers_once(
    workers, kind):
  cfg = _small_synthetic(train_per_class=2, test_per_class=1)
  ds = data.build(cfg, 'train')  # 24 images: 4 steps of 5 per epoch.
  kwargs = dict(batch_size=5, seed=3)
  per_epoch = [b for epoch in range(3) for b in _collect(
      ds, cfg, train=True, epoch=epoch, drop_remainder=True, **kwargs)]
  cfg.num_workers, cfg.worker_type = workers, kind
  before = _worker_pids()
  # Steps 3..10: from mid epoch 0, through epoch 1, to mid epoch 2.
  run = data.train_batches(ds, cfg, start_step=2, stop_step=10, **kwargs)
  got, started = [], set()
  for batch in run:
    got.append(batch)
    started |= _worker_pids() - before
  run.close()
  _assert_same_batches(per_epoch[2:10], got)
  # One set of workers for all three epochs, gone once closed.
  assert len(started) == (workers if kind == 'process' else 0)
  assert not _worker_pids() - before


# Iterates process-worker batches as a run does, then exits. It records every
# segment grain opens in it (argv[1]: config.data as JSON) and prints which are
# still in /dev/shm once its iterators are closed.
_SHARED_MEMORY_CHILD = """
import json, os, sys
import ml_collections
import numpy as np
from grain import multiprocessing as grain_mp
from concepthash_jax import data

opened = []
_open = grain_mp.SharedMemoryArray.from_metadata.__func__
def _recording_open(cls, metadata):
  opened.append(metadata.name)
  return _open(cls, metadata)
grain_mp.SharedMemoryArray.from_metadata = classmethod(_recording_open)

def main(cfg):
  ds = data.build(cfg, 'train')
  kwargs = dict(batch_size=5, seed=3, start_step=0, stop_step=8)
  # Two epochs, run to the end (the iterator closes itself), batches kept.
  kept = list(data.train_batches(ds, cfg, **kwargs))
  run = data.train_batches(ds, cfg, **kwargs)
  kept += [next(run), next(run)]  # Stopped mid-epoch (max_steps, SIGTERM).
  run.close()
  linked = [n for n in opened if os.path.exists('/dev/shm/' + n.lstrip('/'))]
  cfg.num_workers = 0  # The kept batches are still the right pixels.
  expected = list(data.train_batches(ds, cfg, **kwargs))
  expected += expected[:2]
  valid = len(kept) == len(expected) and all(
      np.array_equal(a[k], b[k]) for a, b in zip(kept, expected) for k in a)
  # The kept batches die on return, not at interpreter teardown, when grain's
  # SharedMemoryArray.__del__ fails (its module globals are gone).
  return dict(opened=opened, linked=linked, valid=valid)


print(json.dumps(main(ml_collections.ConfigDict(json.loads(sys.argv[1])))))
"""


def test_process_workers_leave_no_shared_memory_behind():
  # grain unlinks a batch's segments when its arrays are collected, and then
  # in a thread pool that multiprocessing stops at exit: batches kept, ones
  # prefetched at close and ones in exception cycles stayed linked after
  # close, and the resource tracker reported them leaked at exit.
  cfg = _small_synthetic(train_per_class=2, test_per_class=1, num_workers=2,
                         worker_type='process')  # 24 images: 4 steps of 5.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [root, os.environ.get('PYTHONPATH', '')]))
  child = subprocess.run(
      [sys.executable, '-c', _SHARED_MEMORY_CHILD, cfg.to_json()], env=env,
      capture_output=True, text=True, timeout=300)
  assert child.returncode == 0, child.stderr
  report = json.loads(child.stdout.splitlines()[-1])
  assert len(report['opened']) >= 10 * 6  # 10 batches of 6 arrays, at least.
  assert report['valid']
  assert report['linked'] == []  # Unlinked by the time the iterators close,
  assert 'leaked shared_memory' not in child.stderr  # none left at exit,
  assert 'Exception ignored' not in child.stderr  # nor failed unlinks.
  # Only names this child opened: other processes may hold segments now.
  assert [n for n in report['opened']
          if os.path.exists('/dev/shm/' + n.lstrip('/'))] == []


def test_train_batches_shuffle_per_epoch_and_augment():
  cfg = _small_synthetic(train_per_class=2, test_per_class=1)
  ds = data.build(cfg, 'train')
  kwargs = dict(train=True, batch_size=8, drop_remainder=True)
  epoch0 = _collect(ds, cfg, seed=0, epoch=0, **kwargs)
  again = _collect(ds, cfg, seed=0, epoch=0, **kwargs)
  epoch1 = _collect(ds, cfg, seed=0, epoch=1, **kwargs)
  _assert_same_batches(epoch0, again)
  order0 = np.concatenate([b['index'] for b in epoch0])
  order1 = np.concatenate([b['index'] for b in epoch1])
  assert sorted(order0) == list(range(24)) and not np.array_equal(
      order0, order1)
  b = epoch0[0]
  assert b['image'].dtype == np.uint8 and b['image'].shape == (8, 64, 64, 3)
  assert b['label'].dtype == np.int32 and b['mask'].all()
  np.testing.assert_array_equal(b['label'], ds.labels[b['index']])
  assert b['keypoints'].shape == (8, len(ds.part_names), 3)
  assert b['box'].shape == (8, 4) and (b['box'][:, 2:] > 0).all()


def test_eval_batches_keep_order_and_pad_with_mask():
  cfg = _small_synthetic(train_per_class=2, test_per_class=1)
  ds = data.build(cfg, 'test')  # 12 images.
  batches = _collect(ds, cfg, train=False, batch_size=5, seed=0, epoch=0,
                     drop_remainder=False)
  assert len(batches) == data.num_batches(12, batch_size=5, process_count=1,
                                          drop_remainder=False) == 3
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(12))
  assert mask.sum() == 12 and not mask[12:].any()
  assert (index[~mask] == -1).all()
  last = batches[-1]
  assert (last['image'][~last['mask']] == 0).all()
  # Test transform: same images whatever the seed/epoch.
  other = _collect(ds, cfg, train=False, batch_size=5, seed=9, epoch=4,
                   drop_remainder=False)
  _assert_same_batches(batches, other)


def test_eval_keypoints_follow_the_test_transform():
  cfg = _small_synthetic(train_per_class=2, test_per_class=1, image_size=56,
                         resize_size=64)
  ds = data.build(cfg, 'test')
  batch = next(data.batches(ds, cfg, train=False, batch_size=12, seed=0,
                            epoch=0, drop_remainder=False))
  head = ds.part_names.index('head')
  pixels = batch['image'].astype(np.float32)
  hits = visible = 0
  for b, index in enumerate(batch['index']):
    x, y, v = batch['keypoints'][b, head]
    if not v:
      continue
    visible += 1
    colour = synthetic.COLOUR_WORDS.index(
        ds.class_parts[ds.labels[index]]['head'])
    hits += np.abs(pixels[b, int(y), int(x)] - synthetic.PALETTE[colour]).max(
    ) < 60
    # Stored images are 64 px, so Resize(64) is the identity and the centre
    # crop shifts by (64 - 56) / 2.
    np.testing.assert_allclose(batch['keypoints'][b, head, :2],
                               ds.keypoints[index, head, :2] - 4, atol=1e-4)
  assert visible >= 10 and hits >= 0.9 * visible


@pytest.mark.parametrize('train', [True, False])
def test_process_shards_are_disjoint_and_cover_the_split(train):
  cfg = _small_synthetic(train_per_class=3, test_per_class=2)
  split = 'train' if train else 'test'
  shards = [data.build(cfg, split, process_index=p, process_count=2)
            for p in range(2)]
  kwargs = dict(train=train, batch_size=4, seed=5, epoch=2,
                drop_remainder=train)
  per_process = [_collect(ds, cfg, **kwargs) for ds in shards]
  assert len(per_process[0]) == len(per_process[1])
  single = data.build(cfg, split)
  global_batches = _collect(single, cfg, **{**kwargs, 'batch_size': 8})
  for step, (a, b) in enumerate(zip(*per_process)):
    ia, ib = a['index'][a['mask']], b['index'][b['mask']]
    assert not set(ia) & set(ib)
    # Stacked in process order, the shards are the global batch.
    np.testing.assert_array_equal(
        np.concatenate([a['index'], b['index']]),
        global_batches[step]['index'])
  seen = np.concatenate([np.concatenate([b['index'][b['mask']] for b in p])
                         for p in per_process])
  n = len(single)
  if train:  # drop_remainder: every full global batch, nothing twice.
    assert len(seen) == len(set(seen)) == n // 8 * 8
  else:
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_process_positions_layout():
  order = np.arange(10)
  p0 = pipeline.process_positions(order, batch_size=2, process_index=0,
                                  process_count=2, drop_remainder=False)
  p1 = pipeline.process_positions(order, batch_size=2, process_index=1,
                                  process_count=2, drop_remainder=False)
  np.testing.assert_array_equal(p0, [0, 1, 4, 5, 8, 9])
  np.testing.assert_array_equal(p1, [2, 3, 6, 7, -1, -1])


def test_unknown_source_and_worker_type():
  with pytest.raises(ValueError, match='data.source'):
    data.build(_data_cfg(source='hub'), 'train')
  cfg = _small_synthetic(train_per_class=1, test_per_class=1, num_workers=0,
                         worker_type='fibers')
  with pytest.raises(ValueError, match='worker_type'):
    data.batches(data.build(cfg, 'test'), cfg, train=False, batch_size=2,
                 seed=0, epoch=0, drop_remainder=False)


def test_display_images_are_the_model_input_before_normalisation():
  cfg = _small_synthetic(train_per_class=1, test_per_class=1)
  ds = data.build(cfg, 'test')
  batch = next(iter(data.batches(ds, cfg, train=False, batch_size=5, seed=0,
                                 epoch=0, drop_remainder=False, display=True)))
  assert batch['display'].dtype == np.uint8
  assert batch['display'].shape == batch['image'].shape
  # 'image' is uint8 too (normalised inside the jitted step): the same pixels.
  np.testing.assert_array_equal(batch['display'], batch['image'])
  np.testing.assert_allclose(transforms.normalize(batch['display'][0]),
                             transforms.to_model_input(batch['image'])[0],
                             atol=1e-6)
  assert 'display' not in next(iter(data.batches(
      ds, cfg, train=False, batch_size=5, seed=0, epoch=0,
      drop_remainder=False)))


def test_family_name_rule_is_per_dataset():
  names = ['Laysan Albatross', 'Sooty_Albatross', 'Blue Jay']
  assert core.families_by_name('cub', names) == ([0, 0, 1],
                                                 ['Albatross', 'Jay'])
  cars = ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012',
          'Acura TL Sedan 2012']
  assert core.families_by_name('cars', cars) == ([0, 1, 1], ['AM', 'Acura'])
  ds = data.build(_small_synthetic(train_per_class=1, test_per_class=1),
                  'train')
  assert core.families(ds) == (ds.family_of, ds.family_names)
