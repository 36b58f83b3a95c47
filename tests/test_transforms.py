"""Tests for the image ops, the fused crop-first path and the composed transforms."""
import jax
import numpy as np
import pytest
from PIL import Image

from concepthash_jax.data import crop_first
from concepthash_jax.data import image_ops
from concepthash_jax.data import transforms


def _dot_image(width, height, x, y, radius=2):
  """Black RGB image with a white square dot centred on pixel (x, y)."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[y - radius:y + radius + 1, x - radius:x + radius + 1] = 255
  return Image.fromarray(pixels)


def _dot_centre(image):
  """Centroid of the bright pixels, in continuous pixel coordinates."""
  gray = np.asarray(image, np.float32).mean(-1)
  ys, xs = np.nonzero(gray > 127)
  return xs.mean() + 0.5, ys.mean() + 0.5


def _keypoint(x, y):
  """(1, 3) visible keypoint at the centre of pixel (x, y)."""
  return np.array([[x + 0.5, y + 0.5, 1.0]], np.float32)


def test_resize_shorter_side_like_torchvision():
  image = Image.new('RGB', (300, 200))
  out, _ = image_ops.resize(image, None, size=256)
  assert out.size == (384, 256)  # int(256 * 300 / 200)
  out, _ = image_ops.resize(Image.new('RGB', (200, 301)), None, size=256)
  assert out.size == (256, 385)  # int(256 * 301 / 200) = 385 (truncated)
  same = Image.new('RGB', (256, 300))
  out, _ = image_ops.resize(same, None, size=256)
  assert out is same  # Already the right size: untouched, as torchvision.


def test_center_crop_offsets_and_padding():
  pixels = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
  out, _ = image_ops.center_crop(Image.fromarray(pixels), None, size=4)
  # top = round(1.5) = 2 (half to even), left = round(2.5) = 2.
  np.testing.assert_array_equal(np.asarray(out), pixels[2:6, 2:6])
  out, _ = image_ops.center_crop(Image.fromarray(pixels), None, size=10)
  padded = np.asarray(out)
  assert padded.shape == (10, 10, 3)
  # Padding (0, 1) left and (1, 2) top as torchvision: image starts at (0, 1).
  np.testing.assert_array_equal(padded[1:8, 0:9], pixels)
  assert padded[0].sum() == 0 and padded[:, 9].sum() == 0


def test_test_transform_maps_keypoints_onto_the_same_content():
  image = _dot_image(120, 90, 70, 30)
  fn = transforms.test_transform(image_size=56, resize_size=64)
  out, keypoints = fn(image, np.concatenate([_keypoint(70, 30),
                                             _keypoint(2, 2)]))
  assert out.shape == (56, 56, 3) and out.dtype == np.float32
  pixels = (out * np.array(transforms.CLIP_STD) + np.array(
      transforms.CLIP_MEAN)) * 255
  cx, cy = _dot_centre(Image.fromarray(np.clip(pixels, 0, 255).astype(
      np.uint8)))
  np.testing.assert_allclose(keypoints[0, :2], (cx, cy), atol=1.0)
  assert keypoints[0, 2] == 1.0
  assert keypoints[1, 2] == 0.0  # (2, 2) lies left of the centre crop.


def test_normalize_is_clip_normalisation():
  pixels = np.array([[[0, 128, 255]]], np.uint8)
  out = transforms.normalize(pixels)
  expected = (np.array([0, 128, 255]) / 255.0 - np.array(
      transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)


def test_flip_moves_keypoints_with_the_image():
  image = _dot_image(40, 30, 10, 12)
  out, keypoints = image_ops.horizontal_flip(image, _keypoint(10, 12))
  np.testing.assert_allclose(keypoints[0, :2], _dot_centre(out), atol=1e-4)


@pytest.mark.parametrize('op,magnitude', [
    ('Rotate', 30.0), ('Rotate', -90.0), ('ShearX', 0.5), ('ShearY', -0.4),
    ('TranslateX', 7.0), ('TranslateY', -9.5)])
def test_geometric_ta_ops_move_keypoints_with_the_image(op, magnitude):
  image = _dot_image(64, 64, 38, 25)
  out, keypoints = image_ops.apply_ta_op(
      image, _keypoint(38, 25), op=op, magnitude=magnitude,
      interpolation='nearest')
  assert out.size == (64, 64)
  np.testing.assert_allclose(keypoints[0, :2], _dot_centre(out), atol=1.0)
  assert keypoints[0, 2] == 1.0


def test_translation_out_of_the_image_marks_keypoints_invisible():
  _, keypoints = image_ops.apply_ta_op(
      Image.new('RGB', (64, 64)), _keypoint(60, 30), op='TranslateX',
      magnitude=20.0)
  assert keypoints[0, 2] == 0.0


def test_every_ta_op_keeps_size_and_mode():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  for op in image_ops.TA_WIDE_OPS:
    out, _ = image_ops.apply_ta_op(image, None, op=op, magnitude=0.5 if op
                                    not in ('Posterize', 'Solarize') else 4)
    assert out.size == (48, 40) and out.mode == 'RGB', op


def test_ta_wide_magnitude_bins_match_torchvision():
  space = image_ops._TA_WIDE_SPACE  # pylint: disable=protected-access
  assert len(image_ops.TA_WIDE_OPS) == 14
  assert space['TranslateX'][0][-1] == 32.0  # Wide: absolute pixels.
  assert space['Rotate'][0][-1] == 135.0
  assert space['ShearX'][0][-1] == pytest.approx(0.99)
  posterize = space['Posterize'][0]
  assert posterize[0] == 8 and posterize[-1] == 2 and posterize[3] == 7
  assert space['Solarize'][0][0] == 255.0 and space['Solarize'][0][-1] == 0.0


def test_random_resized_crop_maps_keypoints():
  image = _dot_image(80, 60, 40, 30, radius=3)
  for seed in range(5):
    rng = np.random.default_rng(seed)
    out, keypoints = image_ops.random_resized_crop(
        image, _keypoint(40, 30), rng, size=48, scale=(0.5, 1.0),
        interpolation='bilinear')
    assert out.size == (48, 48)
    if keypoints[0, 2]:
      np.testing.assert_allclose(keypoints[0, :2], _dot_centre(out), atol=1.5)


@pytest.mark.parametrize('augment', ['released', 'paper'])
def test_train_transform_is_deterministic_given_the_rng(augment):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  keypoints = np.array([[30.0, 20.0, 1.0]], np.float32)
  fn = transforms.train_transform(augment, image_size=32, resize_size=36)
  outs = [fn(image, keypoints, np.random.default_rng(seed)) for seed in
          (7, 7, 8, 9, 10)]
  assert outs[0][0].shape == (32, 32, 3) and outs[0][0].dtype == np.float32
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])
  assert any(not np.array_equal(outs[0][0], o[0]) for o in outs[2:])


def test_none_augment_is_the_test_pipeline_and_needs_no_rng():
  image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), np.uint8)
  train, _ = transforms.train_transform('none', image_size=32,
                                        resize_size=36)(image)
  test, _ = transforms.test_transform(image_size=32, resize_size=36)(image)
  np.testing.assert_array_equal(train, test)
  with pytest.raises(ValueError, match='needs an rng'):
    transforms.train_transform('paper', image_size=32, resize_size=36)(image)
  with pytest.raises(ValueError, match='Unknown data.train_augment'):
    transforms.train_transform('autoaugment', image_size=32, resize_size=36)


class _ScriptedRng:
  """Stands in for a Generator: the flip and TrivialAugment draws we choose."""

  def __init__(self, flip, op, bin_index, negative):
    self.flip, self.op, self.bin, self.negative = flip, op, bin_index, negative

  def random(self):
    return 0.0 if self.flip else 0.9

  def integers(self, n):
    if n == len(image_ops.TA_WIDE_OPS):
      return image_ops.TA_WIDE_OPS.index(self.op)
    return int(self.negative) if n == 2 else self.bin


def test_fused_flip_ta_crop_equals_the_ops_for_every_op_and_magnitude():
  rng = np.random.default_rng(3)
  coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  pixels = np.asarray(Image.fromarray(coarse).resize((43, 34), Image.BICUBIC))
  pixels = np.clip(pixels + rng.integers(-9, 10, pixels.shape), 0,
                   255).astype(np.uint8)
  points = np.array([[3.5, 30.0, 1.0], [40.0, 2.0, 1.0], [20.0, 17.0, 1.0]],
                    np.float32)
  for op in image_ops.TA_WIDE_OPS:
    magnitudes, signed = image_ops._TA_WIDE_SPACE[op]  # pylint: disable=protected-access
    for bin_index in range(magnitudes.size):
      for negative in ((False, True) if signed else (False,)):
        for flip in (False, True):
          draws = dict(flip=flip, op=op, bin_index=bin_index,
                       negative=negative)
          image, expected = Image.fromarray(pixels), points.copy()
          image, expected = image_ops.random_horizontal_flip(
              image, expected, _ScriptedRng(**draws))
          image, expected = image_ops.trivial_augment_wide(
              image, expected, _ScriptedRng(**draws))
          image, expected = image_ops.center_crop(image, expected, size=28)
          out, moved = crop_first.flip_ta_crop(
              pixels, points.copy(), _ScriptedRng(**draws), size=28)
          np.testing.assert_array_equal(out, np.asarray(image),
                                        err_msg=str(draws))
          np.testing.assert_array_equal(moved, expected, err_msg=str(draws))


def test_first_stage_points_and_split():
  fn = transforms.train_transform('released', image_size=24, resize_size=32)
  first, rest = fn.split()
  assert first.names == ('resize',) and rest.names == (
      'random_horizontal_flip', 'trivial_augment_wide', 'center_crop')
  test_first, test_rest = transforms.test_transform(
      image_size=24, resize_size=32).split()
  assert test_first.names == ('resize', 'center_crop') and not test_rest.ops
  paper_first, _ = transforms.train_transform(
      'paper', image_size=24, resize_size=32).split()
  assert not paper_first.ops  # RandomResizedCrop reads the source image.
  image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
  points = np.array([[10.0, 5.0, 1.0], [1.0, 29.0, 1.0]], np.float32)
  pixels, expected = test_first.pixels(image, points)
  moved, size = test_first.points(points, (50, 30))
  assert size == (24, 24) == pixels.shape[1::-1]
  np.testing.assert_array_equal(moved, expected)


def test_to_model_input_is_normalize_under_jit():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  out = np.asarray(jax.jit(transforms.to_model_input)(pixels))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, transforms.normalize(pixels))
  np.testing.assert_array_equal(transforms.to_model_input(pixels), out)
  every_byte = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(transforms.to_model_input)(every_byte)),
      transforms.normalize(every_byte))
  normalised = transforms.normalize(pixels)
  assert transforms.to_model_input(normalised) is normalised
