"""How a Flax DRPL-ViT variable is named and laid out in a PyTorch state dict.

Shared by the timm export (`to_timm.py`) and the PyTorch twin's converter
(`drpl_jax.pytorch.twin.convert`); numpy only, no torch. The Flax path
`blocks.0.attn.q.kernel` is the PyTorch key `blocks.0.attn.q.weight`. Leaf
renames: `kernel` and `scale` -> `weight`, BatchNorm `mean` / `var` ->
`running_mean` / `running_var`. Layouts: Linear kernels [in, out] <->
weight [out, in]; conv kernels [kh, kw, in/groups, out] <->
[out, in/groups, kh, kw]; everything else is unchanged.
"""

from __future__ import annotations

import numpy as np

_LEAF_RENAMES = {
    'kernel': 'weight',
    'scale': 'weight',
    'mean': 'running_mean',
    'var': 'running_var',
}


def torch_name(flax_name: str) -> str:
  """The PyTorch state-dict key of a flattened Flax variable path."""
  parent, _, leaf = flax_name.rpartition('.')
  leaf = _LEAF_RENAMES.get(leaf, leaf)
  return f'{parent}.{leaf}' if parent else leaf


def to_torch_layout(flax_name: str, value: np.ndarray) -> np.ndarray:
  """Flax array -> the PyTorch layout of the same variable."""
  if flax_name.endswith('.kernel'):
    if value.ndim == 2:
      return value.T  # [in, out] -> [out, in]
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)  # [kh, kw, i, o] -> [o, i, kh, kw]
    raise ValueError(f'{flax_name}: unexpected kernel rank {value.ndim}')
  return value


def to_flax_layout(flax_name: str, value: np.ndarray) -> np.ndarray:
  """PyTorch array -> the Flax layout (inverse of `to_torch_layout`)."""
  if flax_name.endswith('.kernel'):
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)  # [o, i, kh, kw] -> [kh, kw, i, o]
    raise ValueError(f'{flax_name}: unexpected kernel rank {value.ndim}')
  return value
