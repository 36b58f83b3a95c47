"""Image augmentations as named ops, with torchvision's semantics, on PIL + numpy.

Every op takes and returns `(image, keypoints)`: `image` a PIL RGB image,
`keypoints` None or a float (P, 3) array of x, y, visible. Keypoints use
continuous pixel coordinates (pixel i spans [i, i + 1)), so a resize scales
them, a crop shifts them, a flip maps x -> W - x, and a point that leaves the
image is marked invisible (its coordinates are still mapped). Random ops also
take a `numpy.random.Generator`; given the same generator state they draw the
same augmentation, which is what makes the input pipeline deterministic.

Pipelines (config `data.train_augment`, docs/method.md §4):
  'released': Resize(resize_size) -> RandomHorizontalFlip -> TrivialAugmentWide
              (bicubic) -> CenterCrop(image_size)       [official trivialaugment.yaml]
  'paper':    RandomResizedCrop(image_size, bicubic) -> RandomHorizontalFlip
  'none':     the test pipeline
  test:       Resize(resize_size, bicubic) -> CenterCrop(image_size)
followed by ToTensor + CLIP normalisation (`normalize`).
"""
import functools
import math

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATION = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
}


def _resample(interpolation):
  """Maps an interpolation name to PIL's enum (ValueError when unknown)."""
  if interpolation not in _INTERPOLATION:
    raise ValueError(f'Unknown interpolation {interpolation!r}; '
                     f'valid: {sorted(_INTERPOLATION)}')
  return _INTERPOLATION[interpolation]


def _mark_outside(keypoints, width, height):
  """Sets visible = 0 for keypoints outside the [0, W) x [0, H) image."""
  x, y = keypoints[:, 0], keypoints[:, 1]
  inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
  keypoints[:, 2] = np.where(inside, keypoints[:, 2], 0.0)
  return keypoints


def _affine_keypoints(keypoints, matrix, width, height):
  """Maps keypoints through the forward map of a PIL inverse-affine `matrix`."""
  if keypoints is None:
    return None
  # PIL's matrix sends output coordinates to input ones; keypoints need the
  # inverse of that (input -> output).
  a, b, c, d, e, f = matrix
  inverse = np.linalg.inv(np.array([[a, b, c], [d, e, f], [0., 0., 1.]]))
  keypoints = keypoints.copy()
  xy1 = np.stack([keypoints[:, 0], keypoints[:, 1],
                  np.ones(len(keypoints))], axis=0)
  keypoints[:, :2] = (inverse @ xy1)[:2].T
  return _mark_outside(keypoints, width, height)


