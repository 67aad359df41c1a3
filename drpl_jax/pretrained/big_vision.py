"""big_vision / vision_transformer (AugReg) `.npz` ViT checkpoints.

The flax names are renamed to timm's, with each tensor's layout changed,
and the timm mapping does the rest (shape checks, position grid resize).
Two layouts:

  vision_transformer (AugReg): `Transformer/posembed_input/pos_embedding`
    [1, 1 + N, D] (cls row first), blocks `Transformer/encoderblock_N/`
    with `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
    `MlpBlock_3/Dense_{0,1}`.
  big_vision: `pos_embedding` [1, N, D] (patches only; the cls token gets
    none), `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`; blocks either `encoderblock_N` or one scanned
    `encoderblock` whose arrays lead with the depth axis.

Common: `embedding/kernel` [p, p, 3, D], `cls` [1, 1, D], attention
`query|key|value/kernel` [D, H, hd] and `/bias` [H, hd], `out/kernel`
[H, hd, D], `Transformer/encoder_norm`, `head/kernel` [D, C]. Keys may sit
under `params/`, `params/img/` or `opt/target/`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from drpl_jax.models import ModelConfig
from drpl_jax.pretrained.mapping import Plan

_PREFIXES = ('opt/target/', 'params/img/', 'params/', '')


def _prefix(state: Mapping[str, np.ndarray], source: str) -> str:
  for prefix in _PREFIXES:
    if f'{prefix}embedding/kernel' in state:
      return prefix
  raise ValueError(f'{source}: no embedding/kernel; not a ViT .npz')


class _Renamer:
  """Builds the timm-named state, remembering every file key it used."""

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str, source: str):
    self.state, self.prefix, self.source = state, prefix, source
    self.out: dict[str, np.ndarray] = {}
    self.origin: dict[str, str] = {}
    self.used: set[str] = set()
    self.shapes: dict[str, tuple[int, ...]] = {}

  def get(self, name: str, ndim: int, idx: int | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.state:
      raise ValueError(f'{self.source}: missing key {key}')
    self.used.add(key)
    value = np.asarray(self.state[key])
    if idx is not None:
      value = value[idx]
    self.shapes[key] = tuple(value.shape)
    if value.ndim != ndim:
      raise ValueError(
          f'{self.source}: {key} has shape {value.shape}; '
          f'expected rank {ndim}'
      )
    return value

  def put(self, timm_key: str, value: np.ndarray, *names: str) -> None:
    self.out[timm_key] = value
    self.origin[timm_key] = ' + '.join(
        f'{self.prefix + n} {self.shapes[self.prefix + n]}' for n in names
    )


def _attention(
    r: _Renamer, t: str, b: str, idx: int | None, cfg: ModelConfig
) -> None:
  """query/key/value [D, H, hd] -> qkv [3D, D]; out [H, hd, D] -> proj."""
  ws, bs = [], []
  for part in ('query', 'key', 'value'):
    w = r.get(f'{b}{part}/kernel', 3, idx)  # [D, H, hd]
    if w.shape[1] != cfg.num_heads:
      raise ValueError(
          f'{r.source}: {r.prefix}{b}{part}/kernel has shape {w.shape} '
          f'({w.shape[1]} heads) but model.num_heads={cfg.num_heads}'
      )
    ws.append(w.reshape(w.shape[0], -1).T)  # [H*hd, D]
    bs.append(r.get(f'{b}{part}/bias', 2, idx).reshape(-1))  # [H*hd]
  names = [f'{b}{p}/kernel' for p in ('query', 'key', 'value')]
  r.put(f'{t}attn.qkv.weight', np.concatenate(ws), *names)
  r.put(
      f'{t}attn.qkv.bias',
      np.concatenate(bs),
      *[n.replace('kernel', 'bias') for n in names],
  )
  out = r.get(f'{b}out/kernel', 3, idx)  # [H, hd, D]
  r.put(
      f'{t}attn.proj.weight', out.reshape(-1, out.shape[-1]).T, f'{b}out/kernel'
  )
  r.put(f'{t}attn.proj.bias', r.get(f'{b}out/bias', 1, idx), f'{b}out/bias')


def _blocks(r: _Renamer, big_vision: bool, cfg: ModelConfig) -> None:
  scanned = f'{r.prefix}Transformer/encoderblock/LayerNorm_0/scale' in r.state
  mha, ln2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
  depth = (
      np.shape(
          r.state[f'{r.prefix}Transformer/encoderblock/LayerNorm_0/scale']
      )[0]
      if scanned
      else sum(
          1
          for k in r.state
          if k.startswith(f'{r.prefix}Transformer/encoderblock_')
          and k.endswith('/LayerNorm_0/scale')
      )
  )
  for i in range(depth):
    b = (
        'Transformer/encoderblock/'
        if scanned
        else f'Transformer/encoderblock_{i}/'
    )
    idx = i if scanned else None
    t = f'blocks.{i}.'
    for ours, ln in (('norm1', 0), ('norm2', ln2)):
      for leaf, theirs in (('weight', 'scale'), ('bias', 'bias')):
        name = f'{b}LayerNorm_{ln}/{theirs}'
        r.put(f'{t}{ours}.{leaf}', r.get(name, 1, idx), name)
    _attention(r, t, f'{b}MultiHeadDotProductAttention_{mha}/', idx, cfg)
    for j in range(2):
      name = f'{b}MlpBlock_{mlp}/Dense_{j}/'
      r.put(
          f'{t}mlp.fc{j + 1}.weight',
          r.get(name + 'kernel', 2, idx).T,
          name + 'kernel',
      )
      r.put(
          f'{t}mlp.fc{j + 1}.bias', r.get(name + 'bias', 1, idx), name + 'bias'
      )


def convert(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str
) -> tuple[dict[str, np.ndarray], Plan]:
  """The npz as a timm-named state dict and the plan naming file keys."""
  r = _Renamer(state, _prefix(state, source), source)
  p = r.prefix
  if f'{p}cls' not in state:
    raise ValueError(
        f'{source}: no {p}cls token: a pool_type gap/map checkpoint; '
        'DRPL-ViT classifies from the cls token, so only cls-token ViTs '
        'import'
    )
  big_vision = f'{p}pos_embedding' in state
  emb = r.get('embedding/kernel', 4)  # [p, p, 3, D]
  r.put(
      'patch_embed.proj.weight', emb.transpose(3, 2, 0, 1), 'embedding/kernel'
  )
  r.put('patch_embed.proj.bias', r.get('embedding/bias', 1), 'embedding/bias')
  r.put('cls_token', r.get('cls', 3), 'cls')
  pos = (
      'pos_embedding'
      if big_vision
      else ('Transformer/posembed_input/pos_embedding')
  )
  r.put('pos_embed', r.get(pos, 3), pos)
  for leaf, theirs in (('weight', 'scale'), ('bias', 'bias')):
    name = f'Transformer/encoder_norm/{theirs}'
    r.put(f'norm.{leaf}', r.get(name, 1), name)
  _blocks(r, big_vision, cfg)
  out = Plan(format='big_vision', origin=r.origin)
  pre_logits = any(k.startswith(f'{p}pre_logits/') for k in state)
  if f'{p}head/kernel' in state and not pre_logits:
    r.put('head.weight', r.get('head/kernel', 2).T, 'head/kernel')
    r.put('head.bias', r.get('head/bias', 1), 'head/bias')
  for key in state:
    if key in r.used:
      continue
    if not key.startswith(p):
      out.ignored[key] = 'not under the parameters (optimizer state)'
    elif key.startswith((f'{p}pre_logits/', f'{p}head/')):
      out.ignored[key] = (
          'the head sits on a pre_logits layer (tanh), '
          'which DRPL-ViT has not: the head starts fresh'
      )
    else:
      out.ignored[key] = None  # unknown: reported as unmatched below
  unknown = sorted(k for k, v in out.ignored.items() if v is None)
  for key in unknown:
    del out.ignored[key]
    r.out[key] = np.asarray(state[key])  # left over: named as unmatched
  out.notes.append(
      f'{"big_vision" if big_vision else "vision_transformer"}'
      ' layout: query/key/value [D, H, hd] fused into qkv, '
      'out [H, hd, D] -> proj, Dense kernels transposed'
  )
  out.notes.append(
      "the flax MLP used nn.gelu's tanh approximation; "
      'DRPL-ViT (like timm) uses the exact erf GELU, so outputs '
      "differ slightly from the JAX original (as timm's port)"
  )
  if big_vision:
    out.notes.append(
        'big_vision adds no position to the cls token: our '
        'prefix positions are zero'
    )
  return r.out, out
