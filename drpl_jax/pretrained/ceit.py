"""Official CeiT checkpoints (coeusguo/ceit, `ceit_model.py`).

Names: the image-to-tokens stem `i2t.backbone.conv` (7x7/2, no bias),
`i2t.backbone.bn`, `i2t.proj` (patch / 4 conv); timm's cls_token,
pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2}, norm, head; the
LeFF `blocks.N.leff.conv1` (1x1, [E, D, 1, 1]), `conv2` (depthwise,
[E, 1, k, k]), `conv3` (1x1, [D, E, 1, 1]) and `bn1..3` after each conv
(BatchNorm statistics included). DRPL-ViT has no layer-wise class-token
attention: `lca.*` and `pos_layer_embed` are reported and skipped; the
final norm and head were trained on its output and are loaded as a start.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from drpl_jax.models import ModelConfig
from drpl_jax.pretrained.mapping import Plan, Transform, source_info

_BLOCK = re.compile(r'^blocks\.(\d+)\.leff\.')


def _copy(x: np.ndarray) -> np.ndarray:
  return x


def _conv(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax [kh, kw, in, out]."""
  if x.ndim != 4:
    raise ValueError(f'rank {x.ndim}')
  return x.transpose(2, 3, 1, 0)


def _pointwise(x: np.ndarray) -> np.ndarray:
  """A 1x1 conv weight [out, in, 1, 1] -> a Linear kernel [in, out]."""
  if x.ndim != 4 or x.shape[2:] != (1, 1):
    raise ValueError(f'shape {x.shape}')
  return x[:, :, 0, 0].T


def _bn(ours: str, theirs: str) -> dict[str, tuple[str, Transform]]:
  """Our BatchNorm `ours` <- torch BatchNorm2d `theirs` (with statistics)."""
  return {
      f'{ours}.{a}': (f'{theirs}.{b}', _copy)
      for a, b in (
          ('scale', 'weight'),
          ('bias', 'bias'),
          ('mean', 'running_mean'),
          ('var', 'running_var'),
      )
  }


def _stem(out: Plan, state: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
  if cfg.stem != 'conv':
    for key in state:
      if key.startswith('i2t.'):
        out.ignored[key] = f'model.stem={cfg.stem!r} (no conv stem)'
    out.fresh.update(('patch_embed.proj.kernel', 'patch_embed.proj.bias'))
    out.notes.append(
        f"model.stem={cfg.stem!r}: CeiT's image-to-tokens stem "
        'is not used and the patch embedding starts fresh; '
        "use stem='conv' to keep it"
    )
    return
  out.extra['patch_embed.stem_conv.kernel'] = (
      'i2t.backbone.conv.weight',
      _conv,
  )
  out.extra.update(_bn('patch_embed.stem_norm', 'i2t.backbone.bn'))
  out.extra['patch_embed.proj.kernel'] = ('i2t.proj.weight', _conv)
  out.extra['patch_embed.proj.bias'] = ('i2t.proj.bias', _copy)


def _leff(out: Plan, block: str, cfg: ModelConfig, keys: list[str]) -> None:
  b, f = f'blocks.{block}.', f'blocks.{block}.ffn.'
  if cfg.conv.kind == 'mlp':
    out.extra[f + 'fc1.kernel'] = (b + 'leff.conv1.weight', _pointwise)
    out.extra[f + 'fc1.bias'] = (b + 'leff.conv1.bias', _copy)
    out.extra[f + 'fc2.kernel'] = (b + 'leff.conv3.weight', _pointwise)
    out.extra[f + 'fc2.bias'] = (b + 'leff.conv3.bias', _copy)
    for key in keys:
      if '.leff.conv2.' in key or '.leff.bn' in key:
        out.ignored[key] = "model.conv.kind='mlp' has no depthwise conv/norms"
    return
  out.extra[f + 'expand.kernel'] = (b + 'leff.conv1.weight', _pointwise)
  out.extra[f + 'expand.bias'] = (b + 'leff.conv1.bias', _copy)
  out.extra[f + 'dwconv.kernel'] = (b + 'leff.conv2.weight', _conv)
  out.extra[f + 'dwconv.bias'] = (b + 'leff.conv2.bias', _copy)
  out.extra[f + 'project.kernel'] = (b + 'leff.conv3.weight', _pointwise)
  out.extra[f + 'project.bias'] = (b + 'leff.conv3.bias', _copy)
  for ours, theirs in (
      ('expand_norm', 'bn1'),
      ('dw_norm', 'bn2'),
      ('project_norm', 'bn3'),
  ):
    out.extra.update(_bn(f + ours, b + 'leff.' + theirs))


def plan(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str
) -> Plan:
  """CeiT's stem, LeFF and BatchNorm statistics onto ours; LCA skipped."""
  if cfg.conv.kind == 'leff' and cfg.conv.norm != 'batch':
    raise ValueError(
        f"{source}: CeiT's LeFF uses BatchNorm; set "
        "model.conv.norm='batch' (it is "
        f'{cfg.conv.norm!r})'
    )
  info = source_info(state, source, patch_key='i2t.proj.weight')
  kernel = info.patch_size
  out = Plan(
      format='ceit', info=dataclasses.replace(info, patch_size=4 * kernel)
  )
  _stem(out, state, cfg)
  blocks: dict[str, list[str]] = {}
  for key in state:
    match = _BLOCK.match(key)
    if match:
      blocks.setdefault(match.group(1), []).append(key)
    if key.endswith('.num_batches_tracked'):
      out.ignored[key] = 'BatchNorm step counter (unused with momentum 0.1)'
    elif key.startswith('lca.') or key == 'pos_layer_embed':
      out.ignored[key] = (
          'CeiT layer-wise class-token attention (LCA): DRPL-ViT has none'
      )
  for block, keys in sorted(blocks.items()):
    _leff(out, block, cfg, keys)
  out.notes.append(
      'CeiT: its layer-wise class-token attention (lca.*, '
      'pos_layer_embed) is skipped; the final norm and head, '
      'trained on its output, are loaded as a start'
  )
  if cfg.conv.kind == 'leff':
    out.notes.append(
        'CeiT LeFF: conv1/conv3 (1x1) -> ffn.expand/project, '
        'conv2 -> ffn.dwconv, bn1..3 (with running '
        'statistics) -> expand_norm, dw_norm, project_norm'
    )
    if cfg.conv.prefix != 'identity':
      out.notes.append(
          f"CeiT's LeFF leaves the cls token unchanged; "
          f'model.conv.prefix={cfg.conv.prefix!r} passes the '
          'prefix tokens through expand/project instead'
      )
  return out
