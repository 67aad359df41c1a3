"""Multi-head self-attention with relative position encoding.

The fused path uses `jax.nn.dot_product_attention` (layout [B, T, heads, hd])
whenever the RPE term is an additive logit bias (no RPE, `bias`, iRPE on
queries and/or keys), so GPUs can use a fused kernel. An explicit softmax
path handles iRPE on values, attention dropout and returning the attention
probabilities. Both compute the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from drpl_jax.models.config import ModelConfig
from drpl_jax.models.layers import Grid, dropout, jnp_dtype, linear
from drpl_jax.models.rpe import IRPE, RPEBias

Array = jax.Array


class Attention(nnx.Module):
  """Self-attention over [prefix, patches] tokens with optional RPE."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dim = cfg.width
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.scale = cfg.head_dim**-0.5
    self.num_prefix = cfg.num_prefix_tokens
    self.q = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.k = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.v = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.proj = linear(dim, dim, cfg, rngs=rngs)
    rpe, pdtype = cfg.rpe, jnp_dtype(cfg.param_dtype)

    def irpe(enabled: bool) -> IRPE | None:
      if rpe.kind != 'irpe' or not enabled:
        return None
      return IRPE(
          cfg.num_heads, cfg.head_dim, rpe.ratio, rpe.shared_heads, pdtype
      )

    self.rpe_q = irpe(rpe.on_q)
    self.rpe_k = irpe(rpe.on_k)
    self.rpe_v = irpe(rpe.on_v)
    self.rpe_bias = nnx.data(None)
    if rpe.kind == 'bias':
      self.rpe_bias = RPEBias(
          cfg.grid_size, cfg.grid_size, cfg.num_heads, pdtype, rngs=rngs
      )
    self.attn_dropout_rate = cfg.attn_dropout_rate
    self.dropout_rate = cfg.dropout_rate
    self.implementation = cfg.attention_impl or None

  def logit_bias(self, q: Array, k: Array, grid: Grid) -> Array | None:
    """The additive RPE term of the logits, [B or 1, h, L, L] float32."""
    p = self.num_prefix
    bias = None
    if self.rpe_bias is not None:
      bias = self.rpe_bias(grid, p)[None]  # [1, h, L, L]
    if self.rpe_k is not None:
      bias = _add(bias, self.rpe_k.key_bias(q * self.scale, grid, p))
    if self.rpe_q is not None:
      bias = _add(bias, self.rpe_q.query_bias(k * self.scale, grid, p))
    return bias

  def __call__(
      self,
      x: Array,
      grid: Grid,
      *,
      train: bool,
      rngs: nnx.Rngs | None = None,
      return_attention: bool = False,
  ) -> tuple[Array, Array | None]:
    """x [B, L, D] -> ([B, L, D], probabilities [B, h, L, L] or None)."""
    b, n, d = x.shape
    heads, hd = self.num_heads, self.head_dim
    q, k, v = (t.reshape(b, n, heads, hd) for t in self._qkv(x))
    bias = self.logit_bias(q, k, grid)
    attn_drop = train and self.attn_dropout_rate > 0
    probs = None
    if (
        return_attention
        or attn_drop
        or self.rpe_v is not None
        or self._use_explicit()
    ):
      out, probs = self._explicit(q, k, v, bias, grid, train=train, rngs=rngs)
    else:
      if bias is not None and self.implementation == 'cudnn':
        bias = bias.astype(q.dtype)
      out = jax.nn.dot_product_attention(
          q,
          k,
          v,
          bias=bias,
          scale=self.scale,
          implementation=self.implementation,
      )
    out = self.proj(out.reshape(b, n, d))  # [B, L, D]
    out = dropout(out, self.dropout_rate, train, rngs)
    return out, (probs if return_attention else None)

  def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
    """q, k, v [B, L, D] from one matmul against the three kernels side by side.

    The same function as the three Linear layers, but one [D, 3D] matmul is
    faster than three [D, D] ones on the CPU (docs/performance.md),
    and larger GEMMs help every backend.
    """
    layers = (self.q, self.k, self.v)
    kernel = jnp.concatenate([m.kernel[...] for m in layers], axis=1)
    bias = (
        jnp.concatenate([m.bias[...] for m in layers])
        if self.q.bias is not None
        else None
    )
    x, kernel, bias = self.q.promote_dtype(
        (x, kernel, bias), dtype=self.q.dtype
    )
    y = jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.q.precision
    )
    if bias is not None:
      y = y + bias
    return tuple(jnp.split(y, 3, axis=-1))

  def _use_explicit(self) -> bool:
    """Whether the explicit (batched-matmul) path replaces the fused one.

    On the CPU there is no fused kernel, and XLA's own lowering of
    `dot_product_attention` (batch and head dims kept apart) runs its
    batched matmuls more slowly than the explicit path, which folds
    heads into the batch (docs/performance.md).
    """
    if self.implementation == 'explicit':
      return True
    return self.implementation is None and jax.default_backend() == 'cpu'

  def _explicit(
      self,
      q: Array,
      k: Array,
      v: Array,
      bias: Array | None,
      grid: Grid,
      *,
      train: bool,
      rngs: nnx.Rngs | None,
  ) -> tuple[Array, Array]:
    """Softmax attention in float32, with attention dropout and iRPE-V.

    Heads are folded into the batch: [B*h, L, hd] matmuls.
    """
    b, n, h, d = q.shape
    fold = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, n, d)
    logits = (
        jnp.matmul(
            fold(q),
            fold(k).transpose(0, 2, 1),
            preferred_element_type=jnp.float32,
        )
        * self.scale
    )
    logits = logits.reshape(b, h, n, n)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)  # [B, h, L, L] float32
    weights = dropout(probs, self.attn_dropout_rate, train, rngs)
    out = jnp.matmul(weights.astype(v.dtype).reshape(b * h, n, n), fold(v))
    out = out.reshape(b, h, n, d).transpose(0, 2, 1, 3)  # [B, L, h, hd]
    if self.rpe_v is not None:
      term = self.rpe_v.value_term(weights, grid, self.num_prefix)
      out = out + term.astype(out.dtype)
    return out, probs


def _add(a: Array | None, b: Array) -> Array:
  return b if a is None else a + b
