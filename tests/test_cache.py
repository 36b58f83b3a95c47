"""Tests for concepthash_jax.data.cache and the cached (fast) input pipeline."""
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

from concepthash_jax import data
from concepthash_jax import errors
from concepthash_jax.data import cache
from concepthash_jax.data import pipeline
from concepthash_jax.data import transforms
from concepthash_jax.configs import base

_SIZES = ((50, 38), (38, 50), (44, 44), (61, 40))  # (W, H), CUB-like aspects.


def _texture(rng, width, height):
  """Smooth colour blobs plus noise: every TrivialAugment op changes it."""
  coarse = (rng.random((height // 6 + 2, width // 6 + 2, 3)) * 255).astype(
      np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                    Image.Resampling.BICUBIC))
  noise = rng.integers(-12, 13, image.shape)
  return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def _write(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, quality=90)


def _make_cub(root, num_images=20, seed=0):
  """A CUB_200_2011 folder of `num_images` textured JPEGs (3/4 train)."""
  rng = np.random.default_rng(seed)
  cub = os.path.join(root, 'CUB_200_2011')
  rows = {name: [] for name in ('images', 'labels', 'split', 'boxes', 'locs')}
  for i in range(1, num_images + 1):
    label = 1 + i % 2
    path = f'{label:03d}.Bird_{label}/img_{i:03d}.jpg'
    width, height = _SIZES[i % len(_SIZES)]
    _write(os.path.join(cub, 'images', path), _texture(rng, width, height))
    rows['images'].append(f'{i} {path}')
    rows['labels'].append(f'{i} {label}')
    rows['split'].append(f'{i} {int(i % 4 != 0)}')
    rows['boxes'].append(f'{i} 3.0 4.0 {width - 9}.0 {height - 10}.0')
    rows['locs'] += [f'{i} 1 {width / 3:.1f} {height / 2:.1f} 1',
                     f'{i} 2 {width - 2:.1f} 1.5 1']
  files = {'images.txt': rows['images'],
           'image_class_labels.txt': rows['labels'],
           'train_test_split.txt': rows['split'],
           'classes.txt': ['1 001.Bird_1', '2 002.Bird_2'],
           'bounding_boxes.txt': rows['boxes'],
           'parts/parts.txt': ['1 back', '2 beak'],
           'parts/part_locs.txt': rows['locs']}
  for name, lines in files.items():
    os.makedirs(os.path.dirname(os.path.join(cub, name)), exist_ok=True)
    with open(os.path.join(cub, name), 'w') as f:
      f.write(''.join(line + '\n' for line in lines))
  return cub


def _cfg(root, **overrides):
  cfg = base.get_config().data
  cfg.update(dict(source='folders', name='cub', root=str(root),
                  image_size=24, resize_size=32, num_workers=0))
  cfg.update(overrides)
  return cfg


def _epoch(ds, cfg, train, epoch=0):
  return list(data.batches(ds, cfg, train=train, batch_size=4, seed=7,
                           epoch=epoch, drop_remainder=False))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype, key
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize('train', [True, False])
def test_cached_batches_equal_todays_bit_for_bit(tmp_path, train):
  _make_cub(str(tmp_path / 'data'))
  cfg = _cfg(tmp_path / 'data', cache_dir=str(tmp_path / 'cache'))
  plain = _cfg(tmp_path / 'data', cache=False)
  ds = data.build(cfg, 'train' if train else 'test')
  for epoch in (0, 1):
    fast = _epoch(ds, cfg, train, epoch)
    _assert_same(fast, _epoch(ds, plain, train, epoch))
    assert fast[0]['image'].dtype == np.uint8
    assert {'keypoints', 'box'} <= set(fast[0])
  # Thread and process workers read the same cache.
  cfg.num_workers = 2
  _assert_same(fast, _epoch(ds, cfg, train, 1))
  if train:
    cfg.worker_type = 'process'
    _assert_same(fast, _epoch(ds, cfg, train, 1))
  # Normalised on the device, the batch equals the uncached float32 transform.
  transform = pipeline.make_transform(cfg, train=train)
  normalise = jax.jit(transforms.to_model_input)
  batch = fast[0]
  for row, index in enumerate(batch['index']):
    rng = np.random.default_rng([7, 1, index, 1]) if train else None
    record = ds[index]
    expected, points = transform(record['image'], record['keypoints'], rng)
    np.testing.assert_allclose(np.asarray(normalise(batch['image']))[row],
                               expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(batch['keypoints'][row], points)
  assert len(os.listdir(tmp_path / 'cache')) == 1


def test_cache_is_built_once_reused_and_rebuilt_when_files_change(
    tmp_path, monkeypatch):
  _make_cub(str(tmp_path / 'data'))
  cfg = _cfg(tmp_path / 'data', cache_dir=str(tmp_path / 'cache'))
  ds = data.build(cfg, 'test')
  builds = []
  build = cache._build
  monkeypatch.setattr(cache, '_build',
                      lambda *a, **k: builds.append(a[3]) or build(*a, **k))
  first = _epoch(ds, cfg, train=False)
  _epoch(ds, cfg, train=False)
  _epoch(data.build(cfg, 'test'), cfg, train=False)  # A later run.
  assert len(builds) == 1
  folder = builds[0]
  assert sorted(os.listdir(folder)) == [
      '.concepthash_jax', 'manifest.json', 'offsets.npy', 'pixels.npy',
      'shapes.npy',
      'source_sizes.npy']
  # Another image in place of the first: new bytes -> rebuilt, new pixels.
  path = ds.paths[0]
  _write(path, _texture(np.random.default_rng(99), 45, 45))
  changed = _epoch(data.build(cfg, 'test'), cfg, train=False)
  assert builds == [folder, folder]
  assert not np.array_equal(changed[0]['image'][0], first[0]['image'][0])
  _assert_same(changed, _epoch(ds, _cfg(tmp_path / 'data', cache=False),
                               train=False))
  # Other transform settings are another cache; the first stays valid.
  other = _cfg(tmp_path / 'data', cache_dir=str(tmp_path / 'cache'),
               resize_size=36)
  _epoch(ds, other, train=False)
  assert len(builds) == 3 and builds[2] != folder
  _epoch(ds, cfg, train=False)
  assert len(builds) == 3


def test_interrupted_build_leaves_no_cache_that_looks_valid(tmp_path,
                                                            monkeypatch):
  _make_cub(str(tmp_path / 'data'))
  cache_dir = tmp_path / 'cache'
  cfg = _cfg(tmp_path / 'data', cache_dir=str(cache_dir))
  ds = data.build(cfg, 'train')
  calls = []
  pixels = transforms.Compose.pixels

  def dies_on_the_fifth(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return pixels(self, *args, **kwargs)

  monkeypatch.setattr(transforms.Compose, 'pixels', dies_on_the_fifth)
  with pytest.raises(KeyboardInterrupt):
    _epoch(ds, cfg, train=True)
  assert not os.listdir(cache_dir)  # Ctrl-C: the partial build is gone.
  monkeypatch.undo()
  # What a killed process leaves: its temporary folder, without a manifest.
  # It is never read as a cache, and the next build removes it.
  fast = _epoch(ds, cfg, train=True)
  [folder] = os.listdir(cache_dir)
  dead = subprocess.Popen(['true'])
  dead.wait()
  stale = cache_dir / f'{folder}.tmp-{socket.gethostname()}-{dead.pid}'
  shutil.copytree(cache_dir / folder, stale)
  os.remove(stale / 'manifest.json')
  shutil.rmtree(cache_dir / folder)
  _assert_same(fast, _epoch(ds, cfg, train=True))
  assert os.listdir(cache_dir) == [folder]
  _assert_same(fast, _epoch(ds, _cfg(tmp_path / 'data', cache=False),
                            train=True))


def test_unwritable_cache_dir_is_a_config_error(tmp_path):
  _make_cub(str(tmp_path / 'data'))
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  cfg = _cfg(tmp_path / 'data', cache_dir=str(blocker / 'cache'))
  ds = data.build(cfg, 'test')
  with pytest.raises(errors.UserError, match='data.cache_dir'):
    _epoch(ds, cfg, train=False)


def test_synthetic_source_is_read_without_a_cache(tmp_path):
  cfg = base.get_config().data
  cfg.update(dict(source='synthetic', name='synthetic', image_size=64,
                  resize_size=72, num_workers=0, cache_dir=str(tmp_path)))
  cfg.synthetic.update(dict(train_per_class=2, test_per_class=1))
  ds = data.build(cfg, 'train')
  first, _ = pipeline.make_transform(cfg, train=True).split()
  assert cache.first_stage_cache(ds, first, cache_dir=str(tmp_path)) is None
  on = _epoch(ds, cfg, train=True)
  cfg.cache = False
  _assert_same(on, _epoch(ds, cfg, train=True))
  assert not os.listdir(tmp_path)
