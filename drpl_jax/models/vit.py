"""DRPL-ViT: a distilled ViT with image RPE and a convolutional feed-forward.

Tokens are [cls, dist, patch_1 .. patch_N] (distilled) or [cls, patches];
pre-norm blocks; `head` on the cls token and `head_dist` on the dist token
(timm deit.py semantics: training returns both logits, inference their mean).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drpl_jax.models import fence
from drpl_jax.models.attention import Attention
from drpl_jax.models.config import ModelConfig
from drpl_jax.models.layers import (
    Grid,
    LayerScale,
    LeFF,
    Mlp,
    PatchEmbed,
    drop_path,
    dropout,
    jnp_dtype,
    layer_norm,
    linear,
    trunc_normal_02,
)
from drpl_jax.models.resample import resample_grid

Array = jax.Array
Logits = Array | tuple[Array, Array]


class Block(nnx.Module):
  """Pre-norm encoder block: x + attn(norm1(x)); x + ffn(norm2(x))."""

  def __init__(
      self, cfg: ModelConfig, drop_path_rate: float, *, rngs: nnx.Rngs
  ):
    self.norm1 = layer_norm(cfg.width, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = layer_norm(cfg.width, cfg, rngs=rngs)
    if cfg.conv.kind == 'leff':
      self.ffn = LeFF(cfg, rngs=rngs)
    else:
      self.ffn = Mlp(cfg, rngs=rngs)
    self.ls1 = self.ls2 = nnx.data(None)
    if cfg.layer_scale_init is not None:
      self.ls1 = LayerScale(cfg.width, cfg.layer_scale_init, cfg)
      self.ls2 = LayerScale(cfg.width, cfg.layer_scale_init, cfg)
    self.drop_path_rate = float(drop_path_rate)

  def __call__(
      self,
      x: Array,
      grid: Grid,
      *,
      train: bool,
      rngs: nnx.Rngs | None,
      return_attention: bool,
  ) -> tuple[Array, Array | None]:
    """x [B, L, D] -> ([B, L, D], the attention probabilities or None)."""
    y, probs = self.attn(
        self.norm1(x),
        grid,
        train=train,
        rngs=rngs,
        return_attention=return_attention,
    )
    if self.ls1 is not None:
      y = self.ls1(y)
    x = x + drop_path(y, self.drop_path_rate, train, rngs).astype(x.dtype)
    y = self.ffn(self.norm2(x), grid, train=train, rngs=rngs)
    if self.ls2 is not None:
      y = self.ls2(y)
    x = x + drop_path(y, self.drop_path_rate, train, rngs).astype(x.dtype)
    return x, probs


class DRPLViT(nnx.Module):
  """The DRPL-ViT classifier; see `ModelConfig` for every switch."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    cfg = config
    dim, pdtype = cfg.width, jnp_dtype(cfg.param_dtype)
    self.config = cfg
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(
        trunc_normal_02(rngs.params(), (1, 1, dim), pdtype)
    )
    self.dist_token = nnx.data(None)
    if cfg.distilled:
      self.dist_token = nnx.Param(
          trunc_normal_02(rngs.params(), (1, 1, dim), pdtype)
      )
    self.pos_embed = nnx.data(None)
    if cfg.abs_pos_embed:
      length = cfg.num_prefix_tokens + cfg.grid_size**2
      self.pos_embed = nnx.Param(
          trunc_normal_02(rngs.params(), (1, length, dim), pdtype)
      )
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    self.blocks = nnx.List([Block(cfg, float(r), rngs=rngs) for r in rates])
    self.norm = layer_norm(dim, cfg, rngs=rngs)
    self.head = linear(dim, cfg.num_classes, cfg, rngs=rngs)
    self.head_dist = nnx.data(None)
    if cfg.distilled:
      self.head_dist = linear(dim, cfg.num_classes, cfg, rngs=rngs)

  def _check_inputs(
      self, images: Array, train: bool, rngs: nnx.Rngs | None
  ) -> Grid:
    """Validates images and rngs; returns the token grid (Gh, Gw)."""
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got {images.shape}')
    h, w = images.shape[1:3]
    if h % cfg.patch_size or w % cfg.patch_size:
      raise ValueError(
          f'image size {h}x{w} is not divisible by patch_size '
          f'{cfg.patch_size}'
      )
    grid = (h // cfg.patch_size, w // cfg.patch_size)
    if self.pos_embed is not None and grid != (cfg.grid_size,) * 2:
      raise ValueError(
          f'images of {h}x{w} give a {grid[0]}x{grid[1]} grid but pos_embed '
          f'is for image_size {cfg.image_size}; call model.resize({h}) '
          'first (square images only)'
      )
    stochastic = (cfg.dropout_rate, cfg.attn_dropout_rate, cfg.drop_path_rate)
    if train and any(stochastic) and rngs is None:
      raise ValueError(
          'train=True with dropout_rate/attn_dropout_rate/drop_path_rate '
          f'{stochastic} needs rngs: model(images, train=True, '
          'rngs=nnx.Rngs(dropout=key))'
      )
    return grid

  def embed(
      self, images: Array, *, train: bool = False, rngs: nnx.Rngs | None = None
  ) -> tuple[Array, Grid]:
    """Images [B, H, W, 3] -> tokens [B, prefix + N, D] and the grid."""
    self._check_inputs(images, train, rngs)
    dtype = jnp_dtype(self.config.dtype)
    x = self.patch_embed(images.astype(dtype), train=train)  # [B, Gh, Gw, D]
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)  # [B, N, D]
    prefix = [self.cls_token[...]]
    if self.dist_token is not None:
      prefix.append(self.dist_token[...])
    prefix = [jnp.broadcast_to(t, (b, 1, d)).astype(dtype) for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)  # [B, prefix + N, D]
    if self.pos_embed is not None:
      x = x + self.pos_embed[...].astype(dtype)
    x = dropout(x, self.config.dropout_rate, train, rngs)
    return x, (gh, gw)

  def forward_features(
      self,
      images: Array,
      *,
      train: bool = False,
      rngs: nnx.Rngs | None = None,
      return_attention: bool = False,
  ) -> tuple[Array, list[Array]]:
    """Images -> final-normed tokens [B, L, D] and per-block attention."""
    x, grid = self.embed(images, train=train, rngs=rngs)
    # Training on XLA:CPU: materialise the residual stream's gradient at
    # every block boundary (models/fence.py).
    fences = train and fence.enabled(self.config.materialize)
    attention = []
    for block in self.blocks:
      if fences:
        x = fence.grad_fence(x)
      x, probs = block(
          x, grid, train=train, rngs=rngs, return_attention=return_attention
      )
      if return_attention:
        attention.append(probs)
    if fences:
      x = fence.grad_fence(x)
    return self.norm(x), attention

  def heads(
      self, images: Array, *, train: bool = False, rngs: nnx.Rngs | None = None
  ) -> tuple[Logits, Logits]:
    """(cls_logits, dist_logits) in either mode (distilled models only).

    Evaluation reports each head separately as DeiT does; `__call__` with
    train=False gives only their mean.
    """
    if self.head_dist is None:
      raise ValueError('heads() needs a distilled model (model.distilled)')
    x, _ = self.forward_features(images, train=train, rngs=rngs)
    return (
        self.head(x[:, 0]).astype(jnp.float32),
        self.head_dist(x[:, 1]).astype(jnp.float32),
    )

  def logits(self, features: Array, train: bool = False) -> Logits:
    """Final-normed tokens [B, L, D] (`forward_features`) -> logits.

    Distilled: train=True gives (cls_logits, dist_logits), train=False their
    mean. Not distilled: one float32 array [B, C] in both modes.
    """
    out = self.head(features[:, 0]).astype(jnp.float32)
    if self.head_dist is None:
      return out
    dist = self.head_dist(features[:, 1]).astype(jnp.float32)
    return (out, dist) if train else (out + dist) / 2

  def __call__(
      self, images: Array, train: bool = False, *, rngs: nnx.Rngs | None = None
  ) -> Logits:
    """Images [B, H, W, 3] -> float32 logits [B, C] (see `logits`).

    For the attention probabilities of every block as well, call
    `forward_features(images, return_attention=True)`, then `logits`.
    """
    x, _ = self.forward_features(images, train=train, rngs=rngs)
    return self.logits(x, train)

  def resize(self, image_size: int) -> None:
    """Adapts the model to a new input resolution, in place.

    Interpolates the grid part of pos_embed (the prefix part is kept) and
    every `bias` RPE table; iRPE buckets follow the grid by themselves.
    Updates `self.config`. Call it outside jit, then split the model anew.
    """
    new_cfg = self.config.replace(image_size=int(image_size))
    old_g, new_g = self.config.grid_size, new_cfg.grid_size
    if self.pos_embed is not None:
      pos = self.pos_embed[...]
      p = self.config.num_prefix_tokens
      grid = pos[0, p:].reshape(old_g, old_g, -1)  # [G, G, D]
      grid = resample_grid(grid, (new_g, new_g)).reshape(1, new_g**2, -1)
      self.pos_embed = nnx.Param(jnp.concatenate([pos[:, :p], grid], axis=1))
    for block in self.blocks:
      if block.attn.rpe_bias is not None:
        block.attn.rpe_bias.resize(new_g, new_g)
    self.config = new_cfg


def create_model(
    model_config: ModelConfig | Mapping[str, Any], *, rngs: nnx.Rngs
) -> DRPLViT:
  """Builds a DRPL-ViT from a ModelConfig or a (ml_collections) mapping."""
  return DRPLViT(ModelConfig.from_config(model_config), rngs=rngs)


def _flat_params(model: nnx.Module) -> list[tuple[str, Any]]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return [('.'.join(str(k) for k in path), var) for path, var in flat]


def param_names(model: nnx.Module) -> list[str]:
  """Sorted flattened nnx.Param paths, joined by '.' (e.g. 'head.kernel')."""
  return sorted(name for name, _ in _flat_params(model))


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Flattened nnx.Param path -> shape (works on nnx.eval_shape models)."""
  return {name: tuple(var.shape) for name, var in _flat_params(model)}


def count_params(model: nnx.Module) -> int:
  """Number of nnx.Param scalars (works on nnx.eval_shape models)."""
  return int(sum(int(np.prod(s)) for s in param_shapes(model).values()))
