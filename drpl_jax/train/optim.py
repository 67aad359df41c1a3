"""Optimizer: AdamW with linear warmup + cosine decay, DeiT conventions.

Options (all under `config.optim`):
  grad_clip      global-norm clipping (0 = off), before AdamW.
  mu_dtype       dtype of Adam's first moment ('' = the parameter dtype;
                 'bfloat16' halves its memory). The second moment stays in
                 the parameter dtype, as in optax: its squares underflow in
                 bf16.
  layer_decay    layer-wise learning-rate decay for fine-tuning (BEiT,
                 DeiT-III): 1.0 = off. With depth L, `blocks.i` gets
                 decay^(L - i), the embeddings (patch_embed, cls/dist
                 tokens, pos_embed) decay^(L + 1), everything after the last
                 block (norm, heads) 1.
  rpe_weight_decay
                 whether the iRPE tables (`rpe_q/rpe_k/rpe_v.table`) get
                 weight decay (default True). The official iRPE DeiT
                 training (microsoft/Cream, iRPE/DeiT-with-iRPE) builds its
                 optimizer with timm's `create_optimizer`, whose only
                 exemptions are 1-D tensors, biases and the model's
                 `no_weight_decay()` = {pos_embed, cls_token}: its iRPE
                 lookup tables ([heads, buckets, head_dim]) are decayed like
                 every other matrix, at the same learning rate, from a zero
                 initialisation. False exempts them (this project's old
                 behaviour). The Swin-style `bias` tables stay exempt (Swin
                 and BEiT list their relative position bias tables in
                 `no_weight_decay`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters that never get weight decay besides all 1-D ones (biases, norm
# scales, layer-scale gammas): DeiT's `no_weight_decay` set, plus the
# Swin/BEiT-style relative position bias tables (exempt in those models).
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'dist_token', 'rpe_bias.')
# The iRPE tables: decayed by default, as in the official iRPE training.
IRPE_TABLE = re.compile(r'(^|\.)rpe_[qkv]\.table(\.value)?$')
# Top-level parameter names that sit before the first block (layer 0).
EMBEDDING_NAMES = ('patch_embed', 'cls_token', 'dist_token', 'pos_embed')
_BLOCK = re.compile(r'^blocks\.(\d+)\.')
MU_DTYPES = ('', 'float32', 'bfloat16', 'float16')


def path_str(path: tuple[Any, ...]) -> str:
  """'blocks.0.attn.q.kernel' from a jax key path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '.'.join(parts)


def decays(name: str, ndim: int, rpe_weight_decay: bool = True) -> bool:
  """Whether the parameter `name` (dotted path) of rank `ndim` is decayed.

  Matrices and conv kernels only; `rpe_weight_decay=False` also exempts the
  iRPE tables (the reference recipe decays them; see the module docstring).
  Shared with the PyTorch twin (`drpl_jax.pytorch.twin.train`).
  """
  if not rpe_weight_decay and IRPE_TABLE.search(name):
    return False
  return ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def decay_mask(params: Any, rpe_weight_decay: bool = True) -> Any:
  """True where weight decay applies (a tree of bools like `params`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: decays(path_str(path), x.ndim, rpe_weight_decay),
      params)


def layer_id(name: str, depth: int) -> int:
  """0 for embeddings, i + 1 for `blocks.i.*`, depth + 1 for the rest."""
  match = _BLOCK.match(name)
  if match:
    i = int(match.group(1))
    if i >= depth:
      raise ValueError(f'parameter {name!r} is in block {i} but the model '
                       f'depth is {depth}')
    return i + 1
  if name.split('.')[0] in EMBEDDING_NAMES:
    return 0
  return depth + 1


def layer_scales(params: Any, depth: int, decay: float) -> Any:
  """The learning-rate multiplier of every parameter (a tree of floats)."""
  if not 0.0 < decay <= 1.0:
    raise ValueError(f'config.optim.layer_decay={decay} must be in (0, 1]')

  def one(path, _):
    return float(decay ** (depth + 1 - layer_id(path_str(path), depth)))

  return jax.tree_util.tree_map_with_path(one, params)


class _ScaleByTreeState(NamedTuple):
  pass


def scale_by_layer(depth: int, decay: float
                   ) -> optax.GradientTransformation:
  """Multiplies each update by its layer's `layer_scales` factor.

  Placed last in the chain, it scales the whole AdamW step (weight decay
  included), as a per-parameter-group learning rate does in PyTorch.
  """

  def init(params):
    layer_scales(params, depth, decay)  # validates names and decay early
    return _ScaleByTreeState()

  def update(updates, state, params=None):
    del params
    scales = layer_scales(updates, depth, decay)
    updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates,
                           scales)
    return updates, state

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> optax.Schedule:
  """Linear warmup to base_lr * batch/512, then cosine decay to min_lr."""
  opt = config.optim
  peak = opt.base_lr * config.batch_size / 512
  warmup = min(opt.warmup_steps, max(config.total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1),
      end_value=min(opt.min_lr, peak))


def _mu_dtype(config: ml_collections.ConfigDict) -> Any:
  name = config.optim.get('mu_dtype', '') or ''
  if name not in MU_DTYPES:
    raise ValueError(f'config.optim.mu_dtype={name!r} is not one of '
                     f'{list(MU_DTYPES)}')
  return jnp.dtype(name) if name else None


def _model_depth(config: ml_collections.ConfigDict) -> int:
  from drpl_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  return ModelConfig.from_config(config.model).depth


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay on matrices only), clipping, layer decay."""
  opt = config.optim
  schedule = learning_rate_schedule(config)
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  rpe_decay = bool(opt.get('rpe_weight_decay', True))
  mask = lambda params: decay_mask(params, rpe_weight_decay=rpe_decay)
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                           weight_decay=opt.weight_decay, mask=mask,
                           mu_dtype=_mu_dtype(config)))
  layer_decay = float(opt.get('layer_decay', 1.0))
  if layer_decay != 1.0:
    parts.append(scale_by_layer(_model_depth(config), layer_decay))
  return optax.chain(*parts), schedule
