"""RandomHorizontalFlip -> TrivialAugmentWide -> CenterCrop fused, on a uint8 array.

The released train ops after Resize (`image_ops`), drawing the same random
numbers and returning the same pixels and keypoints bit for bit, but doing
less work: the ops that commute with the centre crop run on the crop only.
The cached input pipeline (data/cache.py) finishes its images through it.
"""
import numpy as np
from PIL import Image
from PIL import ImageEnhance

from concepthash_jax.data import image_ops


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
  op, magnitude = image_ops.draw_ta_op(rng)
  _, _, left, top = image_ops.center_crop_geometry(width, height, size)
  if op not in _CROP_FIRST_OPS or min(width, height) < size + 2:
    image, keypoints = Image.fromarray(pixels), keypoints
    if flip:
      image, keypoints = image_ops.horizontal_flip(image, keypoints)
    if op in ('ShearX', 'ShearY') and min(width, height) >= size:
      # Only the pixels up to the crop's far corner are ever read.
      image, keypoints = image_ops.apply_ta_op(
          image, keypoints, op=op, magnitude=magnitude,
          interpolation=interpolation, extent=(left + size, top + size))
      image = image.crop((left, top, left + size, top + size))
      if keypoints is not None:
        keypoints, _ = image_ops.center_crop_points(keypoints, (width, height),
                                                    size=size)
      return np.asarray(image), keypoints
    image, keypoints = image_ops.apply_ta_op(image, keypoints, op=op,
                                             magnitude=magnitude,
                                             interpolation=interpolation)
    image, keypoints = image_ops.center_crop(image, keypoints, size=size)
    return np.asarray(image), keypoints
  if flip:
    keypoints = image_ops.flip_points(keypoints, width)
  if op in ('TranslateX', 'TranslateY'):
    # PIL's bicubic sample at a whole-pixel offset is the source pixel
    # itself (the cubic's weights are 0, 1, 0, 0) and the zero fill outside:
    # the translated crop is the source window shifted back.
    tx, ty = image_ops.ta_translation(op, magnitude)
    if keypoints is not None:
      keypoints = image_ops.affine_keypoints(
          keypoints, image_ops.affine_matrix(width, height, translate=(tx, ty)),
          width, height)
    out = np.asarray(_window(pixels, left - tx, top - ty, size, flip))
  elif op == 'Sharpness':
    # 3x3 smoothing: keep a 1-pixel border so the crop's edge pixels see
    # their true neighbours (PIL copies border pixels unfiltered).
    window = _window(pixels, left - 1, top - 1, size + 2, flip)
    window, _ = image_ops.apply_ta_op(window, None, op=op, magnitude=magnitude)
    out = np.asarray(window)[1:-1, 1:-1]
  elif op == 'Contrast':
    # The blend target is the whole image's mean grey, not the crop's.
    enhancer = ImageEnhance.Contrast(Image.fromarray(pixels))
    enhancer.image = _window(pixels, left, top, size, flip)
    enhancer.degenerate = enhancer.degenerate.crop((0, 0, size, size))
    out = np.asarray(enhancer.enhance(1.0 + magnitude))
  else:
    window = _window(pixels, left, top, size, flip)
    out = np.asarray(image_ops.apply_ta_op(window, None, op=op, magnitude=magnitude)[0])
  if keypoints is not None:
    keypoints, _ = image_ops.center_crop_points(keypoints, (width, height),
                                                size=size)
  return out, keypoints
