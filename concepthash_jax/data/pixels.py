"""Any image a user hands us -> uint8 (H, W, 3) RGB, scaled as image tools scale it.

One conversion for every decoding path (image files of the 'folders' source,
`ConceptHasher.encode` of files, PIL images and arrays), so that the same picture
gives the same pixels whichever way it arrives:

  8-bit (uint8, PIL 'L', 'RGB', 'P', ...)   as is (PIL's own RGB conversion)
  16-bit (uint16, PIL 'I;16*', 16-bit 'I')  value / 257, rounded (65535 -> 255)
  float (float arrays, PIL 'F')             [0, 1] -> [0, 255], rounded; values
                                            outside [0, 1] are refused (no
                                            guessing of the range)
  grey (H, W) or (H, W, 1)                  copied to the three channels
  RGBA (H, W, 4)                            alpha dropped, as PIL's convert('RGB')

Anything else (other shapes, other dtypes, empty images) is refused with one
sentence naming the shape or mode and what is accepted. Pillow's plain
`convert('RGB')` would instead clip a 16-bit or float image to 255, coding it
like an all-white picture.
"""
import numpy as np
from PIL import Image

from concepthash_jax import errors

ACCEPTED = ('uint8, uint16 or float in [0, 1], shaped (H, W), (H, W, 1) grey, '
            '(H, W, 3) RGB or (H, W, 4) RGBA')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_MAX_16 = 65535


class ImageFormatError(errors.DataError):
  """An image whose shape, dtype or value range cannot be read as a picture."""


def _from_16_bit(values: np.ndarray) -> np.ndarray:
  """0..65535 -> 0..255, rounded (an 8-bit value v stored as 257 v maps back to v)."""
  wide = values.astype(np.uint32)
  return ((wide + 128) // 257).astype(np.uint8)


def _from_float(values: np.ndarray, where: str) -> np.ndarray:
  """[0, 1] -> 0..255, rounded; anything outside [0, 1] refused."""
  values = np.asarray(values, np.float64)
  if values.size and not np.all(np.isfinite(values)):
    raise ImageFormatError(f'{where} holds NaN or infinite values; pass finite '
                           'floats in [0, 1] or uint8.')
  low = float(values.min()) if values.size else 0.0
  high = float(values.max()) if values.size else 0.0
  if low < 0 or high > 1:
    raise ImageFormatError(
        f'{where} is a float image with values in [{low:g}, {high:g}]; float '
        'images must lie in [0, 1] (divide by the maximum of its range), or '
        'pass uint8.')
  return np.round(values * 255).astype(np.uint8)


def _as_uint8(values: np.ndarray, where: str) -> np.ndarray:
  """Values of any accepted dtype -> uint8, scaled."""
  if values.dtype == np.uint8:
    return values
  if values.dtype == np.uint16:
    return _from_16_bit(values)
  if np.issubdtype(values.dtype, np.floating):
    return _from_float(values, where)
  raise ImageFormatError(
      f'{where} has dtype {values.dtype}; accepted: {ACCEPTED} '
      '(e.g. convert with .astype(np.uint8) when its values are 0..255).')


def _three_channels(values: np.ndarray, where: str) -> np.ndarray:
  """uint8 of an accepted shape -> (H, W, 3)."""
  shape = tuple(values.shape)
  if values.ndim == 3 and shape[-1] not in (1, 3, 4) and shape[0] in (1, 3, 4):
    raise ImageFormatError(
        f'{where} has shape {shape}, channels first; accepted: {ACCEPTED}: '
        'transpose it with np.transpose(image, (1, 2, 0)).')
  if values.ndim not in (2, 3) or (values.ndim == 3 and
                                   shape[-1] not in (1, 3, 4)):
    raise ImageFormatError(f'{where} has shape {shape}; accepted: {ACCEPTED}.')
  if shape[0] == 0 or shape[1] == 0:
    raise ImageFormatError(f'{where} has shape {shape}, no pixels; accepted: '
                           f'{ACCEPTED} with H, W >= 1.')
  if values.ndim == 2:
    values = values[..., None]
  if values.shape[-1] == 1:
    return np.repeat(values, 3, axis=-1)
  return np.ascontiguousarray(values[..., :3])


def array_to_rgb(values: np.ndarray, where: str = 'the image array') -> np.ndarray:
  """An image array -> uint8 (H, W, 3) RGB (module doc); ImageFormatError else."""
  values = np.asarray(values)
  if values.ndim == 3 and values.shape[-1] not in (1, 3, 4) and (
      values.shape[0] in (1, 3, 4)):
    return _three_channels(values, where)  # Refused before any scaling.
  return _three_channels(_as_uint8(values, where), where)


def pil_to_rgb(image: Image.Image, where: str = 'the image') -> np.ndarray:
  """A PIL image of any mode -> uint8 (H, W, 3) RGB, 16-bit and float scaled."""
  if image.width == 0 or image.height == 0:
    raise ImageFormatError(f'{where} has size {image.size}, no pixels.')
  if image.mode in _SIXTEEN_BIT_MODES:
    return array_to_rgb(np.asarray(image).astype(np.uint16), where)
  if image.mode == 'I':  # 32-bit ints: Pillow's mode for 16-bit grey PNGs.
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > _MAX_16):
      raise ImageFormatError(
          f'{where} is a 32-bit integer image with values in '
          f'[{values.min()}, {values.max()}]; save it as 8 or 16 bits.')
    return array_to_rgb(values.astype(np.uint16), where)
  if image.mode == 'F':
    return array_to_rgb(np.asarray(image, np.float32), where)
  return np.asarray(image.convert('RGB'))


def to_rgb(image, where: str = '') -> np.ndarray:
  """A PIL image or an array -> uint8 (H, W, 3) RGB (module doc)."""
  if isinstance(image, Image.Image):
    return pil_to_rgb(image, where or 'the image')
  return array_to_rgb(image, where or 'the image array')
