"""Robust image decoding to one convention: uint8 RGB `[H, W, 3]`.

Chest X-ray collections mix 8-bit and 16-bit grayscale, RGB, RGBA and palette
PNGs with JPEGs. Every data set builder normalises them here, once, at build
time, and stores PNG-encoded uint8 RGB, so reading never needs OpenCV.

Conventions:
  * Grayscale is replicated to three channels.
  * High bit depth (PIL modes `I;16*`, `I`) is scaled by its actual bit depth:
    `bits = max(8, max_value.bit_length())`, `out = round(x * 255 /
    (2**bits - 1))`. A 12-bit image (max 4095) and a full 16-bit image (max
    65535) both reach 255 at their maximum; nothing is clipped and the
    contrast is not stretched per image beyond the bit depth.
  * Alpha is dropped (the stored colour values are kept, i.e. no compositing;
    radiographs with an alpha channel are opaque in practice).
  * Palette and other modes (1, CMYK, YCbCr, ...) go through PIL's RGB
    conversion. JPEG EXIF orientation is applied.

Bad input raises `ImageError` with the path and a reason; builders skip and
list such files instead of failing halfway through a build.
"""

import io

import numpy as np
import PIL.Image
import PIL.ImageOps

# Extensions the folder scanners treat as images; other files are ignored
# (and counted).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')

DEFAULT_MIN_SIDE = 32

_HIGH_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


class ImageError(ValueError):
  """An image that cannot be used: corrupt, truncated, empty, too small."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


def is_image_path(path: str) -> bool:
  """Whether `path` has one of the image extensions the builders read."""
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _scale_high_bit(array: np.ndarray, path: str) -> np.ndarray:
  """Scales an integer image of more than 8 bits to uint8 by its bit depth."""
  array = array.astype(np.int64)
  if array.size and array.min() < 0:
    raise ImageError(path, f'negative pixel values (min {array.min()})')
  peak = int(array.max()) if array.size else 0
  bits = max(8, peak.bit_length())
  scale = 255.0 / float(2**bits - 1)
  return np.rint(array * scale).astype(np.uint8)


def _to_rgb_array(image: PIL.Image.Image, path: str) -> np.ndarray:
  """Converts a loaded PIL image of any supported mode to uint8 `[H, W, 3]`."""
  mode = image.mode
  if mode in _HIGH_BIT_MODES:
    gray = _scale_high_bit(np.asarray(image), path)
  elif mode == 'L':
    gray = np.asarray(image, dtype=np.uint8)
  elif mode == 'LA':
    gray = np.asarray(image.getchannel('L'), dtype=np.uint8)
  elif mode == 'RGB':
    return np.asarray(image, dtype=np.uint8)
  elif mode == 'RGBA':
    return np.asarray(image, dtype=np.uint8)[..., :3]
  elif mode == 'F':
    raise ImageError(path, 'unsupported image mode F (floating point)')
  else:  # P, PA, 1, CMYK, YCbCr, LAB, HSV, ...
    converted = image.convert(
        'RGBA' if 'transparency' in image.info or mode == 'PA' else 'RGB'
    )
    return np.asarray(converted, dtype=np.uint8)[..., :3]
  if gray.ndim != 2:
    raise ImageError(
        path, f'unexpected array shape {gray.shape} for mode {mode}'
    )
  return np.repeat(gray[:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3]


def decode_image(data: bytes, *, path: str = '<bytes>') -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 RGB `[H, W, 3]` (see module doc).

  Args:
    data: the encoded file contents.
    path: where the bytes came from, used in error messages.

  Returns:
    A C-contiguous uint8 array `[H, W, 3]`.

  Raises:
    ImageError: empty data, not an image, corrupt or truncated data, or an
      unsupported pixel format.
  """
  if not data:
    raise ImageError(path, 'empty file (0 bytes)')
  try:
    image = PIL.Image.open(io.BytesIO(data))
  except PIL.Image.DecompressionBombError as e:
    raise ImageError(path, f'image too large: {e}') from None
  except (PIL.UnidentifiedImageError, OSError, ValueError):
    raise ImageError(path, 'not an image (unrecognised format)') from None
  try:
    with image:
      image.load()
      if image.format == 'JPEG':
        image = PIL.ImageOps.exif_transpose(image)
      array = _to_rgb_array(image, path)
  except ImageError:
    raise
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise ImageError(path, f'corrupt or truncated image: {e}') from None
  return np.ascontiguousarray(array)


def decode_checked(
    data: bytes, *, path: str, min_side: int = DEFAULT_MIN_SIDE
) -> np.ndarray:
  """Like `decode_image`, also rejecting images with a side under `min_side`."""
  image = decode_image(data, path=path)
  height, width = image.shape[:2]
  if min(height, width) < min_side:
    raise ImageError(
        path,
        f'image {width}x{height} is smaller than the '
        f'minimum side {min_side} px',
    )
  return image


def encode_png(image: np.ndarray) -> bytes:
  """PNG-encodes a uint8 `[H, W, 3]` array (the stored format)."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f'expected uint8 [H, W, 3], got {image.dtype} {image.shape}'
    )
  buffer = io.BytesIO()
  # zlib level 3: about the size of level 6 on radiographs, and faster.
  PIL.Image.fromarray(image).save(buffer, format='PNG', compress_level=3)
  return buffer.getvalue()


def decode_png_rgb(data: bytes) -> np.ndarray:
  """Fast path for reading the stored PNGs back: uint8 `[H, W, 3]`."""
  with PIL.Image.open(io.BytesIO(data)) as image:
    if image.mode != 'RGB':
      image = image.convert('RGB')
    return np.asarray(image, dtype=np.uint8)
