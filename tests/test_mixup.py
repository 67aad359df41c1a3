"""Tests for on-device Mixup/CutMix (drpl_jax.train.mixup)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drpl_jax.train import mixup

B, H, W, K = 4, 12, 10, 4


def _batch():
  # Example i is the constant image i with one-hot target i, so every mixed
  # pixel and target says how much of which source it holds.
  images = jnp.broadcast_to(
      jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 3)
  )
  return images, jax.nn.one_hot(jnp.arange(B), K)


@pytest.mark.parametrize('mix,cut', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_targets_still_sum_to_one(mix, cut):
  images, targets = _batch()
  smoothed = targets * 0.9 + 0.1 / K
  for seed in range(10):
    _, t = mixup.mixup_cutmix(
        jax.random.key(seed),
        images,
        smoothed,
        mixup_alpha=mix,
        cutmix_alpha=cut,
    )
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    assert t.shape == (B, K)


def test_cutmix_target_weight_is_pixel_fraction():
  images, targets = _batch()
  seen_partial = False
  for seed in range(20):
    x, t = mixup.mixup_cutmix(
        jax.random.key(seed), images, targets, mixup_alpha=0.0, cutmix_alpha=1.0
    )
    x, t = np.asarray(x), np.asarray(t)
    for i in range(B):
      partner = B - 1 - i
      own = np.mean(x[i, ..., 0] == i)
      other = np.mean(x[i, ..., 0] == partner)
      assert own + other == pytest.approx(1.0)
      np.testing.assert_allclose(t[i, partner], other, atol=1e-6)
      np.testing.assert_allclose(t[i, i], own, atol=1e-6)
      seen_partial |= 0.0 < other < 1.0
    # The box is the same rectangle for every example.
    box = x[0, ..., 0] != 0
    ys, xs = np.nonzero(box)
    if ys.size:
      assert box.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
  assert seen_partial


def test_mixup_blends_images_and_targets_with_one_lambda():
  images, targets = _batch()
  x, t = mixup.mixup_cutmix(
      jax.random.key(3), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0
  )
  x, t = np.asarray(x), np.asarray(t)
  lam = t[0, 0]
  assert 0.0 < lam < 1.0
  for i in range(B):
    partner = B - 1 - i
    expected = lam * i + (1 - lam) * partner
    np.testing.assert_allclose(x[i], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t[i, i] + t[i, partner], 1.0, rtol=1e-6)


def test_identity_when_off_or_not_applied():
  images, targets = _batch()
  key = jax.random.key(0)
  x, t = mixup.mixup_cutmix(
      key, images, targets, mixup_alpha=0.0, cutmix_alpha=0.0
  )
  assert x is images and t is targets
  x, t = mixup.mixup_cutmix(
      key, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0
  )
  np.testing.assert_array_equal(x, images)
  np.testing.assert_array_equal(t, targets)


def test_switch_prob_selects_cutmix_or_mixup():
  images, targets = _batch()
  for seed in range(5):
    key = jax.random.key(seed)
    x, _ = mixup.mixup_cutmix(
        key, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0
    )
    # CutMix: every pixel comes from one of the two sources, no blend.
    assert set(np.unique(np.asarray(x[1]))) <= {1.0, 2.0}
    x, t = mixup.mixup_cutmix(
        key, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0
    )
    # Mixup: one value per image, the blend the target says.
    np.testing.assert_allclose(
        np.asarray(x[1]), t[1, 1] * 1 + t[1, 2] * 2, rtol=1e-5
    )


def test_deterministic_per_rng_and_jit_compiles():
  images, targets = _batch()
  fn = jax.jit(
      lambda k, x, t: mixup.mixup_cutmix(
          k, x, t, mixup_alpha=0.8, cutmix_alpha=1.0
      )
  )
  a = fn(jax.random.key(1), images, targets)
  b = fn(jax.random.key(1), images, targets)
  eager = mixup.mixup_cutmix(
      jax.random.key(1), images, targets, mixup_alpha=0.8, cutmix_alpha=1.0
  )
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  np.testing.assert_allclose(a[0], eager[0], rtol=1e-6)
  others = [fn(jax.random.key(s), images, targets)[1] for s in range(2, 6)]
  assert any(not np.allclose(a[1], o) for o in others)


def test_keeps_dtypes():
  images, targets = _batch()
  x, t = mixup.mixup_cutmix(
      jax.random.key(0),
      images.astype(jnp.bfloat16),
      targets,
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
  )
  assert x.dtype == jnp.bfloat16 and t.dtype == targets.dtype


def test_bad_arguments_raise():
  images, targets = _batch()
  with pytest.raises(ValueError, match='mixup_alpha'):
    mixup.mixup_cutmix(
        jax.random.key(0), images, targets, mixup_alpha=-1.0, cutmix_alpha=0.0
    )
  with pytest.raises(ValueError, match='targets'):
    mixup.mixup_cutmix(
        jax.random.key(0),
        images,
        targets[:, 0],
        mixup_alpha=0.8,
        cutmix_alpha=0.0,
    )
