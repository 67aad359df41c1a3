"""Starting the student of a run from pretrained weights (`config.init_from`).

Any format of `drpl_jax.pretrained` (timm / DeiT, official iRPE or CeiT,
big_vision .npz) is detected, mapped onto the model's variables and written
into the freshly initialised train state; the report says where every
parameter came from. Above `drpl_jax.pretrained`, which knows nothing of
train states, so the two do not import each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from drpl_jax import pretrained
from drpl_jax.models import DRPLViT, ModelConfig
from drpl_jax.pretrained import mapping
from drpl_jax.train.state import TrainState

Report = dict[str, Any]


def student_from_timm(
    checkpoint: str | Mapping[str, np.ndarray],
    model_config: ModelConfig | Mapping[str, Any],
    *,
    rngs: nnx.Rngs | None = None,
    strict_head: bool = False,
) -> tuple[DRPLViT, Report]:
  """A DRPL-ViT initialised from a pretrained ViT checkpoint.

  timm / DeiT weights, and also the other formats of `drpl_jax.pretrained`
  (official iRPE and CeiT checkpoints, big_vision / AugReg .npz): the
  format is detected and named in the report.

  Args:
    checkpoint: a file (.safetensors, .pth, .npz; local or gs://) or a
      state dict mapping.
    model_config: the target (a ModelConfig or the config's `model` dict).
    rngs: for the fresh parameters (default nnx.Rngs(0)).
    strict_head: error (instead of fresh heads) on a class-count mismatch.

  Returns:
    (the model, the report: 'format', 'loaded' and 'fresh' list our
    variable names, 'ignored' the source keys deliberately unused,
    'resized' what was interpolated, 'notes' the decisions taken). The
    report is also logged.
  """
  return pretrained.student_from_pretrained(
      checkpoint, model_config, rngs=rngs, strict_head=strict_head
  )


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {
      mapping.path_name(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _init_from_values(
    config: Any, params_state: Any, rest_state: Any = None
) -> tuple[dict[str, np.ndarray], Report]:
  """Reads and maps `config.init_from` for the variables of the states."""
  path = str(config.get('init_from', '') or '')
  if not path:
    raise ValueError('config.init_from is empty: nothing to start from')
  if '://' not in path and not os.path.isfile(path):
    raise FileNotFoundError(
        f'config.init_from={path!r} does not exist (expected a timm/DeiT, '
        'iRPE or CeiT .safetensors/.pth, or a big_vision .npz)'
    )
  state, source = pretrained.load_source(path)
  shapes = _tree_shapes(params_state)
  if rest_state is not None:
    shapes.update(_tree_shapes(rest_state))
  values, report = pretrained.map_pretrained(
      state, shapes, ModelConfig.from_config(config.model), source=source
  )
  mapping.log_report(report)
  return values, report


def _only(values: Mapping[str, np.ndarray], tree: Any) -> dict[str, np.ndarray]:
  names = set(_tree_shapes(tree))
  return {k: v for k, v in values.items() if k in names}


def init_from_checkpoint(
    config: Any, params_state: Any, rest_state: Any
) -> tuple[Any, Any, Report]:
  """Loads `config.init_from` (any pretrained format) into fresh states.

  For the training loop, when `config.init_from` is set and no training
  checkpoint is resumed. `params_state` / `rest_state` are the freshly
  initialised nnx.State pytrees (nnx.Param / the rest); the returned ones
  have the same tree structure, dtypes and shardings, with the loaded
  values in place. `rest_state` gets BatchNorm statistics where the source
  has them (CeiT), else it is returned as is.
  """
  values, report = _init_from_values(config, params_state, rest_state)
  return (
      mapping.update_params(params_state, _only(values, params_state)),
      mapping.update_params(rest_state, _only(values, rest_state)),
      report,
  )


def init_train_state(
    config: Any, state: TrainState
) -> tuple[TrainState, Report]:
  """`state.build`'s train state with `config.init_from` loaded.

  Loads the parameters and, when the state keeps an EMA of them, the EMA
  too (it starts equal to the parameters, in its own buffers), and the
  BatchNorm statistics a source has. The optimizer state (AdamW moments
  start at zero) is kept.
  """
  values, report = _init_from_values(config, state.params, state.rest)
  params = _only(values, state.params)
  rest = state.rest
  if rest is not None:
    rest = mapping.update_params(rest, _only(values, rest))
  ema = state.ema
  if ema is not None:
    ema = mapping.update_params(ema, params)
  return (
      state.replace(
          params=mapping.update_params(state.params, params), rest=rest, ema=ema
      ),
      report,
  )