def resized_output_size(width, height, size):
  """Output (W, H) of torchvision's Resize(int): shorter side -> `size`."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def resize(image, keypoints, *, size, interpolation='bilinear'):
  """Resizes the shorter side to `size`, keeping the aspect ratio (torchvision)."""
  width, height = image.size
  new_w, new_h = resized_output_size(width, height, size)
  if (new_w, new_h) == (width, height):
    return image, keypoints
  image = image.resize((new_w, new_h), _resample(interpolation))
  if keypoints is not None:
    keypoints = keypoints.copy()
    keypoints[:, 0] *= new_w / width
    keypoints[:, 1] *= new_h / height
  return image, keypoints


def center_crop(image, keypoints, *, size):
  """Crops the central size x size window, zero-padding smaller images."""
  width, height = image.size
  if size > width or size > height:
    # torchvision pads symmetrically (the extra pixel on the right/bottom).
    pad_l = (size - width) // 2 if size > width else 0
    pad_t = (size - height) // 2 if size > height else 0
    new_w, new_h = max(size, width), max(size, height)
    canvas = Image.new('RGB', (new_w, new_h))
    canvas.paste(image, (pad_l, pad_t))
    image = canvas
    if keypoints is not None:
      keypoints = keypoints.copy()
      keypoints[:, 0] += pad_l
      keypoints[:, 1] += pad_t
    width, height = new_w, new_h
  # Python's round (half to even) is what torchvision uses here.
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  image = image.crop((left, top, left + size, top + size))
  if keypoints is not None:
    keypoints = keypoints.copy()
    keypoints[:, 0] -= left
    keypoints[:, 1] -= top
    keypoints = _mark_outside(keypoints, size, size)
  return image, keypoints


def horizontal_flip(image, keypoints):
  """Mirrors the image left-right."""
  image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if keypoints is not None:
    keypoints = keypoints.copy()
    keypoints[:, 0] = image.size[0] - keypoints[:, 0]
  return image, keypoints


def random_horizontal_flip(image, keypoints, rng, *, p=0.5):
  """Flips with probability `p`."""
  if rng.random() < p:
    return horizontal_flip(image, keypoints)
  return image, keypoints


def random_resized_crop(image, keypoints, rng, *, size, scale=(0.08, 1.0),
                        ratio=(3. / 4., 4. / 3.), interpolation='bicubic'):
  """torchvision RandomResizedCrop: random area/aspect crop resized to size^2."""
  width, height = image.size
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      break
  else:  # Central crop with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
      w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
      w, h = int(round(height * max(ratio))), height
    else:
      w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
  image = image.crop((left, top, left + w, top + h)).resize(
      (size, size), _resample(interpolation))
  if keypoints is not None:
    keypoints = keypoints.copy()
    keypoints[:, 0] = (keypoints[:, 0] - left) * size / w
    keypoints[:, 1] = (keypoints[:, 1] - top) * size / h
    keypoints = _mark_outside(keypoints, size, size)
  return image, keypoints


def _inverse_affine_matrix(center, angle, translate, scale, shear):
  """torchvision's output->input affine matrix (degrees; shear in degrees)."""
  rot = math.radians(angle)
  sx, sy = math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  matrix = [m / scale for m in (d, -b, 0.0, -c, a, 0.0)]
  matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
  matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
  matrix[2] += cx
  matrix[5] += cy
  return matrix


def affine(image, keypoints, *, translate=(0, 0), shear=(0.0, 0.0),
           center=None, interpolation='nearest'):
  """torchvision F.affine (no rotation/scale) with zero fill."""
  width, height = image.size
  if center is None:
    center = (width * 0.5, height * 0.5)
  matrix = _inverse_affine_matrix(center, 0.0, translate, 1.0, shear)
  image = image.transform((width, height), Image.Transform.AFFINE, matrix,
                          _resample(interpolation), fillcolor=(0, 0, 0))
  return image, _affine_keypoints(keypoints, matrix, width, height)


def rotate(image, keypoints, *, angle, interpolation='nearest'):
  """Rotates counter-clockwise by `angle` degrees about the centre (PIL rotate)."""
  width, height = image.size
  image = image.rotate(angle, _resample(interpolation), fillcolor=(0, 0, 0))
  # The same matrix PIL builds for rotate(), to move the keypoints with it.
  theta = -math.radians(angle % 360.0)
  cx, cy = width / 2.0, height / 2.0
  cos, sin = math.cos(theta), math.sin(theta)
  matrix = [cos, sin, 0.0, -sin, cos, 0.0]
  matrix[2] = cos * -cx + sin * -cy + cx
  matrix[5] = -sin * -cx + cos * -cy + cy
  return image, _affine_keypoints(keypoints, matrix, width, height)


def _enhance(enhancer, image, keypoints, *, factor):
  """Applies a PIL ImageEnhance class with `factor` (1 = identity)."""
  return enhancer(image).enhance(factor), keypoints


def _pointwise(fn, image, keypoints, **kwargs):
  """Applies a pixel-wise ImageOps function; keypoints are unchanged."""
  return fn(image, **kwargs), keypoints


