"""Device mesh and shardings from abstract shapes.

The mesh has axes ('data', 'fsdp'): the batch is split over both, parameters
are replicated by default and split over 'fsdp' when they are larger than a
threshold (FSDP). Rules key on parameter names and shapes only, so the same
rules shard the student, its optimizer state and an online teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
# Tensors with fewer elements than this stay replicated under FSDP (a 384x384
# matrix is 147k; DeiT-S MLP matrices are 590k).
DEFAULT_MIN_FSDP_SIZE = 2**18
BATCH_AXES = ('data', 'fsdp')


def create_mesh(
    mesh_shape: Sequence[int] = (-1, 1),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds a ('data', 'fsdp') mesh; one entry of `mesh_shape` may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != 2:
    raise ValueError(
        f'mesh_shape must have 2 entries (data, fsdp), got '
        f'{tuple(mesh_shape)}'
    )
  if shape.count(-1) > 1:
    raise ValueError(f'at most one -1 in mesh_shape, got {tuple(shape)}')
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % known:
      raise ValueError(
          f'mesh_shape {tuple(mesh_shape)} does not divide '
          f'{len(devices)} devices'
      )
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
        f'mesh_shape {tuple(shape)} needs {int(np.prod(shape))} '
        f'devices, {len(devices)} available'
    )
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)  # e.g. odd CPU layouts
  return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(
    shape: Sequence[int], fsdp_size: int, min_size: int | None = None
) -> P:
  """FSDP rule: split the largest divisible dim of big tensors over 'fsdp'."""
  min_size = DEFAULT_MIN_FSDP_SIZE if min_size is None else min_size
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(
    abstract_state: Any, mesh: Mesh, min_size: int | None = None
) -> Any:
  """Shardings for a pytree of ShapeDtypeStructs (params, opt state, ...)."""
  fsdp_size = mesh.shape['fsdp']

  def one(x):
    shape = getattr(x, 'shape', ())
    return NamedSharding(mesh, param_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, abstract_state)
