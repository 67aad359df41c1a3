"""The timm / DeiT state-dict mapping every pretrained format builds on.

The other formats and their detection live in `drpl_jax.pretrained`;
starting a run's student from a checkpoint is `drpl_jax.train.student_init`.

The usual start on a small medical data set. Maps the state-dict naming of
timm's `VisionTransformer` / `VisionTransformerDistilled` (`vit_*`,
`deit_*`, `deit_*_distilled`; DeiT's releases wrap it as {'model': ...})
onto ours: the fused `attn.qkv` is split into q/k/v, torch layouts are
transposed, `norm*.weight` becomes `.scale`, `mlp.fc1/fc2` go to
`ffn.fc1/fc2` (MLP) or `ffn.expand/project` (LeFF: a 1x1 conv is a linear
layer), the pos_embed grid is resized bicubically with its prefix rows
kept. Parameters with no source (RPE tables, LeFF norms and depthwise conv,
a dist token/head the source lacks, layer scale) keep their fresh init.
Every tensor is shape-checked; every source key is consumed or explicitly
ignored (with the reason in the report); anything else is one error naming
the keys. Imports neither TensorFlow, TFDS, clu nor (but for `.pth` files)
torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from drpl_jax.models import ModelConfig
from drpl_jax.models.resample import resample_grid
from drpl_jax.pytorch import torch_io

Report = dict[str, Any]
Transform = Callable[[np.ndarray], np.ndarray]


def _copy(x: np.ndarray) -> np.ndarray:
  return x


def _linear(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Flax kernel [in, out]."""
  return x.T


