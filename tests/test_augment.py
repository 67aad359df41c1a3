"""Tests for the host-side DeiT augmentations (drpl_jax.input.augment)."""

import math

import numpy as np
import pytest
from PIL import Image

from drpl_jax.input import augment


def _rgb(seed=0, shape=(48, 40, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _gray_rgb(seed=0, shape=(48, 40)):
  g = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  return np.stack([g, g, g], axis=-1)


def test_rrc_box_fits_and_covers_scale_and_ratio_range():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    top, left, h, w = augment.rrc_box(299, 299, rng)
    assert 0 <= top and top + h <= 299 and 0 <= left and left + w <= 299
    areas.append(h * w / 299**2)
    aspects.append(w / h)
  areas, aspects = np.array(areas), np.array(aspects)
  # Rounding of the sides moves area and ratio slightly off the bounds.
  assert areas.min() >= 0.08 * 0.9 and areas.max() <= 1.0
  assert areas.min() < 0.1 and areas.max() > 0.9
  assert aspects.min() >= 0.75 * 0.95 and aspects.max() <= 4 / 3 * 1.05
  assert aspects.min() < 0.8 and aspects.max() > 1.25


def test_rrc_box_falls_back_to_clamped_center_crop():
  # A 10x1000 strip cannot hold any box of 90%+ area with ratio <= 4/3.
  rng = np.random.default_rng(0)
  box = augment.rrc_box(10, 1000, rng, scale=(0.9, 1.0))
  w = round(10 * 4 / 3)
  assert box == (0, (1000 - w) // 2, 10, w)
  box = augment.rrc_box(1000, 10, rng, scale=(0.9, 1.0))
  h = round(10 / (3 / 4))
  assert box == ((1000 - h) // 2, 0, h, 10)


def test_random_resized_crop_full_box_is_a_plain_resize():
  image = _rgb(1, (50, 50, 3))
  out = augment.random_resized_crop(
      image, 24, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)
  )
  ref = np.asarray(
      Image.fromarray(image).resize((24, 24), Image.Resampling.BICUBIC)
  )
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, ref)


def test_random_resized_crop_takes_content_from_the_box():
  # Left half black, right half white; a crop of a quarter of the width
  # taken entirely from one half must be uniform.
  image = np.zeros((64, 64, 3), np.uint8)
  image[:, 32:] = 255
  rng = np.random.default_rng(3)
  means = [
      augment.random_resized_crop(
          image, 16, rng, scale=(0.02, 0.03), ratio=(1.0, 1.0)
      ).mean()
      for _ in range(50)
  ]
  assert min(means) == 0 and max(means) == 255


def test_eval_crop_is_the_center():
  # 256 = 224 / 0.875: no resize, the crop is image[16:240, 16:240].
  image = _rgb(2, (256, 256, 3))
  out = augment.eval_resize_crop(image, 224, crop_ratio=0.875)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, image[16:240, 16:240])


def test_eval_crop_matches_resize_then_center_crop_on_non_square():
  yy, xx = np.mgrid[0:300, 0:200]
  image = np.stack([(xx + yy) % 256, xx % 256, yy % 256], -1).astype(np.uint8)
  out = augment.eval_resize_crop(image, 56, crop_ratio=0.875)
  # Reference: shorter side (200) -> 64, so 300 -> 96; centre crop 56.
  ref = np.asarray(
      Image.fromarray(image).resize((64, 96), Image.Resampling.BICUBIC)
  )[20:76, 4:60]
  assert out.shape == (56, 56, 3)
  assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3.0


def test_horizontal_flip():
  image = _rgb(3)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(
      augment.horizontal_flip(image, rng, prob=1.0), image[:, ::-1]
  )
  np.testing.assert_array_equal(
      augment.horizontal_flip(image, rng, prob=0.0), image
  )


@pytest.mark.parametrize('name', list(augment.RAND_AUGMENT_OPS))
def test_each_op_gray_fast_path_equals_rgb_path(name):
  gray = _gray_rgb(4, (40, 40))
  op = augment.RAND_AUGMENT_OPS[name]
  out_l = op(Image.fromarray(gray[..., 0], 'L'), 7.0, np.random.default_rng(5))
  out_rgb = op(Image.fromarray(gray, 'RGB'), 7.0, np.random.default_rng(5))
  assert out_l.size == (40, 40) and out_rgb.mode == 'RGB'
  np.testing.assert_array_equal(augment.from_pil(out_l), np.asarray(out_rgb))


@pytest.mark.parametrize('name', list(augment.RAND_AUGMENT_OPS))
def test_each_op_changes_an_image(name):
  # Colour noise in [40, 200): every op, Color and AutoContrast included,
  # has something to change.
  image = np.random.default_rng(0).integers(
      40, 200, (40, 40, 3), dtype=np.uint8
  )
  img = Image.fromarray(image, 'RGB')
  out = np.asarray(
      augment.RAND_AUGMENT_OPS[name](img, 9.0, np.random.default_rng(0))
  )
  assert out.shape == image.shape
  assert not np.array_equal(out, image), name


def test_rand_augment_is_deterministic_per_rng_and_changes_images():
  image = _rgb(6)
  outs = [
      augment.rand_augment(image, np.random.default_rng(s)) for s in range(20)
  ]
  again = augment.rand_augment(image, np.random.default_rng(0))
  np.testing.assert_array_equal(outs[0], again)
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  changed = sum(not np.array_equal(o, image) for o in outs)
  assert changed >= 10  # each of 2 ops applies with prob 0.5: P(none) 1/4
  assert np.array_equal(
      augment.rand_augment(image, np.random.default_rng(0), num_ops=0), image
  )


def test_rand_augment_rejects_unknown_op():
  with pytest.raises(ValueError, match='Nope'):
    augment.rand_augment(_rgb(), np.random.default_rng(0), ops=('Nope',))


def test_random_erasing_probability_and_box_area():
  image = np.full((32, 32, 3), 7, np.uint8)
  rng = np.random.default_rng(0)
  erased, fractions = 0, []
  for _ in range(2000):
    out = augment.random_erasing(image, rng, prob=0.25)
    changed = np.any(out != image, axis=-1)
    if changed.any():
      erased += 1
      ys, xs = np.nonzero(changed)
      box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
      fractions.append(box / 32**2)
  assert np.all(image == 7)  # the input is not modified
  assert abs(erased / 2000 - 0.25) < 0.035
  assert min(fractions) >= 0.01 and max(fractions) <= 0.4
  out = augment.random_erasing(image, rng, prob=1.0)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert np.array_equal(augment.random_erasing(image, rng, prob=0.0), image)


def test_train_transform_shape_dtype_determinism():
  cfg = augment.AugmentConfig(hflip=True)
  image = _rgb(7, (60, 50, 3))
  a = augment.train_transform(
      image, np.random.default_rng(1), size=32, config=cfg
  )
  b = augment.train_transform(
      image, np.random.default_rng(1), size=32, config=cfg
  )
  c = augment.train_transform(
      image, np.random.default_rng(2), size=32, config=cfg
  )
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_teacher_crop_view_is_the_crop_before_the_photometric_ops():
  """teacher_view='crop': the same crop and flip, no RandAugment/erasing."""
  student = augment.AugmentConfig(hflip=True, random_erase=1.0)
  crop = augment.AugmentConfig(
      hflip=True, teacher_view='crop', random_erase=1.0
  )
  bare = augment.AugmentConfig(hflip=True, randaugment_ops=0, random_erase=0.0)
  image = _rgb(7, (60, 50, 3))
  for seed in range(4):
    views = augment.train_views(
        image, np.random.default_rng(seed), size=32, config=crop
    )
    same = lambda cfg, seed=seed: augment.train_transform(
        image, np.random.default_rng(seed), size=32, config=cfg
    )
    # The student's view does not depend on what the teacher sees.
    np.testing.assert_array_equal(views['image'], same(student))
    np.testing.assert_array_equal(views['teacher_image'], same(bare))
    assert not np.array_equal(views['image'], views['teacher_image'])
  assert set(
      augment.train_views(
          image, np.random.default_rng(0), size=32, config=student
      )
  ) == {'image'}
  with pytest.raises(ValueError, match="teacher_view='clean'"):
    augment.AugmentConfig(teacher_view='clean')


def test_train_transform_all_off_is_a_resize():
  cfg = augment.AugmentConfig(
      random_resized_crop=False, randaugment_ops=0, random_erase=0.0
  )
  image = _rgb(8, (60, 50, 3))
  out = augment.train_transform(
      image, np.random.default_rng(0), size=20, config=cfg
  )
  ref = np.asarray(
      Image.fromarray(image).resize((20, 20), Image.Resampling.BICUBIC)
  )
  np.testing.assert_array_equal(out, ref)


def test_train_transform_gray_input_gives_gray_rgb():
  cfg = augment.AugmentConfig(random_erase=0.0)
  out = augment.train_transform(
      _gray_rgb(9, (60, 50)), np.random.default_rng(0), size=24, config=cfg
  )
  assert out.shape == (24, 24, 3)
  assert np.array_equal(out[..., 0], out[..., 1])
  assert np.array_equal(out[..., 0], out[..., 2])


def test_augment_config_from_project_config():
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  cfg = augment.AugmentConfig.from_config(
      drpl_vit.get_config('variant=micro').data.augment
  )
  assert cfg.randaugment_ops == 2 and cfg.random_erase == 0.25
  assert cfg.crop_scale == (0.08, 1.0) and not cfg.hflip
  with pytest.raises(ValueError, match='bogus'):
    augment.AugmentConfig.from_config({'bogus': 1})
  with pytest.raises(ValueError, match='interpolation'):
    augment.AugmentConfig(interpolation='lanczos5')


def test_bad_images_are_rejected():
  with pytest.raises(ValueError, match='uint8'):
    augment.eval_resize_crop(np.zeros((8, 8, 3), np.float32), 4)
  with pytest.raises(ValueError, match='shape'):
    augment.eval_resize_crop(np.zeros((8, 8, 4), np.uint8), 4)
  with pytest.raises(ValueError, match='crop_ratio'):
    augment.eval_resize_crop(np.zeros((8, 8, 3), np.uint8), 4, crop_ratio=0)


def test_center_crop_box_is_centered():
  left, top, right, bottom = augment.center_crop_box(299, 299, 224, 0.875)
  assert math.isclose(left, 299 - right, abs_tol=1.5)
  assert math.isclose(top, 299 - bottom, abs_tol=1.5)
  assert math.isclose(right - left, 224 * 299 / 256)


@pytest.mark.torch
def test_ops_match_timm_rand_augment_ops(monkeypatch):
  aa = pytest.importorskip('timm.data.auto_augment')
  assert set(augment.RAND_AUGMENT_OPS) == set(aa._RAND_INCREASING_TRANSFORMS)
  hparams = {'translate_pct': 0.45, 'magnitude_max': 10}
  kwargs = {'fillcolor': (128, 128, 128), 'resample': Image.Resampling.BICUBIC}
  image = Image.fromarray(_rgb(10, (40, 48, 3)), 'RGB')
  for name, op in augment.RAND_AUGMENT_OPS.items():
    mine = np.asarray(op(image, 7.3, np.random.default_rng(0)))
    refs = []
    for coin in (0.0, 1.0):  # timm negates when random.random() > 0.5
      monkeypatch.setattr(aa.random, 'random', lambda c=coin: c)
      level_fn = aa.LEVEL_TO_ARG[name]
      args = level_fn(7.3, hparams) if level_fn else ()
      refs.append(np.asarray(aa.NAME_TO_OP[name](image, *args, **kwargs)))
    assert any(np.array_equal(mine, r) for r in refs), name
