"""The train and test transforms: `image_ops` composed, then CLIP normalisation.

A `Compose` is a named sequence of ops (data/image_ops.py); its deterministic
leading ops are what the image cache stores, and the released recipe's random
rest has a fused fast form (data/crop_first.py).

Pipelines (config `data.train_augment`, docs/method.md §4):
  'released': Resize(resize_size) -> RandomHorizontalFlip -> TrivialAugmentWide
              (bicubic) -> CenterCrop(image_size)       [official trivialaugment.yaml]
  'paper':    RandomResizedCrop(image_size, bicubic) -> RandomHorizontalFlip
  'none':     the test pipeline
  test:       Resize(resize_size, bicubic) -> CenterCrop(image_size)
followed by ToTensor + CLIP normalisation (`normalize`).
"""
import functools

import numpy as np
from PIL import Image

from concepthash_jax.data import crop_first
from concepthash_jax.data.image_ops import center_crop
from concepthash_jax.data.image_ops import center_crop_points
from concepthash_jax.data.image_ops import random_horizontal_flip
from concepthash_jax.data.image_ops import random_resized_crop
from concepthash_jax.data.image_ops import resize
from concepthash_jax.data.image_ops import resize_points
from concepthash_jax.data.image_ops import trivial_augment_wide

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(image):
  """ToTensor + CLIP normalisation.

  Args:
    image: PIL RGB image or uint8 (H, W, 3) array.

  Returns:
    float32 (H, W, 3) array, (x / 255 - mean) / std per channel.
  """
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  return (pixels - np.array(CLIP_MEAN, np.float32)) / np.array(
      CLIP_STD, np.float32)


def to_model_input(images):
  """CLIP-normalises uint8 batches inside the jitted step; float passes through.

  `data.batches` ships uint8 pixels (a quarter of float32's host->device
  traffic) and the steps call this first. The values are looked up in
  `_NORMALIZED` (numpy's `normalize` of every byte) rather than recomputed:
  XLA rounds `(x / 255 - mean) / std` differently from numpy in the last bit
  for most (byte, channel) pairs, and a last-bit difference in the inputs
  changes a whole training run.

  Args:
    images: uint8 (..., 3) pixels (numpy or jax, traced or not), or an
      already normalised float array.

  Returns:
    float32 (..., 3), equal bit for bit to `normalize` (float input unchanged).
  """
  if images.dtype != np.uint8:
    return images
  if isinstance(images, np.ndarray):
    return _NORMALIZED[images, np.arange(3)]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.asarray(_NORMALIZED)[images.astype(jnp.int32), jnp.arange(3)]


_NORMALIZED = normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3,
                                  axis=1))  # (256, 3): byte, channel.


# Keypoint-and-size versions of the deterministic ops, for images whose
# first stage comes from the cache (data/cache.py): op -> fn(keypoints,
# (W, H), **the op's keywords) -> (keypoints, (W', H')).
_POINT_MAPS = {resize: resize_points, center_crop: center_crop_points}


