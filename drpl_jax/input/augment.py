"""DeiT's training augmentations and eval crop on the host (numpy + PIL).

Every function takes and returns `uint8 [H, W, 3]` images and draws its
randomness from an explicit `np.random.Generator`, so the input pipeline can
make each augmentation a pure function of (seed, epoch, example position).

The recipe follows timm's `transforms_imagenet_train` as DeiT configures it:
random resized crop -> optional horizontal flip -> RandAugment
(`rand-m9-mstd0.5-inc1`) -> random erasing (`pixel` mode, one box).
Differences from timm, all deliberate:

- Random erasing in timm's `pixel` mode fills the box with normal noise in
  normalised space; on uint8 we fill it with uniform random pixels in
  [0, 255] (the normalisation happens later, on device).
- RandAugment's geometric ops fill uncovered pixels with grey 128 (timm's
  default fill) rather than DeiT's ImageNet-mean colour, which would tint a
  grayscale radiograph.
- Speed: when the three channels are equal (every chest X-ray), the crop and
  RandAugment run on one channel and the result is copied to three. This is
  bit-identical to the RGB path for every op (tested), and about 3x cheaper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

INTERPOLATIONS = {
    'bicubic': Image.Resampling.BICUBIC,
    'bilinear': Image.Resampling.BILINEAR,
    'nearest': Image.Resampling.NEAREST,
}
_MAX_LEVEL = 10.0
_FILL = 128


TEACHER_VIEWS = ('student', 'crop')


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The DeiT training recipe; mirrors `config.data.augment`."""

  random_resized_crop: bool = True
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  randaugment_ops: int = 2  # 0 = off
  randaugment_magnitude: float = 9.0
  randaugment_mstd: float = 0.5
  random_erase: float = 0.25  # probability, 0 = off
  repeated_aug: int = 1
  interpolation: str = 'bicubic'
  # What an online teacher sees: 'student' the student's image (DeiT), or
  # 'crop' the same crop (and flip) without RandAugment and erasing, so a
  # teacher trained on clean images is not asked about views unlike its
  # training images (train_views; issue 13, docs/reproduction.md).
  teacher_view: str = 'student'

  def __post_init__(self):
    if self.teacher_view not in TEACHER_VIEWS:
      raise ValueError(
          f'augment.teacher_view={self.teacher_view!r} is not one of '
          f'{TEACHER_VIEWS}'
      )
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(
          f'augment.interpolation={self.interpolation!r} is not '
          f'one of {sorted(INTERPOLATIONS)}'
      )
    if self.repeated_aug < 1:
      raise ValueError(f'augment.repeated_aug={self.repeated_aug} must be >= 1')
    if not 0.0 <= self.random_erase <= 1.0:
      raise ValueError(
          f'augment.random_erase={self.random_erase} is not a probability'
      )

  @classmethod
  def from_config(cls, cfg: Any) -> 'AugmentConfig':
    """Builds the recipe from a `config.data.augment` ConfigDict (or dict)."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    items = dict(cfg.items()) if hasattr(cfg, 'items') else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ValueError(
          f'unknown config.data.augment keys {unknown}; '
          f'known: {sorted(known)}'
      )
    for key in ('crop_scale', 'crop_ratio'):
      if key in items:
        items[key] = tuple(float(v) for v in items[key])
    return cls(**items)


# ----------------------------------------------------------------------------
# Conversions.


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f'expected an image [H, W, 3] (or [H, W, 1]), got shape '
        f'{image.shape}'
    )
  return image


def to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, 3|1] -> PIL image, mode 'L' when all channels are equal."""
  image = _check_image(image)
  if image.shape[-1] == 1:
    return Image.fromarray(np.ascontiguousarray(image[..., 0]), 'L')
  flat = image.reshape(-1, 3)
  if np.array_equal(flat[:, 0], flat[:, 1]) and np.array_equal(
      flat[:, 0], flat[:, 2]
  ):
    return Image.fromarray(np.ascontiguousarray(image[..., 0]), 'L')
  return Image.fromarray(np.ascontiguousarray(image), 'RGB')


def from_pil(img: Image.Image) -> np.ndarray:
  """PIL image -> writable uint8 [H, W, 3] (grey is copied to 3 channels)."""
  if img.mode != 'RGB':
    img = img.convert('RGB')  # grey copied to 3 channels, in C
  return np.array(img)  # [H, W, 3], writable


# ----------------------------------------------------------------------------
# Crops.


