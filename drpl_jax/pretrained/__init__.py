"""Starting a DRPL-ViT from public pretrained weights, in any of four formats.

  timm        timm / DeiT ViT state dicts (`drpl_jax.pretrained.mapping`).
  irpe        official iRPE DeiT checkpoints (`irpe.py`).
  ceit        official CeiT checkpoints (`ceit.py`).
  big_vision  big_vision / vision_transformer AugReg `.npz` (`big_vision.py`).

The format is detected from the keys (`formats.detect_format`) and named in
the report. Each format module turns its checkpoint into a `Plan` on top of
the timm mapping, so every importer shares the same guarantees: every
source key is loaded, resized or ignored with a reason; every tensor is
shape-checked; errors name the file's own keys. `to_timm.py` goes the other
way (a trained deit/vit preset as a timm state dict). Files are local or
any path etils.epath reads (`gs://`); nothing is fetched by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from drpl_jax.models import DRPLViT, ModelConfig, create_model
from drpl_jax.pretrained import big_vision, ceit, irpe
from drpl_jax.pretrained import mapping
from drpl_jax.pretrained.formats import FORMATS, detect_format, read_checkpoint

__all__ = [
    'FORMATS',
    'detect_format',
    'read_checkpoint',
    'load_source',
    'prepare',
    'map_pretrained',
    'variable_shapes',
    'student_from_pretrained',
]

Report = dict[str, Any]


def load_source(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
) -> tuple[Mapping[str, Any], str]:
  """A path (local or gs://) or a mapping -> (flat state, its description)."""
  if isinstance(checkpoint, Mapping):
    return mapping.load_timm_state(checkpoint)
  path = os.fspath(checkpoint)
  return read_checkpoint(path), path


def prepare(
    state: Mapping[str, Any], cfg: ModelConfig, source: str
) -> tuple[dict[str, Any], mapping.Plan]:
  """Detects the format; returns the state to map and the format's plan."""
  fmt = detect_format(state, source)
  if fmt == 'big_vision':
    state, plan = big_vision.convert(state, cfg, source)
  elif fmt == 'ceit':
    plan = ceit.plan(state, cfg, source)
  elif fmt == 'irpe':
    plan = irpe.plan(state, cfg, source)
  else:
    plan = mapping.Plan()
  return {k: v for k, v in state.items() if k not in plan.ignored}, plan


def map_pretrained(
    state: Mapping[str, Any],
    target_shapes: Mapping[str, tuple[int, ...]],
    model_config: ModelConfig | Mapping[str, Any],
    *,
    strict_head: bool = False,
    source: str = 'state dict',
) -> tuple[dict[str, np.ndarray], Report]:
  """`mapping.map_timm_state` for a checkpoint of any known format.

  The report gains 'format' (a key of FORMATS) and 'format_name'.
  """
  cfg = ModelConfig.from_config(model_config)
  state, plan = prepare(state, cfg, source)
  values, report = mapping.map_timm_state(
      state,
      target_shapes,
      cfg,
      strict_head=strict_head,
      source=source,
      plan=plan,
  )
  report['format_name'] = FORMATS[plan.format]
  return values, report


def variable_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of the parameters and the BatchNorm statistics."""
  out = {}
  for kind in (nnx.Param, nnx.BatchStat):
    for path, var in nnx.to_flat_state(nnx.state(model, kind)):
      out['.'.join(map(str, path))] = tuple(var.shape)
  return out


def _names(state: Any) -> set[str]:
  return {'.'.join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def student_from_pretrained(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    model_config: ModelConfig | Mapping[str, Any],
    *,
    rngs: nnx.Rngs | None = None,
    strict_head: bool = False,
) -> tuple[DRPLViT, Report]:
  """A DRPL-ViT initialised from a checkpoint of any known format.

  Returns the model and the report ('format', 'loaded', 'fresh', 'ignored'
  with 'ignored_reasons', 'resized', 'notes'); the report is also logged.
  """
  cfg = ModelConfig.from_config(model_config)
  state, source = load_source(checkpoint)
  model = create_model(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
  values, report = map_pretrained(
      state, variable_shapes(model), cfg, strict_head=strict_head, source=source
  )
  for kind in (nnx.Param, nnx.BatchStat):
    part = nnx.state(model, kind)
    names = _names(part)
    nnx.update(
        model,
        mapping.update_params(
            part, {k: v for k, v in values.items() if k in names}
        ),
    )
  mapping.log_report(report)
  return model, report
