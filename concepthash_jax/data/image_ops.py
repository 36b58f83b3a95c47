"""Image ops with torchvision's semantics on PIL + numpy, TrivialAugmentWide among them.

Every op takes and returns `(image, keypoints)`: `image` a PIL RGB image,
`keypoints` None or a float (P, 3) array of x, y, visible. Keypoints use
continuous pixel coordinates (pixel i spans [i, i + 1)), so a resize scales
them, a crop shifts them, a flip maps x -> W - x, and a point that leaves the
image is marked invisible (its coordinates are still mapped). Random ops also
take a `numpy.random.Generator`; given the same generator state they draw the
same augmentation, which is what makes the input pipeline deterministic.
`transforms` composes them into the train and test pipelines.
"""
import math

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

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


def affine_keypoints(keypoints, matrix, width, height):
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


def resize_points(keypoints, image_size, *, size, interpolation=None):
  """`resize`'s effect on keypoints and on the (W, H) image size.

  Args:
    keypoints: None or float (P, 3).
    image_size: (W, H) before the resize.
    size: as `resize`.
    interpolation: unused (keeps `resize`'s keywords).

  Returns:
    (keypoints, (W', H')).
  """
  del interpolation
  width, height = image_size
  new_w, new_h = resized_output_size(width, height, size)
  if keypoints is not None and (new_w, new_h) != (width, height):
    keypoints = keypoints.copy()
    keypoints[:, 0] *= new_w / width
    keypoints[:, 1] *= new_h / height
  return keypoints, (new_w, new_h)


def resize(image, keypoints, *, size, interpolation='bilinear'):
  """Resizes the shorter side to `size`, keeping the aspect ratio (torchvision)."""
  keypoints, new_size = resize_points(keypoints, image.size, size=size)
  if new_size == image.size:
    return image, keypoints
  return image.resize(new_size, _resample(interpolation)), keypoints


def center_crop_geometry(width, height, size):
  """(pad_left, pad_top, left, top) of torchvision's CenterCrop on W x H.

  Padding is symmetric with the extra pixel on the right/bottom; the crop's
  offsets into the padded image use Python's round (half to even), as
  torchvision does.
  """
  pad_l = (size - width) // 2 if size > width else 0
  pad_t = (size - height) // 2 if size > height else 0
  width, height = max(size, width), max(size, height)
  return (pad_l, pad_t, int(round((width - size) / 2.0)),
          int(round((height - size) / 2.0)))


def _shift_points(keypoints, dx, dy):
  """Keypoints moved by (dx, dy) pixels (a copy)."""
  keypoints = keypoints.copy()
  keypoints[:, 0] += dx
  keypoints[:, 1] += dy
  return keypoints


def center_crop_points(keypoints, image_size, *, size):
  """`center_crop`'s effect on keypoints and on the (W, H) image size."""
  if keypoints is not None:
    pad_l, pad_t, left, top = center_crop_geometry(*image_size, size)
    if pad_l or pad_t:
      keypoints = _shift_points(keypoints, pad_l, pad_t)
    keypoints = _mark_outside(_shift_points(keypoints, -left, -top), size,
                              size)
  return keypoints, (size, size)


def center_crop(image, keypoints, *, size):
  """Crops the central size x size window, zero-padding smaller images."""
  width, height = image.size
  pad_l, pad_t, left, top = center_crop_geometry(width, height, size)
  if size > width or size > height:
    canvas = Image.new('RGB', (max(size, width), max(size, height)))
    canvas.paste(image, (pad_l, pad_t))
    image = canvas
  image = image.crop((left, top, left + size, top + size))
  return image, center_crop_points(keypoints, (width, height), size=size)[0]


def horizontal_flip(image, keypoints):
  """Mirrors the image left-right."""
  return (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
          flip_points(keypoints, image.size[0]))


def flip_points(keypoints, width):
  """Keypoints of an image of width W mirrored left-right: x -> W - x."""
  if keypoints is None:
    return None
  keypoints = keypoints.copy()
  keypoints[:, 0] = width - keypoints[:, 0]
  return keypoints


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


def affine_matrix(width, height, *, translate=(0, 0), shear=(0.0, 0.0),
                   center=None):
  """`affine`'s PIL matrix on a W x H image (centre default: the middle)."""
  if center is None:
    center = (width * 0.5, height * 0.5)
  return _inverse_affine_matrix(center, 0.0, translate, 1.0, shear)


def affine(image, keypoints, *, translate=(0, 0), shear=(0.0, 0.0),
           center=None, interpolation='nearest', extent=None):
  """torchvision F.affine (no rotation/scale) with zero fill.

  `extent` (W', H') computes only the output's top-left W' x H' pixels (the
  same values there: PIL maps each output pixel from its own coordinates);
  keypoints are those of the full output.
  """
  width, height = image.size
  matrix = affine_matrix(width, height, translate=translate, shear=shear,
                          center=center)
  image = image.transform(extent or (width, height), Image.Transform.AFFINE,
                          matrix, _resample(interpolation),
                          fillcolor=(0, 0, 0))
  return image, affine_keypoints(keypoints, matrix, width, height)


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
  return image, affine_keypoints(keypoints, matrix, width, height)


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


def ta_translation(op, magnitude):
  """(tx, ty) whole pixels of a TranslateX / TranslateY op (torchvision int())."""
  return (int(magnitude), 0) if op == 'TranslateX' else (0, int(magnitude))


def apply_ta_op(image, keypoints, *, op, magnitude, interpolation='bicubic',
                extent=None):
  """Applies one TrivialAugmentWide op at `magnitude` (torchvision `_apply_op`).

  `extent`: for the shears, compute only the top-left W' x H' (`affine`).
  """
  if op == 'Identity':
    return image, keypoints
  if op == 'ShearX':
    # Shear about the top-left corner, as torchvision does for these ops.
    return affine(image, keypoints, shear=(math.degrees(math.atan(magnitude)),
                                           0.0),
                  center=(0.0, 0.0), interpolation=interpolation,
                  extent=extent)
  if op == 'ShearY':
    return affine(image, keypoints, shear=(0.0, math.degrees(
        math.atan(magnitude))), center=(0.0, 0.0), interpolation=interpolation,
                  extent=extent)
  if op in ('TranslateX', 'TranslateY'):
    return affine(image, keypoints, translate=ta_translation(op, magnitude),
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


def draw_ta_op(rng):
  """TrivialAugmentWide's draw: (op name, signed magnitude), uniform each."""
  op = TA_WIDE_OPS[int(rng.integers(len(TA_WIDE_OPS)))]
  magnitudes, signed = _TA_WIDE_SPACE[op]
  magnitude = (float(magnitudes[int(rng.integers(len(magnitudes)))])
               if magnitudes.ndim > 0 else 0.0)
  if signed and rng.integers(2):
    magnitude = -magnitude
  return op, magnitude


def trivial_augment_wide(image, keypoints, rng, *, interpolation='bicubic'):
  """TrivialAugmentWide: one uniformly drawn op at a uniformly drawn magnitude."""
  op, magnitude = draw_ta_op(rng)
  return apply_ta_op(image, keypoints, op=op, magnitude=magnitude,
                     interpolation=interpolation)