def drawn_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int] | None:
  """Inception-style crop tries: a fitting `(top, left, h, w)` or None.

  Up to 10 draws of a box of area `scale * H * W` and aspect ratio
  log-uniform in `ratio`; the first that fits is returned. Shared by
  `rrc_box` and the PyTorch teacher's views, which fall back differently.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


def rrc_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Samples a random-resized-crop box `(top, left, h, w)` like torchvision.

  `drawn_box`'s tries; when none fits, the largest centred box whose aspect
  ratio is clamped to `ratio`.
  """
  box = drawn_box(height, width, rng, scale=scale, ratio=ratio)
  if box is not None:
    return box
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resize_box(
    img: Image.Image, size: int, box: tuple[float, ...], interpolation: str
) -> Image.Image:
  # One resampling of the box straight to [size, size]: crop-then-resize
  # without materialising the crop; reducing_gap speeds up big reductions.
  return img.resize(
      (size, size), INTERPOLATIONS[interpolation], box=box, reducing_gap=3.0
  )


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = 'bicubic',
) -> np.ndarray:
  """Crops a random box (see `rrc_box`) and resizes it to [size, size]."""
  img = to_pil(image)
  top, left, h, w = rrc_box(
      img.height, img.width, rng, scale=scale, ratio=ratio
  )
  return from_pil(
      _resize_box(img, size, (left, top, left + w, top + h), interpolation)
  )


def center_crop_box(
    height: int, width: int, size: int, crop_ratio: float
) -> tuple[float, float, float, float]:
  """The eval crop as a box `(left, top, right, bottom)` in the input.

  Equivalent to resizing the shorter side to `size / crop_ratio` (floored,
  as timm) and centre-cropping `size`, expressed in input coordinates.
  """
  if not 0.0 < crop_ratio <= 1.0:
    raise ValueError(f'crop_ratio={crop_ratio} must be in (0, 1]')
  scale_size = math.floor(size / crop_ratio)
  scale = min(height, width) / scale_size  # input pixels per resized pixel
  new_h = round(height / scale)
  new_w = round(width / scale)
  top = int(round((new_h - size) / 2.0)) * scale
  left = int(round((new_w - size) / 2.0)) * scale
  return (left, top, left + size * scale, top + size * scale)


def eval_resize_crop(
    image: np.ndarray,
    size: int,
    *,
    crop_ratio: float = 0.875,
    interpolation: str = 'bicubic',
) -> np.ndarray:
  """Eval preprocessing: shorter side to size/crop_ratio, centre crop size."""
  img = to_pil(image)
  box = center_crop_box(img.height, img.width, size, crop_ratio)
  return from_pil(_resize_box(img, size, box, interpolation))


