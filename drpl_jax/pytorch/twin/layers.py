"""PyTorch building blocks of the DRPL-ViT twin: init, MLP, LeFF, stem.

Each module mirrors its Flax counterpart in `drpl_jax.models.layers` with
the same attribute names (so state dicts map by name), the same numerics
(erf GELU, LayerNorm eps 1e-6, BatchNorm eps 1e-5 / momentum 0.1) and the
same initial distributions. Tokens are [B, L, D]; convolutions run in NCHW.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drpl_jax.models.config import ModelConfig

LN_EPS = 1e-6  # DeiT / timm ViT, as drpl_jax.models.layers
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention (Flax 0.9)
# Standard deviation of a unit normal truncated to [-2, 2], the correction
# that jax's variance_scaling(..., 'truncated_normal') applies.
_TRUNC_STD = 0.87962566103423978

TORCH_DTYPES = {
    'float32': torch.float32,
    'bfloat16': torch.bfloat16,
    'float16': torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
  """Maps a config dtype string ('float32', 'bfloat16', ...) to torch."""
  if name not in TORCH_DTYPES:
    raise ValueError(
        f'unknown dtype {name!r}; expected one of {sorted(TORCH_DTYPES)}'
    )
  return TORCH_DTYPES[name]


def trunc_normal_02_(t: torch.Tensor) -> torch.Tensor:
  """Truncated normal, std .02 before truncation at +-2 std (as Flax)."""
  return nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)


def lecun_normal_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
  """Flax's default conv kernel init: variance 1/fan_in, truncated at 2."""
  std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
  return nn.init.trunc_normal_(t, std=std, a=-2.0 * std, b=2.0 * std)


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
  """A Linear with timm's ViT init (trunc-normal .02 weight, zero bias)."""
  layer = nn.Linear(in_features, out_features, bias=bias)
  trunc_normal_02_(layer.weight)
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def conv2d(in_ch: int, out_ch: int, kernel: int, **options: Any) -> nn.Conv2d:
  """A Conv2d initialised as nnx.Conv (lecun normal kernel, zero bias).

  `options` go to nn.Conv2d as they are (stride, padding, groups, bias;
  its defaults: 1, 0, 1, True).
  """
  layer = nn.Conv2d(in_ch, out_ch, kernel, **options)
  lecun_normal_(layer.weight, fan_in=layer.weight[0].numel())  # in/g*kh*kw
  if layer.bias is not None:
    nn.init.zeros_(layer.bias)
  return layer


def layer_norm(dim: int) -> nn.LayerNorm:
  return nn.LayerNorm(dim, eps=LN_EPS)