def _conv(x: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
  return x.transpose(2, 3, 1, 0)


def _qkv(index: int, kernel: bool) -> Transform:
  """Part `index` (q, k, v) of timm's fused qkv weight [3D, D] or bias [3D]."""

  def split(x: np.ndarray) -> np.ndarray:
    part = np.split(x, 3, axis=0)[index]  # [D, D] or [D]
    return part.T if kernel else part

  return split


# Our parameter name -> (timm key, transform). Blocks use the suffix after
# 'blocks.i.'. pos_embed is handled separately (prefix + resized grid).
_TOP: dict[str, tuple[str, Transform]] = {
    'patch_embed.proj.kernel': ('patch_embed.proj.weight', _conv),
    'patch_embed.proj.bias': ('patch_embed.proj.bias', _copy),
    'cls_token': ('cls_token', _copy),
    'dist_token': ('dist_token', _copy),
    'norm.scale': ('norm.weight', _copy),
    'norm.bias': ('norm.bias', _copy),
    'head.kernel': ('head.weight', _linear),
    'head.bias': ('head.bias', _copy),
    'head_dist.kernel': ('head_dist.weight', _linear),
    'head_dist.bias': ('head_dist.bias', _copy),
}
_BLOCK: dict[str, tuple[str, Transform]] = {
    'attn.proj.kernel': ('attn.proj.weight', _linear),
    'attn.proj.bias': ('attn.proj.bias', _copy),
    'ls1.gamma': ('ls1.gamma', _copy),
    'ls2.gamma': ('ls2.gamma', _copy),
}
for _norm in ('norm1', 'norm2'):
  _BLOCK[f'{_norm}.scale'] = (f'{_norm}.weight', _copy)
  _BLOCK[f'{_norm}.bias'] = (f'{_norm}.bias', _copy)
# MLP fc1/fc2, or LeFF expand/project (1x1 convs, i.e. linear layers).
for _ours, _theirs in (
    ('fc1', 'fc1'),
    ('fc2', 'fc2'),
    ('expand', 'fc1'),
    ('project', 'fc2'),
):
  _BLOCK[f'ffn.{_ours}.kernel'] = (f'mlp.{_theirs}.weight', _linear)
  _BLOCK[f'ffn.{_ours}.bias'] = (f'mlp.{_theirs}.bias', _copy)
for _i, _part in enumerate('qkv'):
  _BLOCK[f'attn.{_part}.kernel'] = ('attn.qkv.weight', _qkv(_i, True))
  _BLOCK[f'attn.{_part}.bias'] = ('attn.qkv.bias', _qkv(_i, False))

_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.(.+)$')
HEAD_KEYS = ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What a timm ViT state dict holds, read from its keys and shapes."""

  width: int
  depth: int
  patch_size: int
  grid: int  # patches per side of the pos_embed grid
  distilled: bool  # has a dist token
  pos_prefix: int  # prefix rows in pos_embed (0 with no_embed_class)
  num_classes: int | None  # None: no head
  layer_scale: bool


def _square_side(n: int) -> int | None:
  side = math.isqrt(n)
  return side if side * side == n and side > 0 else None


def source_info(
    state: Mapping[str, np.ndarray],
    source: str = 'state dict',
    *,
    patch_key: str = 'patch_embed.proj.weight',
) -> SourceInfo:
  """Checks that `state` is a timm ViT/DeiT state dict and describes it.

  `patch_key` names the patch projection (CeiT's is `i2t.proj.weight`).
  """
  required = (patch_key, 'cls_token', 'blocks.0.attn.qkv.weight')
  missing = [k for k in required if k not in state]
  if missing:
    raise ValueError(
        f'{source}: not a timm VisionTransformer / DeiT state dict: missing '
        f'{missing}; its first keys are {sorted(state)[:12]}'
    )
  patch = np.shape(state[patch_key])
  if len(patch) != 4 or patch[2] != patch[3]:
    raise ValueError(
        f'{source}: {patch_key} has shape {patch}; expected [D, C, p, p]'
    )
  depth = 1 + max(int(m.group(1)) for m in map(_BLOCK_RE.match, state) if m)
  distilled = 'dist_token' in state
  grid, pos_prefix = 0, 1 + int(distilled)
  if 'pos_embed' in state:
    pos = np.shape(state['pos_embed'])
    if len(pos) != 3 or pos[0] != 1:
      raise ValueError(
          f'{source}: pos_embed has shape {pos}; expected '
          '[1, prefix + grid**2, D]'
      )
    side = _square_side(pos[1] - pos_prefix)
    if side is None and _square_side(pos[1]):  # timm no_embed_class=True
      side, pos_prefix = _square_side(pos[1]), 0
    if side is None:
      raise ValueError(
          f'{source}: pos_embed has {pos[1]} positions, which is neither '
          f'{pos_prefix} prefix tokens + a square grid nor a square grid'
      )
    grid = side
  head = state.get('head.weight')
  return SourceInfo(
      width=patch[0],
      depth=depth,
      patch_size=patch[2],
      grid=grid,
      distilled=distilled,
      pos_prefix=pos_prefix,
      num_classes=None if head is None else int(np.shape(head)[0]),
      layer_scale='blocks.0.ls1.gamma' in state,
  )


def as_float32_state(
    state: Mapping[str, Any], source: str = 'state dict'
) -> dict[str, np.ndarray]:
  """A copy of `state` as float32 numpy arrays (torch tensors accepted)."""
  out = {}
  for key, value in state.items():
    if not isinstance(key, str):
      raise ValueError(f'{source}: state dict key {key!r} is not a string')
    if hasattr(value, 'detach'):  # a torch tensor
      value = value.detach().cpu().float().numpy()
    array = np.asarray(value)
    if array.dtype.kind in 'biuO':
      raise ValueError(
          f'{source}: {key!r} has dtype {array.dtype}; a ViT '
          'state dict holds floating point tensors only'
      )
    out[key] = array.astype(np.float32)
  return out


class _Mapper:
  """Fills our parameter values from a source dict, tracking every key."""

  def __init__(self, state: dict[str, np.ndarray], source: str):
    self.state, self.source = state, source
    self.values: dict[str, np.ndarray] = {}
    self.consumed: set[str] = set()
    self.ignored: dict[str, str] = {}  # source key -> reason
    self.missing: list[str] = []
    self.bad_shapes: list[str] = []
    self.notes: list[str] = []
    self.origin: dict[str, str] = {}  # key -> the file's own key name

  def name(self, key: str) -> str:
    """`key`, with the checkpoint's own name when it was renamed."""
    orig = self.origin.get(key)
    return f'{key} (file key {orig})' if orig and orig != key else key

  def put(
      self, name: str, key: str, transform: Transform, shape: tuple[int, ...]
  ) -> None:
    """Our `name` <- transform(state[key]); records missing keys/shapes."""
    if key not in self.state:
      self.missing.append(f'{self.name(key)} (for {name})')
      return
    self.consumed.add(key)
    src = self.state[key]
    try:
      value = transform(src)
    except ValueError:  # e.g. a qkv weight whose rows are not 3 x D
      value = None
    if value is None or tuple(value.shape) != tuple(shape):
      got = None if value is None else tuple(value.shape)
      self.bad_shapes.append(
          f'{self.name(key)} {tuple(src.shape)} -> '
          f'{name}: got {got}, need {shape}'
      )
      return
    self.values[name] = value

  def ignore(self, keys, reason: str) -> None:
    for key in keys:
      if key in self.state:
        self.ignored[key] = reason

  def check(self) -> None:
    """One error naming every missing, mis-shaped and unmatched key."""
    problems = []
    if self.missing:
      problems.append(f'missing source keys: {self.missing}')
    if self.bad_shapes:
      problems.append(
          f'shape mismatches (source key, source shape -> our '
          f'parameter): {self.bad_shapes}'
      )
    leftover = sorted(
        self.name(k)
        for k in set(self.state) - self.consumed - set(self.ignored)
    )
    if leftover:
      problems.append(
          f'unmatched source keys (no DRPL-ViT parameter takes them): '
          f'{leftover}'
      )
    if problems:
      raise ValueError(
          f'{self.source}: cannot start the student from this '
          'checkpoint; ' + '; '.join(problems)
      )


def _pos_embed(
    m: _Mapper,
    info: SourceInfo,
    cfg: ModelConfig,
    shape: tuple[int, ...],
    resized: dict[str, Any],
) -> None:
  """Our pos_embed from the source's: prefix rows kept, grid resized."""
  if 'pos_embed' not in m.state:
    m.missing.append('pos_embed (for pos_embed)')
    return
  m.consumed.add('pos_embed')
  src = m.state['pos_embed']
  if src.shape[-1] != shape[-1]:
    m.bad_shapes.append(
        f'pos_embed {src.shape} -> pos_embed: width '
        f'{src.shape[-1]}, need {shape}'
    )
    return
  d, p = src.shape[-1], info.pos_prefix
  cls_row = src[:, :1] if p else np.zeros((1, 1, d), np.float32)
  rows = [cls_row]
  if cfg.distilled:
    rows.append(src[:, 1:2] if info.distilled and p else cls_row)
    if not info.distilled and p:
      m.notes.append(
          'pos_embed: the dist token position (row 1) is a copy '
          'of the cls token position (the source has no dist '
          'token)'
      )
  if not p:
    m.notes.append(
        'pos_embed: the source has no prefix positions (timm '
        'no_embed_class); our prefix rows are zero, which adds '
        'nothing to the prefix tokens, as in the source'
    )
  g, new_g = info.grid, cfg.grid_size
  grid = src[0, p:].reshape(g, g, d)  # [G, G, D]
  if g != new_g:
    grid = np.asarray(resample_grid(jnp.asarray(grid), (new_g, new_g)))
  value = np.concatenate(rows + [grid.reshape(1, new_g * new_g, d)], axis=1)
  if tuple(value.shape) != tuple(shape):
    m.bad_shapes.append(
        f'pos_embed {src.shape} -> pos_embed: got '
        f'{value.shape}, need {shape}'
    )
    return
  if value.shape != src.shape:
    resized['pos_embed'] = {
        'from': list(src.shape),
        'to': list(value.shape),
        'grid_from': [g, g],
        'grid_to': [new_g, new_g],
        'prefix_from': p,
        'prefix_to': cfg.num_prefix_tokens,
        'method': 'bicubic, antialiased (timm resample_abs_pos_embed)',
    }
  m.values['pos_embed'] = value


def _plan_ignored(
    m: _Mapper, info: SourceInfo, cfg: ModelConfig, strict_head: bool
) -> None:
  """Marks the source keys that deliberately have no target here."""
  if info.num_classes is not None and info.num_classes != cfg.num_classes:
    if strict_head:
      raise ValueError(
          f'{m.source}: the source head has {info.num_classes} classes but '
          f'model.num_classes={cfg.num_classes} (strict_head=True)'
      )
    m.ignore(
        HEAD_KEYS,
        f'{info.num_classes} source classes != '
        f'num_classes {cfg.num_classes}',
    )
    m.notes.append(
        f'heads: the source has {info.num_classes} classes, the '
        f'model {cfg.num_classes}; head (and head_dist) start '
        'fresh'
    )
  if info.distilled and not cfg.distilled:
    m.ignore(
        ('dist_token', 'head_dist.weight', 'head_dist.bias'),
        'the model is not distilled',
    )
    m.notes.append(
        'the source is distilled, the model is not: its dist '
        'token, head_dist and dist position are dropped'
    )
  if not cfg.abs_pos_embed:
    m.ignore(('pos_embed',), 'model.abs_pos_embed is False')
  if cfg.stem != 'patch':
    m.ignore(
        ('patch_embed.proj.weight', 'patch_embed.proj.bias'),
        f'model.stem={cfg.stem!r} has no source',
    )
    m.notes.append(
        f'stem={cfg.stem!r}: the patch embedding starts fresh; '
        'the source patch_embed.proj is not used'
    )


def _source_key(name: str) -> tuple[str, Transform] | None:
  """The (source key, transform) of our parameter `name`, if it has one."""
  if name in _TOP:
    return _TOP[name]
  match = _BLOCK_RE.match(name)
  if match and match.group(2) in _BLOCK:
    key, transform = _BLOCK[match.group(2)]
    return f'blocks.{match.group(1)}.{key}', transform
  return None


def _optional(m: _Mapper, key: str) -> bool:
  """Source keys whose absence leaves our parameter fresh (not an error).

  The dist token (a non-distilled source), a head the source lacks
  entirely (timm num_classes=0) and layer scale of a source without any.
  """
  if key in m.state:
    return False
  if key == 'dist_token':
    return True
  for head in ('head', 'head_dist'):
    if key.startswith(head + '.'):
      return f'{head}.weight' not in m.state
  return key.endswith(('.ls1.gamma', '.ls2.gamma')) and not any(
      k.endswith(('.ls1.gamma', '.ls2.gamma')) for k in m.state
  )


@dataclasses.dataclass
class Plan:
  """What a source format adds to the timm mapping (see drpl_jax.pretrained).

  extra: our parameter name -> (source key, transform), taking precedence
    over the timm names. fresh: our names deliberately left at their init.
  ignored: source key -> why it is not used. origin: renamed key -> the
    file's own key (named in errors). info: the source's description when
    `source_info` cannot read it from timm names.
  """

  format: str = 'timm'
  extra: dict[str, tuple[str, Transform]] = dataclasses.field(
      default_factory=dict
  )
  fresh: set[str] = dataclasses.field(default_factory=set)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  origin: dict[str, str] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  info: SourceInfo | None = None


def map_timm_state(
    state: Mapping[str, Any],
    target_shapes: Mapping[str, tuple[int, ...]],
    model_config: ModelConfig,
    *,
    strict_head: bool = False,
    source: str = 'state dict',
    plan: Plan | None = None,
) -> tuple[dict[str, np.ndarray], Report]:
  """Maps a timm ViT/DeiT state dict onto our flat parameter names.

  Args:
    state: the source {key: array} (numpy, torch tensors or bfloat16).
    target_shapes: our flat variable name -> shape (`param_shapes`, plus
      BatchNorm statistics where a source has them).
    model_config: the target model; its image_size sets the position grid.
    strict_head: a class-count mismatch of the heads is an error instead of
      dropping them.
    source: how errors and the report name the checkpoint.
    plan: what a non-timm format adds (drpl_jax.pretrained); None = timm.

  Returns:
    ({our name: float32 array} of the loaded parameters, the report
    {'source', 'format', 'loaded', 'fresh', 'ignored', 'resized', 'notes'}).
  """
  cfg = ModelConfig.from_config(model_config)
  plan = plan or Plan()
  state = as_float32_state(state, source)
  info = plan.info or source_info(state, source)
  if info.depth != cfg.depth:
    raise ValueError(
        f'{source}: the source has {info.depth} blocks but '
        f'model.depth={cfg.depth}; use the matching variant'
    )
  m = _Mapper(state, source)
  m.origin.update(plan.origin)
  m.ignored.update(plan.ignored)  # the driver has dropped these keys
  _plan_ignored(m, info, cfg, strict_head)
  resized: dict[str, Any] = {}
  for name, shape in sorted(target_shapes.items()):
    if name in plan.fresh:
      continue
    if name == 'pos_embed' and name not in plan.extra:
      _pos_embed(m, info, cfg, tuple(shape), resized)
      continue
    entry = plan.extra.get(name) or _source_key(name)
    if entry is None or entry[0] in m.ignored or _optional(m, entry[0]):
      continue
    m.put(name, entry[0], entry[1], tuple(shape))
  m.check()
  notes = (
      plan.notes + m.notes + _fresh_notes(cfg, info, target_shapes, m.values)
  )
  report = {
      'source': source,
      'format': plan.format,
      'loaded': sorted(m.values),
      'fresh': sorted(set(target_shapes) - set(m.values)),
      'ignored': sorted(m.ignored),
      'ignored_reasons': dict(m.ignored),
      'resized': resized,
      'notes': notes,
  }
  return m.values, report


def _fresh_notes(
    cfg: ModelConfig,
    info: SourceInfo,
    target_shapes: Mapping[str, Any],
    values: Mapping[str, Any],
) -> list[str]:
  """Human-readable reasons why some parameters start fresh."""
  notes = []
  fresh = set(target_shapes) - set(values)
  if info.num_classes is None:
    notes.append(
        'the source has no classifier head (timm num_classes=0): '
        'the heads start fresh'
    )
  if cfg.distilled and not info.distilled:
    notes.append(
        'dist_token and head_dist start fresh: the source has no '
        'distillation token'
    )
  if any('.rpe_' in n for n in fresh):
    notes.append(
        f'rpe.kind={cfg.rpe.kind!r}: the relative position tables '
        'have no source and start fresh'
    )
  if cfg.conv.kind == 'leff' and any('.ffn.dwconv.' in n for n in fresh):
    notes.append(
        'LeFF: ffn.expand <- mlp.fc1 and ffn.project <- mlp.fc2 '
        '(a 1x1 conv is a linear layer, same shapes); the LeFF '
        'norms and the depthwise conv start fresh'
    )
  if any(n.endswith('.ls1.gamma') for n in fresh) and not info.layer_scale:
    notes.append(
        'layer scale (ls1/ls2.gamma) has no source and starts at '
        f'model.layer_scale_init={cfg.layer_scale_init}'
    )
  return notes


def load_timm_state(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
) -> tuple[Mapping[str, Any], str]:
  """A checkpoint path or mapping -> (flat state dict, its description).

  Files go through `torch_io.load_state_dict` (.safetensors, or .pth/.pt/
  .bin with weights_only and torch >= 2.10; DeiT's {'model': ...} release
  format is unwrapped there). A mapping of the same form is unwrapped too.
  """
  if isinstance(checkpoint, Mapping):
    for wrapper in torch_io.WRAPPER_KEYS:
      if isinstance(checkpoint.get(wrapper), Mapping):
        return checkpoint[wrapper], f'state dict[{wrapper!r}]'
    return checkpoint, 'state dict'
  path = os.fspath(checkpoint)
  return torch_io.load_state_dict(path), path


def update_params(params: Any, values: Mapping[str, np.ndarray]) -> Any:
  """`params` (an nnx.State or pytree) with `values` put in by flat name.

  Keeps the tree structure, each leaf's dtype and, for jax arrays, its
  sharding. Every name in `values` must exist in `params`.
  """
  seen = set()

  def one(path, leaf):
    name = path_name(path)
    if name not in values:
      return leaf
    seen.add(name)
    value = np.asarray(values[name]).astype(leaf.dtype)
    if isinstance(leaf, jax.Array):  # every process holds the same value
      return jax.make_array_from_callback(
          value.shape, leaf.sharding, lambda index: value[index]
      )
    return jnp.asarray(value)

  out = jax.tree_util.tree_map_with_path(one, params)
  unknown = sorted(set(values) - seen)
  if unknown:
    raise ValueError(
        f'values for parameters the state does not have: {unknown}'
    )
  return out


def path_name(path: tuple[Any, ...]) -> str:
  """'blocks.0.attn.q.kernel' from a tree path (nnx's '.value' dropped)."""
  parts = []
  for key in path:
    part = next(
        (getattr(key, a) for a in ('key', 'name', 'idx') if hasattr(key, a)),
        key,
    )
    parts.append(str(part))
  if parts and parts[-1] == 'value':
    parts = parts[:-1]
  return '.'.join(parts)


def log_report(report: Report) -> None:
  """Logs an import report in one line."""
  logging.info(
      'Student init from %s (%s): %d parameters loaded, %d fresh %s, %d source '
      'keys ignored %s, resized %s. %s',
      report['source'],
      report.get('format', 'timm'),
      len(report['loaded']),
      len(report['fresh']),
      report['fresh'],
      len(report['ignored']),
      report['ignored'],
      report['resized'],
      ' '.join(report['notes']),
  )
