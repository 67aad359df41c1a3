"""Relative position encodings of the attention layers.

iRPE (Wu et al., ICCV 2021): contextual mode, `product` method with the
piecewise index function. Each patch pair (i, j) gets a bucket b(i, j) from
its 2D displacement (pos_i - pos_j); every pair that involves a prefix token
(cls, dist) gets one extra shared bucket. A learned table r[bucket] is then
used contextually:

  keys:    logits[i, j] += (scale * q_i) . r^K[b(i, j)]
  queries: logits[i, j] += (scale * k_j) . r^Q[b(i, j)]
  values:  out_i        += sum_j p_ij r^V[b(i, j)]

(The reference code's query term reads r^Q[b(j, i)]; the piecewise index is
odd, so that is the same family of functions with the table mirrored.)

The bucket matrix is a numpy constant per (grid, prefix, ratio), computed
once at trace time (cached), never per step.

`bias`: a Swin-style learned table with (2Gh-1)(2Gw-1) entries per head,
indexed by the displacement, plus three BEiT-style entries per head for
prefix->patch, patch->prefix and prefix->prefix pairs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drpl_jax.models.layers import Grid, trunc_normal_02
from drpl_jax.models.resample import resample_grid

Array = jax.Array


def piecewise_index(
    rel: np.ndarray, alpha: float, beta: float, gamma: float
) -> np.ndarray:
  """iRPE's piecewise index g(x) of relative distances (Eq. 18).

  |x| <= alpha is kept; beyond it distances are compressed logarithmically:
  sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) *
  (beta - alpha))), truncated to an integer (as the reference code's cast),
  so outputs lie in [-int(beta), int(beta)].
  """
  rel = np.asarray(rel, np.float64)
  mag = np.abs(rel)
  safe = np.maximum(mag, alpha)  # avoids log(0) in the unused branch
  far = np.minimum(
      beta,
      np.round(
          alpha
          + np.log(safe / alpha) / math.log(gamma / alpha) * (beta - alpha)
      ),
  )
  out = np.where(mag <= alpha, np.round(rel), np.sign(rel) * far)
  return np.trunc(out).astype(np.int64)


def irpe_params(ratio: float) -> tuple[float, float, float]:
  """(alpha, beta, gamma) = (1, 2, 8) * ratio."""
  return 1.0 * ratio, 2.0 * ratio, 8.0 * ratio


def irpe_side(ratio: float) -> int:
  """Number of distinct piecewise-index values per axis, 2 int(beta) + 1."""
  return 2 * int(irpe_params(ratio)[1]) + 1


def irpe_num_buckets(ratio: float) -> int:
  """Buckets of the 2D product method plus the one shared prefix bucket."""
  return irpe_side(ratio) ** 2 + 1


def grid_positions(grid_h: int, grid_w: int) -> np.ndarray:
  """(row, col) of every patch in row-major token order, [N, 2]."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  return np.stack([rows.ravel(), cols.ravel()], axis=-1)


@functools.lru_cache(maxsize=64)
def irpe_bucket_ids(
    grid_h: int, grid_w: int, num_prefix: int, ratio: float
) -> np.ndarray:
  """iRPE bucket b(i, j) of every token pair, [L, L] int32, L = prefix + N.

  Rows are queries, columns keys. Pairs with a prefix token map to the extra
  bucket side**2 (the last one).
  """
  alpha, beta, gamma = irpe_params(ratio)
  half, side = int(beta), irpe_side(ratio)
  pos = grid_positions(grid_h, grid_w)
  diff = pos[:, None, :] - pos[None, :, :]  # [N, N, 2]
  r = piecewise_index(diff[..., 0], alpha, beta, gamma) + half
  c = piecewise_index(diff[..., 1], alpha, beta, gamma) + half
  n = grid_h * grid_w
  ids = np.full((num_prefix + n, num_prefix + n), side * side, np.int32)
  ids[num_prefix:, num_prefix:] = r * side + c
  ids.setflags(write=False)
  return ids


class IRPE(nnx.Module):
  """One contextual iRPE table, [buckets, hd] (shared) or [h, buckets, hd].

  Zero-initialised as in the reference code, so a fresh model starts as the
  same model without RPE.
  """

  def __init__(
      self,
      num_heads: int,
      head_dim: int,
      ratio: float,
      shared_heads: bool,
      param_dtype: jnp.dtype,
  ):
    nb = irpe_num_buckets(ratio)
    shape = (nb, head_dim) if shared_heads else (num_heads, nb, head_dim)
    self.table = nnx.Param(jnp.zeros(shape, param_dtype))
    self.ratio = ratio

  def _project(self, x: Array) -> Array:
    """x [B, L, h, hd] . table -> [B, h, L, buckets] in float32."""
    table = self.table[...].astype(x.dtype)
    eq = 'blhd,kd->bhlk' if table.ndim == 2 else 'blhd,hkd->bhlk'
    return jnp.einsum(eq, x, table, preferred_element_type=jnp.float32)

  def key_bias(self, q_scaled: Array, grid: Grid, num_prefix: int) -> Array:
    """(scale q_i) . r[b(i, j)] as an additive logit bias, [B, h, L, L]."""
    ids = irpe_bucket_ids(*grid, num_prefix, self.ratio)
    proj = self._project(q_scaled)  # [B, h, Lq, buckets]
    rows = np.arange(ids.shape[0])[:, None]
    return proj[:, :, rows, ids]  # [B, h, Lq, Lk]

  def query_bias(self, k_scaled: Array, grid: Grid, num_prefix: int) -> Array:
    """(scale k_j) . r[b(i, j)] as an additive logit bias, [B, h, L, L]."""
    ids = irpe_bucket_ids(*grid, num_prefix, self.ratio)
    proj = self._project(k_scaled)  # [B, h, Lk, buckets]
    cols = np.arange(ids.shape[1])[None, :]
    return proj[:, :, cols, ids]  # [B, h, Lq, Lk]

  def value_term(self, probs: Array, grid: Grid, num_prefix: int) -> Array:
    """sum_j p_ij r[b(i, j)] for probs [B, h, L, L] -> [B, L, h, hd]."""
    ids = irpe_bucket_ids(*grid, num_prefix, self.ratio)
    # Built in the graph (not a [L, L, buckets] literal); XLA fuses it.
    one_hot = jax.nn.one_hot(
        jnp.asarray(ids), self.table.shape[-2], dtype=probs.dtype
    )  # [L, L, buckets]
    # Probability mass of each query per bucket.
    mass = jnp.einsum('bhij,ijk->bhik', probs, one_hot)  # [B, h, L, buckets]
    table = self.table[...].astype(probs.dtype)
    eq = 'bhik,kd->bihd' if table.ndim == 2 else 'bhik,hkd->bihd'
    return jnp.einsum(eq, mass, table)


@functools.lru_cache(maxsize=64)
def bias_index(grid_h: int, grid_w: int, num_prefix: int) -> np.ndarray:
  """Index of every token pair into [table; prefix entries], [L, L] int32.

  Patch pairs: (dy + Gh - 1) * (2Gw - 1) + (dx + Gw - 1) with (dy, dx) =
  pos_i - pos_j. Then T, T+1, T+2 (T = table size) for prefix->patch (row
  is a prefix query), patch->prefix and prefix->prefix.
  """
  pos = grid_positions(grid_h, grid_w)
  diff = pos[:, None, :] - pos[None, :, :]  # [N, N, 2]
  rel = (
      (diff[..., 0] + grid_h - 1) * (2 * grid_w - 1)
      + diff[..., 1]
      + (grid_w - 1)
  )
  size = (2 * grid_h - 1) * (2 * grid_w - 1)
  p, n = num_prefix, grid_h * grid_w
  idx = np.empty((p + n, p + n), np.int32)
  idx[p:, p:] = rel
  idx[:p, p:] = size
  idx[p:, :p] = size + 1
  idx[:p, :p] = size + 2
  idx.setflags(write=False)
  return idx


class RPEBias(nnx.Module):
  """Learned per-head relative position bias (Swin + BEiT prefix entries)."""

  def __init__(
      self,
      grid_h: int,
      grid_w: int,
      num_heads: int,
      param_dtype: jnp.dtype,
      *,
      rngs: nnx.Rngs,
  ):
    size = (2 * grid_h - 1) * (2 * grid_w - 1)
    self.table = nnx.Param(
        trunc_normal_02(rngs.params(), (size, num_heads), param_dtype)
    )
    self.prefix = nnx.Param(
        trunc_normal_02(rngs.params(), (3, num_heads), param_dtype)
    )
    self.grid_h, self.grid_w = grid_h, grid_w

  def __call__(self, grid: Grid, num_prefix: int) -> Array:
    """The additive logit bias, [h, L, L] float32."""
    if tuple(grid) != (self.grid_h, self.grid_w):
      raise ValueError(
          f'rpe_bias table is for a {self.grid_h}x{self.grid_w} grid but the '
          f'input gives {grid[0]}x{grid[1]}; call model.resize(image_size)'
      )
    idx = bias_index(self.grid_h, self.grid_w, num_prefix)
    entries = jnp.concatenate([self.table[...], self.prefix[...]], axis=0)
    bias = entries.astype(jnp.float32)[idx]  # [L, L, h]
    return jnp.transpose(bias, (2, 0, 1))  # [h, L, L]

  def resize(self, grid_h: int, grid_w: int) -> None:
    """Interpolates the table, as a (2Gh-1)x(2Gw-1) image per head."""
    old = self.table[...]
    image = old.reshape(2 * self.grid_h - 1, 2 * self.grid_w - 1, -1)
    new = resample_grid(image, (2 * grid_h - 1, 2 * grid_w - 1))
    self.table = nnx.Param(new.reshape(-1, old.shape[-1]))
    self.grid_h, self.grid_w = grid_h, grid_w
