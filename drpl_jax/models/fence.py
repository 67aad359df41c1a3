"""Materialisation fences: identities that stop XLA:CPU from over-fusing.

XLA:CPU fuses elementwise producers into every consumer and recomputes them
there. In the backward pass of a ViT this goes badly in two places
(docs/performance.md has the profile):

- the gradient of the residual stream is a chain of adds through every
  later block's LayerNorm backward; XLA:CPU folds the whole chain into each
  transposed copy that feeds a weight-gradient matmul, so the recomputed
  work grows with depth (Ti: fusions of 170 operands, 45% of the step);
- the shifted multiply-adds of the depthwise conv (LeFF) pull the BatchNorm
  and GELU around them into each of their nine taps.

`lax.optimization_barrier` would be the natural fence, but XLA:CPU removes
barriers before fusion. A `lax.cond` whose predicate depends on the data
cannot be removed or fused across, so its result is a real buffer. Both
branches are the identity, so values and gradients are unchanged up to
float rounding (XLA fuses, and so rounds, the code around them
differently). By default (`'auto'`) the fences are used only when JAX's default backend
is the CPU: the GPU and TPU fusion heuristics do not have this problem and
get the plain graph. The block-boundary fences act in the backward pass
only; the LeFF fence also in the forward pass, in evaluation too (16%
faster inference of micro/DRPL on the CPU). Programs traced inside `off()`
(the exported StableHLO and SavedModel) have none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from drpl_jax.models.config import MATERIALIZE_MODES

Array = jax.Array

_state = threading.local()


@contextlib.contextmanager
def off() -> Iterator[None]:
  """No fences in what is traced inside (exported, portable programs)."""
  previous = getattr(_state, 'off', False)
  _state.off = True
  try:
    yield
  finally:
    _state.off = previous


def enabled(mode: str) -> bool:
  """Whether fences are active for `model.materialize` = `mode`."""
  if mode not in MATERIALIZE_MODES:
    raise ValueError(
        f'model.materialize={mode!r} is not one of '
        f'{list(MATERIALIZE_MODES)}'
    )
  if getattr(_state, 'off', False):
    return False
  if mode == 'auto':
    return jax.default_backend() == 'cpu'
  return mode == 'on'


def _materialize(x: Array) -> Array:
  """x, computed into its own buffer (a cond XLA cannot fuse across)."""
  keep = jnp.isfinite(x.reshape(-1)[0])
  return jax.lax.cond(keep, lambda t: t, lambda t: t + jnp.zeros_like(t), x)


@jax.custom_vjp
def grad_fence(x: Array) -> Array:
  """Identity; its cotangent is materialised in the backward pass."""
  return x


def _grad_fence_fwd(x: Array) -> tuple[Array, None]:
  return x, None


def _grad_fence_bwd(_, g: Array) -> tuple[Array]:
  return (_materialize(g),)


grad_fence.defvjp(_grad_fence_fwd, _grad_fence_bwd)


@jax.custom_vjp
def fence(x: Array) -> Array:
  """Identity materialised in the forward pass and in its backward."""
  return _materialize(x)


def _fence_fwd(x: Array) -> tuple[Array, None]:
  return _materialize(x), None


def _fence_bwd(_, g: Array) -> tuple[Array]:
  return (_materialize(g),)


fence.defvjp(_fence_fwd, _fence_bwd)
