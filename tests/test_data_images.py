"""Image decoding: every supported format to uint8 RGB, bad input rejected."""

import io

import numpy as np
import PIL.Image
import pytest

from drpl_jax.data import images


def _encode(image: PIL.Image.Image, fmt: str = 'PNG', **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _gradient(height=40, width=48) -> np.ndarray:
  return (np.arange(height * width).reshape(height, width) % 256).astype(
      np.uint8
  )


def test_gray8_replicated_to_rgb():
  gray = _gradient()
  out = images.decode_image(_encode(PIL.Image.fromarray(gray)))
  assert out.dtype == np.uint8 and out.shape == (40, 48, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


@pytest.mark.parametrize('peak', [4095, 65535, 1023])
def test_gray16_scaled_by_bit_depth(peak):
  values = np.linspace(0, peak, 40 * 48).reshape(40, 48).astype(np.uint16)
  image = PIL.Image.fromarray(values)
  assert image.mode.startswith('I;16')
  data = _encode(image)
  assert PIL.Image.open(io.BytesIO(data)).mode in ('I;16', 'I')  # 16-bit PNG
  out = images.decode_image(data)
  assert out.shape == (40, 48, 3)
  assert out.max() == 255 and out[-1, -1, 0] == 255  # the max maps to 255
  assert out[0, 0, 0] == 0
  # Linear in the value, by the bit depth (not clipped at 255).
  bits = int(peak).bit_length()
  expected = np.rint(values.astype(np.float64) * 255 / (2**bits - 1))
  np.testing.assert_array_equal(out[..., 1], expected.astype(np.uint8))


def test_gray16_mode_i16_from_raw_bytes():
  values = np.full((40, 40), 2000, np.uint16)
  values[5, 5] = 4095
  image = PIL.Image.frombytes('I;16', (40, 40), values.tobytes())
  out = images.decode_image(_encode(image))
  assert out[5, 5, 0] == 255
  assert out[0, 0, 0] == round(2000 * 255 / 4095)


def test_rgb_kept():
  rgb = np.random.default_rng(0).integers(0, 256, (33, 35, 3), np.uint8)
  out = images.decode_image(_encode(PIL.Image.fromarray(rgb)))
  np.testing.assert_array_equal(out, rgb)


def test_rgba_alpha_dropped():
  rgba = np.random.default_rng(1).integers(0, 256, (33, 35, 4), np.uint8)
  out = images.decode_image(_encode(PIL.Image.fromarray(rgba)))
  np.testing.assert_array_equal(out, rgba[..., :3])


def test_gray_alpha_dropped():
  la = PIL.Image.fromarray(_gradient()).convert('LA')
  out = images.decode_image(_encode(la))
  np.testing.assert_array_equal(out[..., 2], _gradient())


def test_palette_converted():
  rgb = np.zeros((32, 32, 3), np.uint8)
  rgb[:, 16:] = (200, 10, 30)
  palette = PIL.Image.fromarray(rgb).convert('P', palette=PIL.Image.ADAPTIVE)
  assert palette.mode == 'P'
  out = images.decode_image(_encode(palette))
  np.testing.assert_array_equal(out[0, 0], (0, 0, 0))
  np.testing.assert_array_equal(out[0, 20], (200, 10, 30))


def test_jpeg_gray_and_rgb():
  gray = np.full((40, 40), 128, np.uint8)
  out = images.decode_image(_encode(PIL.Image.fromarray(gray), 'JPEG'))
  assert out.shape == (40, 40, 3) and abs(int(out.mean()) - 128) <= 2
  rgb = np.zeros((40, 40, 3), np.uint8)
  rgb[..., 0] = 250
  out = images.decode_image(_encode(PIL.Image.fromarray(rgb), 'JPEG'))
  assert out[..., 0].mean() > 240 and out[..., 1].mean() < 15


@pytest.mark.parametrize(
    'data,reason',
    [
        (b'', 'empty file'),
        (b'hello, this is text and not an image at all', 'not an image'),
        (b'\x89PNG\r\n\x1a\n' + b'\x00garbage' * 10, 'not an image'),
    ],
)
def test_bad_bytes_raise_with_reason(data, reason):
  with pytest.raises(images.ImageError, match=reason) as info:
    images.decode_image(data, path='x/y.png')
  assert info.value.path == 'x/y.png' and reason in info.value.reason


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_truncated_raises(fmt):
  rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8)
  data = _encode(PIL.Image.fromarray(rgb), fmt)
  with pytest.raises(images.ImageError, match='truncated|corrupt'):
    images.decode_image(data[: len(data) // 2], path='t')


def test_min_side():
  data = _encode(PIL.Image.fromarray(np.zeros((20, 50), np.uint8)))
  assert images.decode_checked(data, path='s', min_side=16).shape == (20, 50, 3)
  with pytest.raises(
      images.ImageError, match='50x20 is smaller than the minimum side 32'
  ):
    images.decode_checked(data, path='s', min_side=32)


def test_png_round_trip():
  rgb = np.random.default_rng(3).integers(0, 256, (7, 9, 3), np.uint8)
  np.testing.assert_array_equal(
      images.decode_png_rgb(images.encode_png(rgb)), rgb
  )
  with pytest.raises(ValueError, match='uint8'):
    images.encode_png(rgb.astype(np.float32))
