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


def _center_crop_geometry(width, height, size):
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
    pad_l, pad_t, left, top = _center_crop_geometry(*image_size, size)
    if pad_l or pad_t:
      keypoints = _shift_points(keypoints, pad_l, pad_t)
    keypoints = _mark_outside(_shift_points(keypoints, -left, -top), size,
                              size)
  return keypoints, (size, size)


def center_crop(image, keypoints, *, size):
  """Crops the central size x size window, zero-padding smaller images."""
  width, height = image.size
  pad_l, pad_t, left, top = _center_crop_geometry(width, height, size)
  if size > width or size > height:
    canvas = Image.new('RGB', (max(size, width), max(size, height)))
    canvas.paste(image, (pad_l, pad_t))
    image = canvas
  image = image.crop((left, top, left + size, top + size))
  return image, center_crop_points(keypoints, (width, height), size=size)[0]


def horizontal_flip(image, keypoints):
  """Mirrors the image left-right."""
  return (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
          _flip_points(keypoints, image.size[0]))


def _flip_points(keypoints, width):
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


def _affine_matrix(width, height, *, translate=(0, 0), shear=(0.0, 0.0),
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
  matrix = _affine_matrix(width, height, translate=translate, shear=shear,
                          center=center)
  image = image.transform(extent or (width, height), Image.Transform.AFFINE,
                          matrix, _resample(interpolation),
                          fillcolor=(0, 0, 0))
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


def _ta_translation(op, magnitude):
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
    return affine(image, keypoints, translate=_ta_translation(op, magnitude),
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


# Ops whose output pixel depends only on the same input pixel (with the
# crop's 1-pixel border for Sharpness's 3x3 smoothing, and the whole image's
# mean grey for Contrast): applied after the crop they give the same pixels,
# bit for bit, on the smaller crop.
_CROP_FIRST_OPS = ('Identity', 'Brightness', 'Color', 'Posterize', 'Solarize',
                   'Contrast', 'Sharpness', 'TranslateX', 'TranslateY')


def _window(pixels, left, top, size, flip):
  """PIL image of the size^2 window at (left, top), zero outside the image.

  The window is of `pixels` mirrored left-right when `flip`; only the
  window is copied and mirrored (PIL's transpose: exact).
  """
  height, width = pixels.shape[:2]
  if flip:
    left = width - left - size  # The same columns, seen unmirrored.
  x0, x1 = max(0, left), min(width, left + size)
  y0, y1 = max(0, top), min(height, top + size)
  if (x0, y0, x1, y1) == (left, top, left + size, top + size):
    window = pixels[top:top + size, left:left + size]
  else:
    window = np.zeros((size, size) + pixels.shape[2:], pixels.dtype)
    if x0 < x1 and y0 < y1:
      window[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
  image = Image.fromarray(np.ascontiguousarray(window))
  return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def flip_ta_crop(pixels, keypoints, rng, *, size, interpolation='bicubic'):
  """RandomHorizontalFlip -> TrivialAugmentWide -> CenterCrop on a uint8 array.

  The released train ops after Resize, drawing the same random numbers as
  those three ops of `train_transform('released', ...)` and returning the
  same pixels and keypoints bit for bit, but cheaper: ops that commute with
  the crop (`_CROP_FIRST_OPS`) run on the crop only, whole-pixel
  translations are a shifted copy, and shears stop at the crop's far corner.

  Args:
    pixels: uint8 (H, W, 3), the resized image.
    keypoints: None or float32 (P, 3) in `pixels`' frame.
    rng: numpy Generator (consumed as the ops would).
    size: crop side S.
    interpolation: TrivialAugmentWide's resampling.

  Returns:
    (uint8 (S, S, 3), keypoints or None).
  """
  height, width = pixels.shape[:2]
  flip = rng.random() < 0.5  # random_horizontal_flip's draw.
  op, magnitude = draw_ta_op(rng)
  _, _, left, top = _center_crop_geometry(width, height, size)
  if op not in _CROP_FIRST_OPS or min(width, height) < size + 2:
    image, keypoints = Image.fromarray(pixels), keypoints
    if flip:
      image, keypoints = horizontal_flip(image, keypoints)
    if op in ('ShearX', 'ShearY') and min(width, height) >= size:
      # Only the pixels up to the crop's far corner are ever read.
      image, keypoints = apply_ta_op(
          image, keypoints, op=op, magnitude=magnitude,
          interpolation=interpolation, extent=(left + size, top + size))
      image = image.crop((left, top, left + size, top + size))
      if keypoints is not None:
        keypoints, _ = center_crop_points(keypoints, (width, height),
                                          size=size)
      return np.asarray(image), keypoints
    image, keypoints = apply_ta_op(image, keypoints, op=op,
                                   magnitude=magnitude,
                                   interpolation=interpolation)
    image, keypoints = center_crop(image, keypoints, size=size)
    return np.asarray(image), keypoints
  if flip:
    keypoints = _flip_points(keypoints, width)
  if op in ('TranslateX', 'TranslateY'):
    # PIL's bicubic sample at a whole-pixel offset is the source pixel
    # itself (the cubic's weights are 0, 1, 0, 0) and the zero fill outside:
    # the translated crop is the source window shifted back.
    tx, ty = _ta_translation(op, magnitude)
    if keypoints is not None:
      keypoints = _affine_keypoints(
          keypoints, _affine_matrix(width, height, translate=(tx, ty)),
          width, height)
    out = np.asarray(_window(pixels, left - tx, top - ty, size, flip))
  elif op == 'Sharpness':
    # 3x3 smoothing: keep a 1-pixel border so the crop's edge pixels see
    # their true neighbours (PIL copies border pixels unfiltered).
    window = _window(pixels, left - 1, top - 1, size + 2, flip)
    window, _ = apply_ta_op(window, None, op=op, magnitude=magnitude)
    out = np.asarray(window)[1:-1, 1:-1]
  elif op == 'Contrast':
    # The blend target is the whole image's mean grey, not the crop's.
    enhancer = ImageEnhance.Contrast(Image.fromarray(pixels))
    enhancer.image = _window(pixels, left, top, size, flip)
    enhancer.degenerate = enhancer.degenerate.crop((0, 0, size, size))
    out = np.asarray(enhancer.enhance(1.0 + magnitude))
  else:
    out = np.asarray(apply_ta_op(_window(pixels, left, top, size, flip), None,
                                 op=op, magnitude=magnitude)[0])
  if keypoints is not None:
    keypoints, _ = center_crop_points(keypoints, (width, height), size=size)
  return out, keypoints


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
    ], fused={1: functools.partial(flip_ta_crop, size=image_size,
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
