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
from drpl_jax.models.layers import dropout, jnp_dtype, linear
from drpl_jax.models.rpe import IRPE, RPEBias

Array = jax.Array


class Attention(nnx.Module):
  """Self-attention over [prefix, patches] tokens with optional RPE."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dim = cfg.width
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.scale = cfg.head_dim ** -0.5
    self.num_prefix = cfg.num_prefix_tokens
    self.q = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.k = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.v = linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.proj = linear(dim, dim, cfg, rngs=rngs)
    rpe, pdtype = cfg.rpe, jnp_dtype(cfg.param_dtype)

    def irpe(enabled: bool) -> IRPE | None:
      if rpe.kind != 'irpe' or not enabled:
        return None
      return IRPE(cfg.num_heads, cfg.head_dim, rpe.ratio, rpe.shared_heads,
                  pdtype)

    self.rpe_q = irpe(rpe.on_q)
    self.rpe_k = irpe(rpe.on_k)
    self.rpe_v = irpe(rpe.on_v)
    self.rpe_bias = nnx.data(None)
    if rpe.kind == 'bias':
      self.rpe_bias = RPEBias(cfg.grid_size, cfg.grid_size, cfg.num_heads,
                              pdtype, rngs=rngs)
    self.attn_dropout_rate = cfg.attn_dropout_rate
    self.dropout_rate = cfg.dropout_rate
    self.implementation = cfg.attention_impl or None

  def logit_bias(self, q: Array, k: Array,
                 grid: tuple[int, int]) -> Array | None:
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

  def __call__(self, x: Array, grid: tuple[int, int], *, train: bool,
               rngs: nnx.Rngs | None = None,
               return_attention: bool = False
               ) -> tuple[Array, Array | None]:
    """x [B, L, D] -> ([B, L, D], probabilities [B, h, L, L] or None)."""
    b, n, d = x.shape
    heads, hd = self.num_heads, self.head_dim
    q = self.q(x).reshape(b, n, heads, hd)  # [B, L, h, hd]
    k = self.k(x).reshape(b, n, heads, hd)  # [B, L, h, hd]
    v = self.v(x).reshape(b, n, heads, hd)  # [B, L, h, hd]
    bias = self.logit_bias(q, k, grid)
    attn_drop = train and self.attn_dropout_rate > 0
    probs = None
    if return_attention or attn_drop or self.rpe_v is not None:
      out, probs = self._explicit(q, k, v, bias, grid, train=train,
                                  rngs=rngs)
    else:
      if bias is not None and self.implementation == 'cudnn':
        bias = bias.astype(q.dtype)
      out = jax.nn.dot_product_attention(
          q, k, v, bias=bias, scale=self.scale,
          implementation=self.implementation)
    out = self.proj(out.reshape(b, n, d))  # [B, L, D]
    out = dropout(out, self.dropout_rate, train, rngs)
    return out, (probs if return_attention else None)

  def _explicit(self, q: Array, k: Array, v: Array, bias: Array | None,
                grid: tuple[int, int], *, train: bool,
                rngs: nnx.Rngs | None) -> tuple[Array, Array]:
    """Softmax attention in float32, with attention dropout and iRPE-V."""
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32) * self.scale
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)  # [B, h, L, L] float32
    weights = dropout(probs, self.attn_dropout_rate, train, rngs)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    if self.rpe_v is not None:
      term = self.rpe_v.value_term(weights, grid, self.num_prefix)
      out = out + term.astype(out.dtype)
    return out, probs


def _add(a: Array | None, b: Array) -> Array:
  return b if a is None else a + b
