"""Optimizer: AdamW with linear warmup + cosine decay, DeiT conventions."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameters that never get weight decay besides all 1-D ones (biases, norm
# scales, layer-scale gammas): timm's `no_weight_decay` set, plus the RPE
# tables, which are embeddings like the position embedding.
NO_DECAY_NAMES = ('pos_embed', 'cls_token', 'dist_token', 'rpe_')


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


def decay_mask(params: Any) -> Any:
  """True where weight decay applies (matrices and conv kernels only)."""

  def one(path, x):
    name = path_str(path)
    return x.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(one, params)


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


def create_optimizer(config: ml_collections.ConfigDict
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled decay on matrices only) with global-norm clipping."""
  opt = config.optim
  schedule = learning_rate_schedule(config)
  parts = []
  if opt.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
