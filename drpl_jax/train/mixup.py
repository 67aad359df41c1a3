"""Mixup and CutMix on device, inside the jitted train step.

Batch-wise like timm's `Mixup(mode='batch')`: one lambda per batch, each
example is mixed with its partner in the flipped batch (`x[::-1]`). Running
on device (not in the host pipeline) lets an online teacher see exactly the
mixed image the student sees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cutmix_box_mask(
    rng: jax.Array, height: int, width: int, lam: jax.Array
) -> jax.Array:
  """A CutMix box as a bool [H, W] mask (True inside the box), as timm.

  The box has sides `int(H * sqrt(1 - lam))` x `int(W * sqrt(1 - lam))`,
  a uniformly drawn centre, and is clipped to the image.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height)[:, None]  # [H, 1]
  xs = jnp.arange(width)[None, :]  # [1, W]
  return (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)  # [H, W]


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch with its flip by Mixup or CutMix (timm, mode 'batch').

  Args:
    rng: a PRNG key; the whole result is a function of it.
    images: float [B, H, W, C].
    targets: [B, K] class probabilities (one-hot or label-smoothed).
    mixup_alpha: Beta(alpha, alpha) for Mixup's lambda; 0 turns Mixup off.
    cutmix_alpha: Beta(alpha, alpha) for CutMix's box area; 0 turns it off.
    prob: probability that the batch is mixed at all.
    switch_prob: with both on, probability of CutMix instead of Mixup.

  Returns:
    `(images, targets)`, same shapes and dtypes. Targets are
    `lam * t + (1 - lam) * t[::-1]`, where for CutMix lambda is corrected to
    the exact fraction of pixels kept from the original image after the box
    is clipped to the image. Both off -> inputs returned unchanged.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(
        f'mixup_alpha={mixup_alpha} and cutmix_alpha='
        f'{cutmix_alpha} must be >= 0'
    )
  if images.ndim != 4 or targets.ndim != 2:
    raise ValueError(
        f'expected images [B, H, W, C] and targets [B, K], got '
        f'{images.shape} and {targets.shape}'
    )
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return images, targets
  _, height, width, _ = images.shape
  rng_apply, rng_switch, rng_lam, rng_box = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  rng_mix, rng_cut = jax.random.split(rng_lam)
  lam_mix = jax.random.beta(
      rng_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3)
  )
  lam_cut = jax.random.beta(
      rng_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3)
  )
  box = cutmix_box_mask(rng_box, height, width, lam_cut)  # [H, W]
  lam_box = 1.0 - jnp.mean(box.astype(jnp.float32))
  apply = jax.random.uniform(rng_apply) < prob
  lam = jnp.where(use_cutmix, lam_box, lam_mix)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)

  flipped = images[::-1]
  mixed = (
      lam.astype(images.dtype) * images
      + (1.0 - lam).astype(images.dtype) * flipped
  )
  cut = jnp.where(box[None, :, :, None], flipped, images)  # [B, H, W, C]
  out = jnp.where(use_cutmix, cut, mixed)
  out = jnp.where(apply, out, images)
  t = targets.astype(jnp.float32)
  new_targets = lam * t + (1.0 - lam) * t[::-1]
  return out.astype(images.dtype), new_targets.astype(targets.dtype)
