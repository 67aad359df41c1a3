"""PyTorch self-attention with iRPE or bias RPE, mirroring the Flax model.

The bucket and bias indices come from `drpl_jax.models.rpe`'s numpy
functions (the same ids as the Flax model), computed once per grid and held
as non-persistent buffers. When the RPE term is an additive logit bias (no
RPE, `bias`, iRPE on queries/keys), attention runs through
`F.scaled_dot_product_attention`; iRPE on values and returning the
probabilities use an explicit softmax. Layout inside: [B, h, L, hd].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drpl_jax.models import rpe as rpe_lib
from drpl_jax.models.config import ModelConfig
from drpl_jax.pytorch.twin.layers import linear, trunc_normal_02_


def _long(ids: np.ndarray, device: torch.device) -> torch.Tensor:
  return torch.as_tensor(np.asarray(ids, np.int64), device=device)


class IRPE(nn.Module):
  """One contextual iRPE table, [buckets, hd] (shared) or [h, buckets, hd].

  Zero-initialised, as the reference code and the Flax model.
  """

  def __init__(
      self, num_heads: int, head_dim: int, ratio: float, shared_heads: bool
  ):
    super().__init__()
    nb = rpe_lib.irpe_num_buckets(ratio)
    shape = (nb, head_dim) if shared_heads else (num_heads, nb, head_dim)
    self.table = nn.Parameter(torch.zeros(shape))

  def _project(self, x: torch.Tensor) -> torch.Tensor:
    """x [B, h, L, hd] . table -> [B, h, L, buckets]."""
    table = self.table.to(x.dtype)
    if table.ndim == 2:
      return torch.matmul(x, table.t())
    return torch.einsum('bhld,hkd->bhlk', x, table)

  def key_bias(self, q_scaled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(scale q_i) . r[b(i, j)], [B, h, Lq, Lk]."""
    proj = self._project(q_scaled)  # [B, h, Lq, buckets]
    b, h, length, _ = proj.shape
    return torch.gather(proj, -1, ids.expand(b, h, length, length))

  def query_bias(
      self, k_scaled: torch.Tensor, ids: torch.Tensor
  ) -> torch.Tensor:
    """(scale k_j) . r[b(i, j)], [B, h, Lq, Lk]."""
    proj = self._project(k_scaled).transpose(-1, -2)  # [B, h, buckets, Lk]
    b, h, _, length = proj.shape
    return torch.gather(proj, -2, ids.expand(b, h, length, length))

  def value_term(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum_j p_ij r[b(i, j)] for probs [B, h, L, L] -> [B, h, L, hd]."""
    b, h, length, _ = probs.shape
    nb = self.table.shape[-2]
    mass = probs.new_zeros(b, h, length, nb).scatter_add_(
        -1, ids.expand(b, h, length, length), probs
    )  # [B, h, L, buckets]
    table = self.table.to(probs.dtype)
    if table.ndim == 2:
      return torch.matmul(mass, table)
    return torch.einsum('bhik,hkd->bhid', mass, table)


class RPEBias(nn.Module):
  """Learned per-head relative position bias (Swin + BEiT prefix entries)."""

  def __init__(self, grid_h: int, grid_w: int, num_heads: int):
    super().__init__()
    size = (2 * grid_h - 1) * (2 * grid_w - 1)
    self.table = nn.Parameter(trunc_normal_02_(torch.empty(size, num_heads)))
    self.prefix = nn.Parameter(trunc_normal_02_(torch.empty(3, num_heads)))
    self.grid = (grid_h, grid_w)

  def forward(self, index: torch.Tensor) -> torch.Tensor:
    """The additive logit bias [1, h, L, L] for an index [L, L]."""
    entries = torch.cat([self.table, self.prefix], dim=0).float()
    return entries[index].permute(2, 0, 1).unsqueeze(0)  # [1, h, L, L]


class Attention(nn.Module):
  """Self-attention over [prefix, patches] tokens with optional RPE."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    dim = cfg.width
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.scale = cfg.head_dim**-0.5
    self.num_prefix = cfg.num_prefix_tokens
    self.q = linear(dim, dim, bias=cfg.qkv_bias)
    self.k = linear(dim, dim, bias=cfg.qkv_bias)
    self.v = linear(dim, dim, bias=cfg.qkv_bias)
    self.proj = linear(dim, dim)
    rpe = cfg.rpe
    self.ratio = rpe.ratio
    self.grid = (cfg.grid_size, cfg.grid_size)

    def irpe(enabled: bool) -> IRPE | None:
      if rpe.kind != 'irpe' or not enabled:
        return None
      return IRPE(cfg.num_heads, cfg.head_dim, rpe.ratio, rpe.shared_heads)

    self.rpe_q = irpe(rpe.on_q)
    self.rpe_k = irpe(rpe.on_k)
    self.rpe_v = irpe(rpe.on_v)
    self.rpe_bias = None
    if rpe.kind == 'bias':
      self.rpe_bias = RPEBias(*self.grid, cfg.num_heads)
    self.rpe_kind = rpe.kind
    self.register_buffer(
        'rpe_index', self._index(self.grid, 'cpu'), persistent=False
    )
    self.attn_dropout_rate = cfg.attn_dropout_rate
    self.dropout_rate = cfg.dropout_rate

  def _index(
      self, grid: tuple[int, int], device: torch.device | str
  ) -> torch.Tensor | None:
    """Bucket ids (iRPE) or bias indices of every token pair, [L, L]."""
    if self.rpe_kind == 'irpe':
      return _long(
          rpe_lib.irpe_bucket_ids(*grid, self.num_prefix, self.ratio), device
      )
    if self.rpe_kind == 'bias':
      return _long(rpe_lib.bias_index(*grid, self.num_prefix), device)
    return None

  def index_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
    """The cached index for the configured grid, else a fresh one."""
    if tuple(grid) == self.grid:
      return self.rpe_index
    if self.rpe_bias is not None:
      raise ValueError(
          f'rpe_bias table is for a {self.grid[0]}x{self.grid[1]} grid but '
          f'the input gives {grid[0]}x{grid[1]}'
      )
    return self._index(grid, self.q.weight.device)

  def logit_bias(
      self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None
  ) -> torch.Tensor | None:
    """The additive RPE term of the logits, [B or 1, h, L, L] float32."""
    bias = None
    if self.rpe_bias is not None:
      bias = self.rpe_bias(index)
    if self.rpe_k is not None:
      bias = _add(bias, self.rpe_k.key_bias(q * self.scale, index))
    if self.rpe_q is not None:
      bias = _add(bias, self.rpe_q.query_bias(k * self.scale, index))
    return bias

  def forward(
      self,
      x: torch.Tensor,
      grid: tuple[int, int],
      *,
      return_attention: bool = False,
  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, L, D] -> ([B, L, D], probabilities [B, h, L, L] or None)."""
    b, n, d = x.shape
    heads, hd = self.num_heads, self.head_dim
    q = self.q(x).view(b, n, heads, hd).transpose(1, 2)  # [B, h, L, hd]
    k = self.k(x).view(b, n, heads, hd).transpose(1, 2)  # [B, h, L, hd]
    v = self.v(x).view(b, n, heads, hd).transpose(1, 2)  # [B, h, L, hd]
    index = self.index_for(grid)
    bias = self.logit_bias(q, k, index)
    probs = None
    if return_attention or self.rpe_v is not None:
      out, probs = self._explicit(q, k, v, bias, index)
    else:
      out = F.scaled_dot_product_attention(
          q,
          k,
          v,
          attn_mask=None if bias is None else bias.to(q.dtype),
          dropout_p=self.attn_dropout_rate if self.training else 0.0,
          scale=self.scale,
      )
    out = self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, L, D]
    out = F.dropout(out, self.dropout_rate, self.training)
    return out, probs

  def _explicit(
      self,
      q: torch.Tensor,
      k: torch.Tensor,
      v: torch.Tensor,
      bias: torch.Tensor | None,
      index: torch.Tensor | None,
  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32, with attention dropout and iRPE-V."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
    if bias is not None:
      logits = logits + bias
    probs = logits.softmax(dim=-1)  # [B, h, L, L] float32
    weights = F.dropout(probs, self.attn_dropout_rate, self.training)
    out = torch.matmul(weights.to(v.dtype), v)  # [B, h, L, hd]
    if self.rpe_v is not None:
      out = out + self.rpe_v.value_term(weights, index).to(out.dtype)
    return out, probs


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
  return b if a is None else a + b