class Compose:
  """A named sequence of ops; random ops receive the generator (picklable).

  `fused` maps an op position k to a function that does ops[k:] in one go on
  a uint8 array (same draws, same output bit for bit, faster); the cached
  input pipeline uses it after the deterministic first stage.
  """

  def __init__(self, ops, *, fused=None):
    self.ops = tuple(ops)  # ((name, fn, is_random), ...)
    self.fused = dict(fused or {})

  @property
  def names(self):
    """The op names in application order."""
    return tuple(name for name, _, _ in self.ops)

  def __call__(self, image, keypoints=None, rng=None):
    """Applies the ops; returns (float32 (S, S, 3) normalised, keypoints)."""
    image, keypoints = self.apply(image, keypoints, rng)
    return normalize(image), keypoints

  def pixels(self, image, keypoints=None, rng=None):
    """Applies the ops; returns (uint8 (S, S, 3) array, keypoints)."""
    image, keypoints = self.apply(image, keypoints, rng)
    return np.asarray(image), keypoints

  def apply(self, image, keypoints=None, rng=None):
    """Applies the ops; returns (RGB PIL image (S, S), keypoints), unnormalised."""
    if isinstance(image, np.ndarray):
      image = Image.fromarray(image)
    image = image.convert('RGB')
    if keypoints is not None:
      keypoints = np.asarray(keypoints, np.float32).copy()
    for name, fn, is_random in self.ops:
      if is_random:
        if rng is None:
          raise ValueError(f'Op {name} is random and needs an rng')
        image, keypoints = fn(image, keypoints, rng)
      else:
        image, keypoints = fn(image, keypoints)
    if keypoints is not None:
      keypoints = keypoints.astype(np.float32)
    return image, keypoints

  @property
  def num_deterministic(self):
    """How many leading ops draw no random numbers (the cacheable stage)."""
    count = 0
    for _, fn, is_random in self.ops:
      if is_random or getattr(fn, 'func', None) not in _POINT_MAPS:
        break
      count += 1
    return count

  def split(self):
    """(first, rest): the leading deterministic ops and the remaining ones.

    `first` is what the cache stores; `rest.pixels` (or its fused form)
    finishes an image from the cached pixels.
    """
    k = self.num_deterministic
    rest = Compose(self.ops[k:], fused={
        i - k: fn for i, fn in self.fused.items() if i >= k})
    return Compose(self.ops[:k]), rest

  def points(self, keypoints, image_size):
    """The deterministic ops' effect on keypoints and on the (W, H) size."""
    if keypoints is not None:
      keypoints = np.asarray(keypoints, np.float32).copy()
    for name, fn, _ in self.ops:
      if getattr(fn, 'func', None) not in _POINT_MAPS:
        raise ValueError(f'Op {name} has no keypoint-only form')
      keypoints, image_size = _POINT_MAPS[fn.func](keypoints, image_size,
                                                   **fn.keywords)
    if keypoints is not None:
      keypoints = keypoints.astype(np.float32)
    return keypoints, image_size

  def finish(self, pixels, keypoints=None, rng=None):
    """`pixels` on a uint8 array, through the fused form when there is one."""
    if 0 in self.fused:
      if keypoints is not None:
        keypoints = np.asarray(keypoints, np.float32).copy()
      pixels, keypoints = self.fused[0](pixels, keypoints, rng)
      if keypoints is not None:
        keypoints = keypoints.astype(np.float32)
      return pixels, keypoints
    if not self.ops:
      return pixels, keypoints
    return self.pixels(pixels, keypoints, rng)


def test_transform(*, image_size, resize_size):
  """Resize(resize_size, bicubic) -> CenterCrop(image_size) -> normalise."""
  return Compose([
      ('resize', functools.partial(resize, size=resize_size,
                                   interpolation='bicubic'), False),
      ('center_crop', functools.partial(center_crop, size=image_size), False),
  ])


# data.train_augment: the released recipe, the paper's, or the test transform.
TRAIN_AUGMENTS = ('released', 'paper', 'none')


def train_transform(augment, *, image_size, resize_size):
  """The training pipeline named by config `data.train_augment`.

  Args:
    augment: 'released' | 'paper' | 'none'.
    image_size: side S of the square crop fed to the model.
    resize_size: shorter-side size before the crop (released / none).

  Returns:
    A Compose; call it as `fn(image, keypoints, rng)`.
  """
  if augment == 'released':
    return Compose([
        # torchvision's Resize default (bilinear) in the released yaml.
        ('resize', functools.partial(resize, size=resize_size,
                                     interpolation='bilinear'), False),
        ('random_horizontal_flip', random_horizontal_flip, True),
        ('trivial_augment_wide', functools.partial(
            trivial_augment_wide, interpolation='bicubic'), True),
        ('center_crop', functools.partial(center_crop, size=image_size), False),
    ], fused={1: functools.partial(crop_first.flip_ta_crop, size=image_size,
                                    interpolation='bicubic')})
  if augment == 'paper':
    return Compose([
        ('random_resized_crop', functools.partial(
            random_resized_crop, size=image_size, interpolation='bicubic'),
         True),
        ('random_horizontal_flip', random_horizontal_flip, True),
    ])
  if augment == 'none':
    return test_transform(image_size=image_size, resize_size=resize_size)
  raise ValueError(f'Unknown data.train_augment {augment!r}; '
                   f'valid: {list(TRAIN_AUGMENTS)}')