def horizontal_flip(
    image: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> np.ndarray:
  """Mirrors the image left-right with probability `prob`."""
  image = _check_image(image)
  if rng.random() < prob:
    return np.ascontiguousarray(image[:, ::-1])
  return image


# ----------------------------------------------------------------------------
# RandAugment (timm's increasing op set, `rand-m{M}-mstd{S}-inc1`).


def _negate(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _fill(img: Image.Image) -> Any:
  return _FILL if img.mode == 'L' else (_FILL,) * len(img.getbands())


def _affine(img: Image.Image, data: tuple[float, ...]) -> Image.Image:
  return img.transform(
      img.size,
      Image.Transform.AFFINE,
      data,
      Image.Resampling.BICUBIC,
      fillcolor=_fill(img),
  )


def _rotate(img, m, rng):
  degrees = _negate(m / _MAX_LEVEL * 30.0, rng)
  return img.rotate(
      degrees, resample=Image.Resampling.BICUBIC, fillcolor=_fill(img)
  )


def _shear_x(img, m, rng):
  return _affine(img, (1, _negate(m / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(img, m, rng):
  return _affine(img, (1, 0, 0, _negate(m / _MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(img, m, rng):
  pixels = _negate(m / _MAX_LEVEL * 0.45, rng) * img.width
  return _affine(img, (1, 0, pixels, 0, 1, 0))


def _translate_y(img, m, rng):
  pixels = _negate(m / _MAX_LEVEL * 0.45, rng) * img.height
  return _affine(img, (1, 0, 0, 0, 1, pixels))


def _posterize(img, m, rng):
  del rng
  bits = 4 - int(m / _MAX_LEVEL * 4)  # 0..4; Pillow refuses 0, so a LUT
  mask = (0xFF << (8 - bits)) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize(img, m, rng):
  del rng
  return ImageOps.solarize(img, 256 - int(m / _MAX_LEVEL * 256))


def _solarize_add(img, m, rng):
  del rng
  add = int(m / _MAX_LEVEL * 110)
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _enhance(enhancer: Callable[[Image.Image], Any]):
  def op(img, m, rng):
    factor = 1.0 + _negate(m / _MAX_LEVEL * 0.9, rng)
    return enhancer(img).enhance(factor)

  return op


def _no_level(fn: Callable[[Image.Image], Image.Image]):
  def op(img, m, rng):
    del m, rng
    return fn(img)

  return op


# The op set of timm's `_RAND_INCREASING_TRANSFORMS`, in timm's order.
RAND_AUGMENT_OPS: dict[str, Callable[..., Image.Image]] = {
    'AutoContrast': _no_level(ImageOps.autocontrast),
    'Equalize': _no_level(ImageOps.equalize),
    'Invert': _no_level(ImageOps.invert),
    'Rotate': _rotate,
    'PosterizeIncreasing': _posterize,
    'SolarizeIncreasing': _solarize,
    'SolarizeAdd': _solarize_add,
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': _shear_x,
    'ShearY': _shear_y,
    'TranslateXRel': _translate_x,
    'TranslateYRel': _translate_y,
}
_OP_NAMES = tuple(RAND_AUGMENT_OPS)


def rand_augment_pil(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
    ops: tuple[str, ...] = _OP_NAMES,
) -> Image.Image:
  """RandAugment on a PIL image (mode 'L' or 'RGB'), as timm's RandAugment.

  Draws `num_ops` ops uniformly with replacement; each is applied with
  probability `prob` at a magnitude drawn from N(magnitude, magnitude_std)
  and clipped to [0, 10].
  """
  for name in ops:
    if name not in RAND_AUGMENT_OPS:
      raise ValueError(
          f'unknown RandAugment op {name!r}; known: '
          f'{list(RAND_AUGMENT_OPS)}'
      )
  if num_ops <= 0:
    return img
  chosen = rng.integers(0, len(ops), size=num_ops)
  for k in chosen:
    if prob < 1.0 and rng.random() > prob:
      continue
    m = magnitude
    if magnitude_std > 0:
      m = rng.normal(magnitude, magnitude_std)
    m = min(max(m, 0.0), _MAX_LEVEL)
    img = RAND_AUGMENT_OPS[ops[k]](img, m, rng)
  return img


def rand_augment(
    image: np.ndarray, rng: np.random.Generator, **options: Any
) -> np.ndarray:
  """RandAugment on a uint8 [H, W, 3] image; `options` are the keywords of
  `rand_augment_pil` (num_ops, magnitude, magnitude_std, prob, ops)."""
  return from_pil(rand_augment_pil(to_pil(image), rng, **options))


# ----------------------------------------------------------------------------
# Random erasing.


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
  """Erases one random box with uniform random pixels, with prob `prob`.

  timm's RandomErasing in `pixel` mode with one box; timm draws normal noise
  in normalised space, on uint8 we draw uniform pixels in [0, 255]. Tries
  10 times to fit the box; modifies and returns a copy.
  """
  image = _check_image(image)
  if prob <= 0 or rng.random() > prob:
    return image
  height, width, channels = image.shape
  max_aspect = max_aspect or 1.0 / min_aspect
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      out = np.array(image)
      out[top : top + h, left : left + w] = rng.integers(
          0, 256, size=(h, w, channels), dtype=np.uint8
      )
      return out
  return image


# ----------------------------------------------------------------------------
# Whole recipes.


def train_views(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    config: AugmentConfig,
) -> dict[str, np.ndarray]:
  """The train recipe's views of one image: uint8 [size, size, 3] each.

  'image' is the student's view: RRC (or a plain resize when off) ->
  hflip -> RandAugment on the small crop -> random erasing, in one PIL
  round trip with no float conversion. With `config.teacher_view='crop'`
  also 'teacher_image': the same crop and flip before the photometric
  operations. The randomness is drawn in that order from `rng`.
  """
  img = to_pil(image)
  if config.random_resized_crop:
    top, left, h, w = rrc_box(
        img.height,
        img.width,
        rng,
        scale=config.crop_scale,
        ratio=config.crop_ratio,
    )
    box = (left, top, left + w, top + h)
  else:
    box = (0, 0, img.width, img.height)
  img = _resize_box(img, size, box, config.interpolation)
  if config.hflip and rng.random() < 0.5:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  views = {}
  if config.teacher_view == 'crop':
    views['teacher_image'] = from_pil(img)
  if config.randaugment_ops > 0:
    img = rand_augment_pil(
        img,
        rng,
        num_ops=config.randaugment_ops,
        magnitude=config.randaugment_magnitude,
        magnitude_std=config.randaugment_mstd,
    )
  out = from_pil(img)
  if config.random_erase > 0:
    out = random_erasing(out, rng, prob=config.random_erase)
  views['image'] = out
  return views


def train_transform(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    config: AugmentConfig,
) -> np.ndarray:
  """The student's view of `train_views`: uint8 [H, W, 3] -> [size, size, 3]."""
  return train_views(image, rng, size=size, config=config)['image']


def eval_transform(
    image: np.ndarray, *, size: int, **options: Any
) -> np.ndarray:
  """Eval preprocessing, uint8 in, uint8 out: `eval_resize_crop`, whose
  keywords (crop_ratio, interpolation) `options` are."""
  return eval_resize_crop(image, size, **options)