# TrivialAugmentWide's op table (torchvision `_augmentation_space` with 31
# bins): name -> (magnitudes, signed).
_NUM_BINS = 31
_TA_WIDE_SPACE = {
    'Identity': (np.array(0.0), False),
    'ShearX': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'ShearY': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'TranslateX': (np.linspace(0.0, 32.0, _NUM_BINS), True),
    'TranslateY': (np.linspace(0.0, 32.0, _NUM_BINS), True),
    'Rotate': (np.linspace(0.0, 135.0, _NUM_BINS), True),
    'Brightness': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'Color': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'Contrast': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'Sharpness': (np.linspace(0.0, 0.99, _NUM_BINS), True),
    'Posterize': (8 - np.round(np.arange(_NUM_BINS) / ((_NUM_BINS - 1) / 6)
                               ).astype(np.int64), False),
    'Solarize': (np.linspace(255.0, 0.0, _NUM_BINS), False),
    'AutoContrast': (np.array(0.0), False),
    'Equalize': (np.array(0.0), False),
}
TA_WIDE_OPS = tuple(_TA_WIDE_SPACE)
# The ops that are one PIL ImageEnhance class each.
_TA_ENHANCERS = {'Brightness': ImageEnhance.Brightness,
                 'Color': ImageEnhance.Color,
                 'Contrast': ImageEnhance.Contrast,
                 'Sharpness': ImageEnhance.Sharpness}


def apply_ta_op(image, keypoints, *, op, magnitude, interpolation='bicubic'):
  """Applies one TrivialAugmentWide op at `magnitude` (torchvision `_apply_op`)."""
  if op == 'Identity':
    return image, keypoints
  if op == 'ShearX':
    # Shear about the top-left corner, as torchvision does for these ops.
    return affine(image, keypoints, shear=(math.degrees(math.atan(magnitude)),
                                           0.0),
                  center=(0.0, 0.0), interpolation=interpolation)
  if op == 'ShearY':
    return affine(image, keypoints, shear=(0.0, math.degrees(
        math.atan(magnitude))), center=(0.0, 0.0), interpolation=interpolation)
  if op == 'TranslateX':
    return affine(image, keypoints, translate=(int(magnitude), 0),
                  interpolation=interpolation)
  if op == 'TranslateY':
    return affine(image, keypoints, translate=(0, int(magnitude)),
                  interpolation=interpolation)
  if op == 'Rotate':
    return rotate(image, keypoints, angle=magnitude,
                  interpolation=interpolation)
  if op in _TA_ENHANCERS:
    # torchvision's enhance ops all take 1 + magnitude (magnitude 0 = identity).
    return _enhance(_TA_ENHANCERS[op], image, keypoints,
                    factor=1.0 + magnitude)
  if op == 'Posterize':
    return _pointwise(ImageOps.posterize, image, keypoints,
                      bits=int(magnitude))
  if op == 'Solarize':
    return _pointwise(ImageOps.solarize, image, keypoints,
                      threshold=magnitude)
  if op == 'AutoContrast':
    return _pointwise(ImageOps.autocontrast, image, keypoints)
  if op == 'Equalize':
    return _pointwise(ImageOps.equalize, image, keypoints)
  raise ValueError(f'Unknown TrivialAugmentWide op {op!r}')


def trivial_augment_wide(image, keypoints, rng, *, interpolation='bicubic'):
  """TrivialAugmentWide: one uniformly drawn op at a uniformly drawn magnitude."""
  op = TA_WIDE_OPS[int(rng.integers(len(TA_WIDE_OPS)))]
  magnitudes, signed = _TA_WIDE_SPACE[op]
  magnitude = (float(magnitudes[int(rng.integers(len(magnitudes)))])
               if magnitudes.ndim > 0 else 0.0)
  if signed and rng.integers(2):
    magnitude = -magnitude
  return apply_ta_op(image, keypoints, op=op, magnitude=magnitude,
                     interpolation=interpolation)


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


class Compose:
  """A named sequence of ops; random ops receive the generator (picklable)."""

  def __init__(self, ops):
    self.ops = tuple(ops)  # ((name, fn, is_random), ...)

  @property
  def names(self):
    """The op names in application order."""
    return tuple(name for name, _, _ in self.ops)

  def __call__(self, image, keypoints=None, rng=None):
    """Applies the ops; returns (float32 (S, S, 3) normalised, keypoints)."""
    image, keypoints = self.apply(image, keypoints, rng)
    return normalize(image), keypoints

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
    ])
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
