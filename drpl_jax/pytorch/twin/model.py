"""DRPL-ViT in PyTorch: a twin of `drpl_jax.models.DRPLViT`.

Same components, switches, parameter names (PyTorch's `weight` for Flax's
`kernel`/`scale`), initial distributions and forward semantics as the Flax
model, so weights convert both ways (`drpl_jax.pytorch.twin.convert`) and the
two frameworks can be compared on the same model. PyTorch conventions:
images are NCHW [B, 3, H, W]; `model.train()` / `model.eval()` select the
mode (train: (cls, dist) logits and BatchNorm batch statistics; eval: their
mean and running statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drpl_jax.models.config import ModelConfig
from drpl_jax.pytorch.twin.attention import Attention
from drpl_jax.pytorch.twin.layers import (
    LayerScale,
    LeFF,
    Mlp,
    PatchEmbed,
    drop_path,
    layer_norm,
    linear,
    torch_dtype,
    trunc_normal_02_,
)

Logits = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class Block(nn.Module):
  """Pre-norm encoder block: x + attn(norm1(x)); x + ffn(norm2(x))."""

  def __init__(self, cfg: ModelConfig, drop_path_rate: float):
    super().__init__()
    self.norm1 = layer_norm(cfg.width)
    self.attn = Attention(cfg)
    self.norm2 = layer_norm(cfg.width)
    self.ffn = LeFF(cfg) if cfg.conv.kind == 'leff' else Mlp(cfg)
    self.ls1 = self.ls2 = None
    if cfg.layer_scale_init is not None:
      self.ls1 = LayerScale(cfg.width, cfg.layer_scale_init)
      self.ls2 = LayerScale(cfg.width, cfg.layer_scale_init)
    self.drop_path_rate = float(drop_path_rate)

  def forward(
      self,
      x: torch.Tensor,
      grid: tuple[int, int],
      *,
      return_attention: bool,
  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, L, D] -> ([B, L, D], the attention probabilities or None)."""
    y, probs = self.attn(self.norm1(x), grid, return_attention=return_attention)
    if self.ls1 is not None:
      y = self.ls1(y)
    x = x + drop_path(y, self.drop_path_rate, self.training)
    y = self.ffn(self.norm2(x), grid)
    if self.ls2 is not None:
      y = self.ls2(y)
    x = x + drop_path(y, self.drop_path_rate, self.training)
    return x, probs


class DRPLViTTorch(nn.Module):
  """The DRPL-ViT classifier in PyTorch; see `ModelConfig` for every switch.

  Parameters are created in `config.param_dtype`; a `config.dtype` other
  than float32 runs the forward under `torch.autocast` (norms and softmax
  stay float32). Logits are float32. `config.attention_impl` is JAX-only
  (`F.scaled_dot_product_attention` picks its own kernel).

  One training difference remains by design (each framework's own
  BatchNorm): PyTorch updates `running_var` with the unbiased batch
  variance, Flax with the biased one (a factor n / (n - 1) on the batch
  term, n = values per channel). Forward passes from the same weights and
  statistics agree in both modes.
  """

  def __init__(self, model_config: ModelConfig | Mapping[str, Any]):
    super().__init__()
    cfg = ModelConfig.from_config(model_config)
    dim = cfg.width
    self.config = cfg
    self.patch_embed = PatchEmbed(cfg)
    self.cls_token = nn.Parameter(trunc_normal_02_(torch.empty(1, 1, dim)))
    self.dist_token = None
    if cfg.distilled:
      self.dist_token = nn.Parameter(trunc_normal_02_(torch.empty(1, 1, dim)))
    self.pos_embed = None
    if cfg.abs_pos_embed:
      length = cfg.num_prefix_tokens + cfg.grid_size**2
      self.pos_embed = nn.Parameter(
          trunc_normal_02_(torch.empty(1, length, dim))
      )
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    self.blocks = nn.ModuleList([Block(cfg, float(r)) for r in rates])
    self.norm = layer_norm(dim)
    self.head = linear(dim, cfg.num_classes)
    self.head_dist = linear(dim, cfg.num_classes) if cfg.distilled else None
    self.to(torch_dtype(cfg.param_dtype))
    self.compute_dtype = torch_dtype(cfg.dtype)

  def _check_inputs(self, images: torch.Tensor) -> None:
    cfg = self.config
    if images.ndim != 4 or images.shape[1] != 3:
      raise ValueError(
          f'images must be NCHW [B, 3, H, W], got {tuple(images.shape)}'
      )
    h, w = images.shape[2:]
    if h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(
          f'image size {h}x{w} is not divisible by patch_size '
          f'{cfg.patch_size}'
      )
    if self.pos_embed is not None and (h, w) != (cfg.image_size,) * 2:
      raise ValueError(
          f'images of {h}x{w} do not match pos_embed, made for '
          f'image_size {cfg.image_size}'
      )

  def _autocast(self, images: torch.Tensor):
    if self.compute_dtype == torch.float32:
      return contextlib.nullcontext()
    return torch.autocast(images.device.type, dtype=self.compute_dtype)

  def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images [B, 3, H, W] -> tokens [B, prefix + N, D] and the grid."""
    self._check_inputs(images)
    x, grid = self.patch_embed(images.to(self.cls_token.dtype))  # [B, N, D]
    b, _, d = x.shape
    prefix = [self.cls_token]
    if self.dist_token is not None:
      prefix.append(self.dist_token)
    prefix = [t.expand(b, 1, d).to(x.dtype) for t in prefix]
    x = torch.cat(prefix + [x], dim=1)  # [B, prefix + N, D]
    if self.pos_embed is not None:
      x = x + self.pos_embed.to(x.dtype)
    return F.dropout(x, self.config.dropout_rate, self.training), grid

  def forward_features(
      self, images: torch.Tensor, *, return_attention: bool = False
  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images -> final-normed tokens [B, L, D] and per-block attention."""
    x, grid = self.embed(images)
    attention = []
    for block in self.blocks:
      x, probs = block(x, grid, return_attention=return_attention)
      if return_attention:
        attention.append(probs)
    return self.norm(x), attention

  def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls_logits, dist_logits) in either mode (distilled models only)."""
    if self.head_dist is None:
      raise ValueError('heads() needs a distilled model (model.distilled)')
    with self._autocast(images):
      x, _ = self.forward_features(images)
      return (self.head(x[:, 0]).float(), self.head_dist(x[:, 1]).float())

  def logits(self, features: torch.Tensor) -> Logits:
    """Final-normed tokens [B, L, D] (`forward_features`) -> logits.

    Distilled: in training mode (cls_logits, dist_logits), in eval mode
    their mean. Not distilled: one float32 array [B, C] in both modes.
    """
    out = self.head(features[:, 0]).float()
    if self.head_dist is None:
      return out
    dist = self.head_dist(features[:, 1]).float()
    return (out, dist) if self.training else (out + dist) / 2

  def forward(self, images: torch.Tensor) -> Logits:
    """Images [B, 3, H, W] -> float32 logits [B, C] (see `logits`).

    For the attention probabilities of every block as well, call
    `forward_features(images, return_attention=True)`, then `logits`.
    """
    with self._autocast(images):
      x, _ = self.forward_features(images)
      return self.logits(x)