def norm_tokens(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
  """Applies a LayerNorm or BatchNorm1d to tokens [..., C].

  BatchNorm statistics are over every token of the batch (all axes but
  the channel), as Flax's BatchNorm over [B, L, C].
  """
  if isinstance(norm, nn.BatchNorm1d):
    return norm(x.reshape(-1, x.shape[-1])).view_as(x)  # [B*L, C]
  return norm(x)


def norm_nchw(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
  """Applies a LayerNorm (over C) or BatchNorm2d to [B, C, H, W]."""
  if isinstance(norm, nn.LayerNorm):
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
  return norm(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  """Stochastic depth (timm): drops the whole residual branch per sample."""
  if not training or rate == 0.0:
    return x
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = x.new_empty(shape).bernoulli_(1.0 - rate)
  return x * keep / (1.0 - rate)


def gelu(x: torch.Tensor) -> torch.Tensor:
  """Exact (erf) GELU."""
  return F.gelu(x)


class LayerScale(nn.Module):
  """Per-channel learned scale of a residual branch (CaiT)."""

  def __init__(self, dim: int, init: float):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), float(init)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.gamma


class Mlp(nn.Module):
  """The plain ViT feed-forward: fc1 -> GELU -> fc2, dropout after each."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    hidden = int(cfg.width * cfg.mlp_ratio)
    self.fc1 = linear(cfg.width, hidden)
    self.fc2 = linear(hidden, cfg.width)
    self.dropout_rate = cfg.dropout_rate

  def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    del grid  # a per-token layer
    x = F.dropout(gelu(self.fc1(x)), self.dropout_rate, self.training)
    return F.dropout(self.fc2(x), self.dropout_rate, self.training)


class LeFF(nn.Module):
  """CeiT's locally-enhanced feed-forward; see drpl_jax.models.layers.LeFF.

  Patch tokens: expand -> norm -> GELU -> depthwise kxk conv (NCHW) -> norm
  -> GELU -> project -> norm. Prefix tokens share expand/project and skip
  the depthwise stage (`prefix='shared'`) or pass unchanged ('identity').
  """

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    conv = cfg.conv
    dim, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    k = conv.kernel_size
    self.expand = linear(dim, hidden)
    self.dwconv = conv2d(hidden, hidden, k, padding=k // 2, groups=hidden)
    self.project = linear(hidden, dim)
    if conv.norm == 'batch':
      kw = dict(eps=BN_EPS, momentum=BN_MOMENTUM)
      self.expand_norm = nn.BatchNorm1d(hidden, **kw)
      self.dw_norm = nn.BatchNorm2d(hidden, **kw)
      self.project_norm = nn.BatchNorm1d(dim, **kw)
    else:
      self.expand_norm = layer_norm(hidden)
      self.dw_norm = layer_norm(hidden)
      self.project_norm = layer_norm(dim)
    self.num_prefix = cfg.num_prefix_tokens
    self.prefix_mode = conv.prefix
    self.dropout_rate = cfg.dropout_rate

  def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    p = self.num_prefix
    shared = self.prefix_mode == 'shared'
    tokens = x if shared else x[:, p:]
    n_pre = p if shared else 0
    h = gelu(norm_tokens(self.expand_norm, self.expand(tokens)))
    h_pre, h_grid = h[:, :n_pre], h[:, n_pre:]
    b, n, e = h_grid.shape
    gh, gw = grid
    if gh * gw != n:
      raise ValueError(f'LeFF got {n} patch tokens for a {gh}x{gw} grid')
    h_grid = h_grid.transpose(1, 2).reshape(b, e, gh, gw)  # [B, E, Gh, Gw]
    h_grid = gelu(norm_nchw(self.dw_norm, self.dwconv(h_grid)))
    h_grid = h_grid.flatten(2).transpose(1, 2)  # [B, N, E]
    h = torch.cat([h_pre, h_grid], dim=1)
    out = norm_tokens(self.project_norm, self.project(h))
    out = F.dropout(out, self.dropout_rate, self.training)
    if not shared:
      out = torch.cat([x[:, :p].to(out.dtype), out], dim=1)
    return out


class PatchEmbed(nn.Module):
  """Images [B, 3, H, W] -> patch tokens [B, N, D] (row-major grid).

  stem='patch': one conv with kernel = stride = patch. stem='conv': CeiT's
  7x7/2 conv (no bias) -> BatchNorm -> 3x3/2 max-pool -> patch/4 conv.
  """

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    in_ch, patch = 3, cfg.patch_size
    if cfg.stem == 'conv':
      self.stem_conv = conv2d(
          3, cfg.stem_channels, 7, stride=2, padding=3, bias=False
      )
      self.stem_norm = nn.BatchNorm2d(
          cfg.stem_channels, eps=BN_EPS, momentum=BN_MOMENTUM
      )
      in_ch, patch = cfg.stem_channels, cfg.patch_size // 4
    self.proj = conv2d(in_ch, cfg.width, patch, stride=patch)
    self.stem = cfg.stem

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Returns the tokens [B, N, D] and the grid (Gh, Gw)."""
    if self.stem == 'conv':
      x = F.max_pool2d(self.stem_norm(self.stem_conv(x)), 3, 2, 1)
    x = self.proj(x)  # [B, D, Gh, Gw]
    grid = (x.shape[2], x.shape[3])
    return x.flatten(2).transpose(1, 2), grid  # [B, N, D]
