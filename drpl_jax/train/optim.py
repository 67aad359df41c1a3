"""Optimizer: AdamW with linear warmup + cosine decay, DeiT conventions.

Options (`OptimConfig`, the `config.optim` section):
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

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from drpl_jax.config import contract

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


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW, its schedule and the EMA; `config.optim` is generated from it."""

  base_lr: float = 5e-4  # for a global batch of 512, scaled linearly
  min_lr: float = 1e-6
  warmup_steps: int = 1000
  weight_decay: float = 0.05
  # Decay the iRPE tables too (see the module docstring); False = exempt.
  rpe_weight_decay: bool = True
  b1: float = 0.9
  b2: float = 0.999
  grad_clip: float = 1.0  # global norm, 0 = off
  ema_decay: float = 0.0  # 0 = no EMA
  # Micro-batches per update (global batch split inside the jitted step).
  grad_accum_steps: int = 1
  mu_dtype: str = ''  # Adam first moment dtype, '' = param dtype
  # Layer-wise lr decay for fine-tuning (BEiT/DeiT-III), 1.0 = off.
  layer_decay: float = 1.0

  def __post_init__(self):
    if self.mu_dtype not in MU_DTYPES:
      raise ValueError(
          f'config.optim.mu_dtype={self.mu_dtype!r} is not one '
          f'of {list(MU_DTYPES)}'
      )
    if not 0.0 < self.layer_decay <= 1.0:
      raise ValueError(
          f'config.optim.layer_decay={self.layer_decay} must be in (0, 1]'
      )

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> OptimConfig:
    """The typed `config.optim`; unknown keys are named in the error."""
    return contract.build(cls, section, 'optim')


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
      lambda path, x: decays(path_str(path), x.ndim, rpe_weight_decay), params
  )


def layer_id(name: str, depth: int) -> int:
  """0 for embeddings, i + 1 for `blocks.i.*`, depth + 1 for the rest."""
  match = _BLOCK.match(name)
  if match:
    i = int(match.group(1))
    if i >= depth:
      raise ValueError(
          f'parameter {name!r} is in block {i} but the model '
          f'depth is {depth}'
      )
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


def scale_by_layer(depth: int, decay: float) -> optax.GradientTransformation:
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
    updates = jax.tree.map(
        lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales
    )
    return updates, state

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(
    cfg: OptimConfig, *, batch_size: int, total_steps: int
) -> optax.Schedule:
  """Linear warmup to base_lr * batch/512, then cosine decay to min_lr.

  `batch_size` is the global batch, `total_steps` the run's updates.
  """
  peak = cfg.base_lr * batch_size / 512
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=min(cfg.min_lr, peak),
  )


def create_optimizer(
    cfg: OptimConfig, batch_size: int, total_steps: int, depth: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay on matrices only), clipping, layer decay.

  `batch_size` (global) and `total_steps` shape the schedule; `depth` is
  the model's number of blocks (for `layer_decay`).
  """
  schedule = learning_rate_schedule(
      cfg, batch_size=batch_size, total_steps=total_steps
  )
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  mask = lambda params: decay_mask(
      params, rpe_weight_decay=cfg.rpe_weight_decay
  )
  mu_dtype = jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None
  parts.append(
      optax.adamw(
          schedule,
          b1=cfg.b1,
          b2=cfg.b2,
          weight_decay=cfg.weight_decay,
          mask=mask,
          mu_dtype=mu_dtype,
      )
  )
  if cfg.layer_decay != 1.0:
    parts.append(scale_by_layer(depth, cfg.layer_decay))
  return optax.chain(*parts), schedule
