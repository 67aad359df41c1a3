"""Resampling of learned position grids when the input resolution changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def resample_grid(grid: Array, new_hw: tuple[int, int]) -> Array:
  """Bicubic resize of a [H, W, C] grid of embeddings to new_hw.

  Matches timm's `resample_abs_pos_embed` (PyTorch bicubic with
  antialias=True, align_corners=False): Keys cubic kernel a=-0.5, weights
  renormalised at the borders, widened when downsampling. Computed in float32
  and cast back, so a constant grid stays constant.
  """
  if grid.ndim != 3:
    raise ValueError(f'resample_grid expects [H, W, C], got {grid.shape}')
  h, w = int(new_hw[0]), int(new_hw[1])
  if h < 1 or w < 1:
    raise ValueError(f'resample_grid: bad target size {new_hw}')
  if (h, w) == tuple(grid.shape[:2]):
    return grid
  out = jax.image.resize(
      grid.astype(jnp.float32),
      (h, w, grid.shape[2]),
      method='bicubic',
      antialias=True,
  )
  return out.astype(grid.dtype)
