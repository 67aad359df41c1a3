"""torchvision teacher models: building them and loading checked state dicts.

Shared by `train_teacher` (fine-tuning) and `soft_labels` (labelling with a
fine-tuned teacher); below both, so neither imports the other. Imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision

from drpl_jax import teacher as flax_teacher

_IGNORED_SUFFIX = 'num_batches_tracked'


def known_archs(any_torchvision: bool = False) -> list[str]:
  """Architectures `build_model` accepts.

  By default the ones `drpl_jax.teacher` converts to Flax (ResNet, DenseNet,
  RegNetY); with `any_torchvision` every torchvision classification model.
  """
  if any_torchvision:
    return sorted(torchvision.models.list_models(module=torchvision.models))
  return sorted(flax_teacher.TEACHER_ARCHS)


def build_model(
    arch: str, num_classes: int, *, any_torchvision: bool = False
) -> torch.nn.Module:
  """A randomly initialised torchvision `arch` with `num_classes` outputs."""
  known = known_archs(any_torchvision)
  if arch not in known:
    raise ValueError(f'unknown teacher arch {arch!r}; known: {known}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  return torchvision.models.get_model(
      arch, weights=None, num_classes=num_classes
  )


def head_prefix(model: torch.nn.Module) -> str:
  """The module name of the classifier (the last Linear), e.g. 'fc'."""
  names = [
      n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
  ]
  if not names:
    raise ValueError(f'{type(model).__name__} has no Linear classifier')
  return names[-1]


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The state dict as CPU numpy copies, minus `num_batches_tracked`."""
  return {
      k: v.detach().cpu().numpy().copy()
      for k, v in model.state_dict().items()
      if not k.endswith(_IGNORED_SUFFIX)
  }


def _listing(items: Sequence[Any], limit: int = 10) -> str:
  more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
  return f'{list(items[:limit])}{more}'


def _state_problems(
    state: Mapping[str, np.ndarray], target: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
  """(missing/unexpected key messages, keys whose shapes differ)."""
  missing = [
      k for k in target if k not in state and not k.endswith(_IGNORED_SUFFIX)
  ]
  unexpected = [
      k for k in state if k not in target and not k.endswith(_IGNORED_SUFFIX)
  ]
  mismatched = [
      k
      for k in target
      if k in state
      and not k.endswith(_IGNORED_SUFFIX)
      and tuple(np.shape(state[k])) != tuple(target[k].shape)
  ]
  problems = []
  if missing:
    problems.append(f'missing keys {_listing(missing)}')
  if unexpected:
    problems.append(f'unexpected keys {_listing(unexpected)}')
  return problems, mismatched


def load_state(
    model: torch.nn.Module,
    state: Mapping[str, np.ndarray],
    *,
    arch: str,
    path: str = '<state dict>',
    reinit_head: bool = False,
) -> dict[str, Any]:
  """Copies a numpy state dict into `model`, checking every key and shape.

  Args:
    model: the torchvision model (its classifier already sized).
    state: {torch key: array}, e.g. from `torch_io.load_state_dict`. Legacy
      DenseNet names are renamed as torchvision does; BatchNorm
      `num_batches_tracked` counters are optional (as in the converter).
    arch: the torchvision name of `model` (for the renaming and messages).
    path: where `state` came from, for messages.
    reinit_head: when only the classifier's shapes differ, keep the model's
      fresh classifier instead of failing (fine-tuning to new classes).

  Returns:
    {'head_reinitialised': bool, 'checkpoint_num_classes': int (the file's
     classifier size), 'renamed_keys': int}.

  Raises:
    ValueError: naming missing keys, unexpected keys and shape mismatches.
  """
  renamed = {}
  if arch in flax_teacher.TEACHER_ARCHS:
    state, renamed = flax_teacher.canonical_state_dict(state, arch)
  target = model.state_dict()
  head = head_prefix(model) + '.'
  problems, mismatched = _state_problems(state, target)
  reinit = (
      bool(mismatched)
      and reinit_head
      and all(k.startswith(head) for k in mismatched)
  )
  if mismatched and not reinit:
    problems.append(
        'shape mismatches '
        + _listing(
            [
                f'{k}: file {tuple(np.shape(state[k]))} vs model '
                f'{tuple(target[k].shape)}'
                for k in mismatched
            ]
        )
    )
  if problems:
    raise ValueError(
        f'{path}: does not fit torchvision {arch} with '
        f'{target[head + "weight"].shape[0]} classes: ' + '; '.join(problems)
    )
  with torch.no_grad():
    for key, tensor in target.items():
      if key not in state or (reinit and key.startswith(head)):
        continue
      value = np.asarray(state[key])
      if key.endswith(_IGNORED_SUFFIX):  # A counter; any shape of size 1.
        if value.size != 1:
          continue
        value = value.reshape(tuple(tensor.shape))
      if value.dtype.name == 'bfloat16':  # ml_dtypes, from torch_io.
        value = value.astype(np.float32)
      tensor.copy_(torch.from_numpy(np.array(value)).to(tensor.dtype))
  return {
      'head_reinitialised': reinit,
      'checkpoint_num_classes': int(np.shape(state[head + 'weight'])[0]),
      'renamed_keys': len(renamed),
  }
