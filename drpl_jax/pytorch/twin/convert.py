"""Weight conversion between the Flax DRPL-ViT and its PyTorch twin.

Names map one to one (`blocks.0.attn.q.kernel` is `blocks.0.attn.q.weight`)
and kernels are transposed, as `drpl_jax.pretrained.torch_layout` says;
tokens, pos_embed, RPE tables, layer-scale gammas and norms are unchanged.
PyTorch's `num_batches_tracked` has no Flax counterpart (it is written as 0
and ignored on import: with momentum 0.1 PyTorch does not use it).
Every tensor is shape-checked and every key must be matched; mismatches are
errors that name the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from drpl_jax.models import DRPLViT, create_model
from drpl_jax.pretrained.torch_layout import (
    to_flax_layout,
    to_torch_layout,
    torch_name,
)
from drpl_jax.pytorch.twin.model import DRPLViTTorch

IGNORED_TORCH_LEAVES = ('num_batches_tracked',)


def _flat(state: nnx.State) -> list[tuple[str, Any]]:
  return [
      ('.'.join(str(k) for k in path), var)
      for path, var in nnx.to_flat_state(state)
  ]


def _numpy(value: Any) -> np.ndarray:
  """A jax/numpy array or nnx Variable as a numpy array (bf16 -> float32)."""
  if isinstance(value, nnx.Variable):
    value = value[...]
  arr = np.asarray(value)
  if arr.dtype.kind == 'V' or 'bfloat16' in str(arr.dtype):
    arr = arr.astype(np.float32)
  return arr


def torch_arrays(state: nnx.State) -> dict[str, np.ndarray]:
  """Numpy arrays keyed and laid out as PyTorch state-dict entries.

  For any nnx.State of the model: parameters, BatchNorm statistics or
  gradients (to compare them with PyTorch's `.grad`).
  """
  return {
      torch_name(name): np.ascontiguousarray(to_torch_layout(name, _numpy(var)))
      for name, var in _flat(state)
  }


def _variables(model: DRPLViT) -> list[tuple[str, nnx.Variable]]:
  params = _flat(nnx.state(model, nnx.Param))
  stats = _flat(nnx.state(model, nnx.BatchStat))
  return params + stats


def state_dict_from_flax(model: DRPLViT) -> dict[str, torch.Tensor]:
  """The PyTorch state dict (of `DRPLViTTorch(model.config)`) of a Flax model.

  Parameters and BatchNorm running statistics, in PyTorch layout and in the
  Flax variables' dtype; `num_batches_tracked` is 0. Save it with
  `safetensors.torch.save_file` or `torch.save` to run the model in PyTorch.
  """
  out: dict[str, torch.Tensor] = {}
  for name, var in _variables(model):
    arr = np.ascontiguousarray(to_torch_layout(name, _numpy(var)))
    tensor = torch.from_numpy(arr.copy())
    if str(var.dtype) == 'bfloat16':
      tensor = tensor.to(torch.bfloat16)
    out[torch_name(name)] = tensor
    if name.endswith('.mean') and isinstance(var, nnx.BatchStat):
      parent = torch_name(name).rpartition('.')[0]
      out[f'{parent}.num_batches_tracked'] = torch.tensor(0)
  return out


def check_state_dict(
    got: Mapping[str, Any], want: Mapping[str, Any], what: str
) -> None:
  """Raises if keys or shapes of two state dicts differ (names them)."""
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if missing or unexpected:
    raise ValueError(
        f'{what}: missing keys {missing}, unexpected keys {unexpected}'
    )
  bad = [
      f'{k}: {tuple(got[k].shape)} != {tuple(want[k].shape)}'
      for k in want
      if tuple(got[k].shape) != tuple(want[k].shape)
  ]
  if bad:
    raise ValueError(f'{what}: shape mismatch: {bad}')


def flax_to_torch(
    flax_model: DRPLViT, *, device: torch.device | str | None = None
) -> DRPLViTTorch:
  """The PyTorch twin holding the Flax model's weights (in eval mode)."""
  torch_model = DRPLViTTorch(flax_model.config)
  state = state_dict_from_flax(flax_model)
  check_state_dict(
      state,
      torch_model.state_dict(),
      'flax_to_torch: converted Flax state vs DRPLViTTorch',
  )
  torch_model.load_state_dict(state, strict=True)
  if device is not None:
    torch_model.to(device)
  return torch_model.eval()


def load_torch_state_dict(
    model: DRPLViT, state_dict: Mapping[str, Any]
) -> DRPLViT:
  """Loads a DRPLViTTorch state dict (tensors or numpy arrays) into `model`.

  Every Flax variable must find its key with the right shape, and every
  key must be used (`num_batches_tracked` is ignored); otherwise a
  ValueError names the offending keys. Returns `model`, updated in place.
  """
  remaining = dict(state_dict)
  missing, bad = [], []
  for name, var in _variables(model):
    key = torch_name(name)
    if key not in remaining:
      missing.append(key)
      continue
    value = remaining.pop(key)
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu().float().numpy()
    arr = to_flax_layout(name, np.asarray(value))
    if arr.shape != tuple(var.shape):
      bad.append(f'{key}: {arr.shape} (as Flax {name}) != {var.shape}')
      continue
    var[...] = jnp.asarray(arr, dtype=var.dtype)
  left = sorted(
      k for k in remaining if k.rpartition('.')[2] not in IGNORED_TORCH_LEAVES
  )
  if missing or bad or left:
    raise ValueError(
        f'load_torch_state_dict: missing keys {missing}, shape '
        f'mismatches {bad}, unused keys {left}'
    )
  return model


def torch_to_flax(
    torch_model: DRPLViTTorch, *, rngs: nnx.Rngs | None = None
) -> DRPLViT:
  """The Flax model holding the PyTorch twin's weights.

  `rngs` only seeds the initialisation that the weights then overwrite
  (default nnx.Rngs(0)).
  """
  model = create_model(torch_model.config, rngs=rngs or nnx.Rngs(0))
  return load_torch_state_dict(model, torch_model.state_dict())
