"""A trained deit / vit preset model as a timm state dict.

The inverse of the timm import: q/k/v kernels fused into `attn.qkv`, Flax
layouts transposed back, `.scale` -> `.weight`, `ffn.fc1/fc2` ->
`mlp.fc1/fc2`. The result loads with `strict=True` into
`timm.create_model('deit_*_distilled_patch16_224')` (distilled) or the
`deit_*_patch16_224` / `vit_*` models, and computes the same logits. Models
with RPE, LeFF or the conv stem have no timm counterpart: they go to the
project's PyTorch twin (`drpl_jax.pytorch.twin`).
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from drpl_jax.models import DRPLViT, ModelConfig
from drpl_jax.pretrained.torch_layout import to_torch_layout, torch_name

_SIZES = {192: 'tiny', 384: 'small', 768: 'base'}


def timm_problems(cfg: ModelConfig) -> list[str]:
  """Why `cfg` has no timm ViT/DeiT counterpart (empty when it has one)."""
  problems = []
  if cfg.rpe.kind != 'none':
    problems.append(f'rpe.kind={cfg.rpe.kind!r}')
  if cfg.conv.kind != 'mlp':
    problems.append(f'conv.kind={cfg.conv.kind!r}')
  if cfg.stem != 'patch':
    problems.append(f'stem={cfg.stem!r}')
  if not cfg.abs_pos_embed:
    problems.append('abs_pos_embed=False')
  return problems


def timm_model_name(cfg: ModelConfig) -> str | None:
  """The timm model whose architecture `cfg` is, if a standard DeiT size."""
  size = _SIZES.get(cfg.width)
  if size is None or cfg.depth != 12 or cfg.patch_size != 16:
    return None
  name = (
      f'deit_{size}_distilled_patch16'
      if cfg.distilled
      else (f'deit_{size}_patch16')
  )
  return f'{name}_{cfg.image_size}'


def _flat(model: DRPLViT) -> dict[str, np.ndarray]:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {
      '.'.join(map(str, p)): np.asarray(v[...], np.float32) for p, v in flat
  }


def timm_state_dict(model: DRPLViT) -> dict[str, np.ndarray]:
  """The timm VisionTransformer(Distilled) state dict of `model`."""
  cfg = model.config
  problems = timm_problems(cfg)
  if problems:
    raise ValueError(
        'no timm counterpart for a model with '
        + ', '.join(problems)
        + ': export it to the PyTorch twin (drpl_jax.pytorch.twin) instead'
    )
  p = _flat(model)
  out: dict[str, np.ndarray] = {}
  for name, value in p.items():
    match = re.match(r'^blocks\.(\d+)\.attn\.([qkv])\.(kernel|bias)$', name)
    if match:
      continue  # fused below
    key = torch_name(name).replace('ffn.fc', 'mlp.fc')
    out[key] = to_torch_layout(name, value)
  for i in range(cfg.depth):
    a = f'blocks.{i}.attn.'
    out[a + 'qkv.weight'] = np.concatenate(
        [p[f'{a}{x}.kernel'].T for x in 'qkv']
    )  # [3D, D]
    if f'{a}q.bias' in p:
      out[a + 'qkv.bias'] = np.concatenate([p[f'{a}{x}.bias'] for x in 'qkv'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
