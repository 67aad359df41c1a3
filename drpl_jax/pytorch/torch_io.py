"""Safe loading of PyTorch checkpoints as flat numpy state dicts.

`.safetensors` is preferred: it holds only tensors and is read with
`safetensors.numpy`, without torch. `.pth`/`.pt`/`.bin` pickles are read only
through `torch.load(weights_only=True)` and only with torch >= 2.10, because
CVE-2025-32434 and CVE-2026-24747 let crafted files execute code through
`weights_only=True` on older releases. Nothing else is ever unpickled: a
pickled `nn.Module` or any other Python object is refused with instructions
to export a plain state dict.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

SAFETENSORS_EXTS = ('.safetensors',)
TORCH_EXTS = ('.pth', '.pt', '.bin')
MIN_TORCH = (2, 10)
# Checked in this order; the first key holding a mapping is unwrapped.
WRAPPER_KEYS = ('state_dict', 'model', 'model_ema')

_EXPORT_HINT = (
    'Export a plain state dict of tensors instead, in the environment that '
    'trained the model: torch.save(model.state_dict(), "teacher.pth") or, '
    'better, safetensors.torch.save_file(model.state_dict(), '
    '"teacher.safetensors").'
)


def load_state_dict(
    path: str | os.PathLike[str], *, key: str | None = None
) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into a flat {name: numpy array} state dict.

  Args:
    path: a `.safetensors` file (read without torch) or a `.pth`/`.pt`/`.bin`
      file holding a state dict (needs torch >= 2.10; read with
      `weights_only=True`).
    key: for pickled checkpoints that wrap the state dict (e.g.
      {'model': ..., 'model_ema': ..., 'epoch': 3}), the entry to use;
      by default the first of 'state_dict', 'model', 'model_ema' present.

  A 'module.' prefix on every key (DataParallel/DDP) is removed. bfloat16
  tensors come back as `ml_dtypes.bfloat16` arrays.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in SAFETENSORS_EXTS + TORCH_EXTS:
    raise ValueError(
        f'{path}: unknown checkpoint extension {ext!r}; expected one of '
        f'{SAFETENSORS_EXTS + TORCH_EXTS}'
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if ext in SAFETENSORS_EXTS:
    state = _load_safetensors(path)
  else:
    state = _load_torch_pickle(path, key)
  return _strip_prefix(state, 'module.')


def save_safetensors(
    state: Mapping[str, np.ndarray], path: str | os.PathLike[str]
) -> None:
  """Writes a flat {name: array} state dict to a `.safetensors` file."""
  path = os.fspath(path)
  if not path.lower().endswith('.safetensors'):
    raise ValueError(f'{path}: output file must end in .safetensors')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  arrays = {}
  for name, value in state.items():
    if not isinstance(name, str):
      raise TypeError(f'state dict key {name!r} is not a string')
    if not isinstance(value, np.ndarray) and not hasattr(value, '__array__'):
      raise TypeError(
          f'state dict entry {name!r} is a {type(value)}, not an array'
      )
    arrays[name] = np.ascontiguousarray(np.asarray(value))
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  save_file(arrays, path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error types.
    raise ValueError(f'{path}: not a readable safetensors file: {e}') from e


def _torch_version(version: str) -> tuple[int, int]:
  m = re.match(r'(\d+)\.(\d+)', version)
  if not m:
    raise RuntimeError(f'cannot parse the torch version {version!r}')
  return int(m.group(1)), int(m.group(2))


def _import_torch(path: str) -> Any:
  """Imports torch, refusing releases whose weights_only loader is unsafe."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'{path}: reading a pickled checkpoint needs PyTorch >= 2.10 '
        '(pip install "drpl-jax[torch]"); or convert it to .safetensors '
        'where torch is installed (python -m drpl_jax.convert teacher ... '
        '--out teacher.safetensors), which loads without torch.'
    ) from e
  if _torch_version(torch.__version__) < MIN_TORCH:
    raise RuntimeError(
        f'{path}: refusing to read a pickled checkpoint with torch '
        f'{torch.__version__}: torch.load(weights_only=True) can execute '
        'code from crafted files before torch 2.10 (CVE-2025-32434, '
        'CVE-2026-24747). Upgrade torch to >= 2.10 or use a .safetensors '
        'file.'
    )
  return torch


def _load_torch_pickle(path: str, key: str | None) -> dict[str, np.ndarray]:
  torch = _import_torch(path)
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # UnpicklingError, RuntimeError, zip errors.
    raise ValueError(
        f'{path}: refused or unreadable with torch.load(weights_only=True). '
        'It probably holds a pickled nn.Module or other Python objects, '
        f'which are never unpickled here. {_EXPORT_HINT} (torch said: '
        f'{_torch_reason(e)})'
    ) from e
  obj = _unwrap(obj, path, key)
  state = {}
  for name, value in obj.items():
    if not isinstance(name, str) or not isinstance(value, torch.Tensor):
      raise ValueError(
          f'{path}: entry {name!r} is a {type(value).__name__}, not a '
          f'tensor; a state dict is a flat mapping str -> tensor. '
          f'{_EXPORT_HINT}'
      )
    state[name] = _to_numpy(torch, value, path, name)
  return state


def _torch_reason(error: Exception) -> str:
  """The informative line of a torch.load error (e.g. the refused class)."""
  lines = [
      re.sub(r'\x1b\[[0-9;]*m', '', t).strip() for t in str(error).splitlines()
  ]
  lines = [t for t in lines if t]
  for line in lines:
    if 'Unsupported global' in line or 'Unsupported operand' in line:
      return line
  return lines[0] if lines else type(error).__name__


def _unwrap(obj: Any, path: str, key: str | None) -> Mapping[str, Any]:
  """Finds the state dict inside common training-checkpoint wrappers."""
  if not isinstance(obj, Mapping):
    raise ValueError(
        f'{path}: holds a {type(obj).__name__}, not a state dict. '
        f'{_EXPORT_HINT}'
    )
  if key is not None:
    if key not in obj or not isinstance(obj[key], Mapping):
      raise ValueError(
          f'{path}: no state dict under key {key!r}; top-level keys: '
          f'{sorted(map(str, obj))[:20]}'
      )
    return obj[key]
  for wrapper in WRAPPER_KEYS:
    if isinstance(obj.get(wrapper), Mapping):
      return obj[wrapper]
  return obj


def _to_numpy(torch: Any, tensor: Any, path: str, name: str) -> np.ndarray:
  t = tensor.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  try:
    return t.numpy()
  except (TypeError, RuntimeError) as e:
    raise ValueError(
        f'{path}: tensor {name!r} of dtype {t.dtype} has no numpy '
        f'equivalent: {e}'
    ) from e


def _strip_prefix(
    state: dict[str, np.ndarray], prefix: str
) -> dict[str, np.ndarray]:
  """Removes `prefix` when every key has it (DataParallel checkpoints)."""
  if state and all(k.startswith(prefix) for k in state):
    return {k[len(prefix) :]: v for k, v in state.items()}
  return state
