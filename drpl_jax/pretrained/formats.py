"""Reading a pretrained checkpoint and telling which format it is.

Files are local paths or any path etils.epath opens (e.g. `gs://...`);
nothing is fetched from the network by name. `.npz` (big_vision /
vision_transformer) is read with numpy (no pickles); `.safetensors` and
`.pth` go through `drpl_jax.pytorch.torch_io` (a remote file is copied to a
local temporary file first).
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from drpl_jax.pytorch import torch_io

# Format name -> what it is, as reports and errors say it.
FORMATS = {
    'timm': 'timm / DeiT ViT state dict',
    'irpe': 'official iRPE DeiT (microsoft/Cream iRPE/DeiT-with-iRPE)',
    'ceit': 'official CeiT (coeusguo/ceit)',
    'big_vision': 'big_vision / vision_transformer (AugReg) .npz',
}
NPZ_EXTS = ('.npz',)
_IRPE_KEY = re.compile(r'^blocks\.\d+\.attn\.rpe_[qkv]\.lookup_table_')


def _is_remote(path: str) -> bool:
  return '://' in path


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """An .npz file's arrays (no pickled objects), local or remote."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  try:
    with p.open('rb') as f:
      with np.load(f, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(
        f'{path}: not a readable .npz checkpoint (truncated or '
        f'corrupt?): {e}'
    ) from e


def _read_remote_torch(path: str) -> dict[str, np.ndarray]:
  """A remote .safetensors/.pth file, via a local temporary copy."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  ext = os.path.splitext(path)[1].lower()
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'checkpoint' + ext)
    with open(local, 'wb') as f:
      f.write(p.read_bytes())
    try:
      return torch_io.load_state_dict(local)
    except ValueError as e:
      raise ValueError(str(e).replace(local, path)) from e


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """A checkpoint file as a flat {key: numpy array} dict."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext in NPZ_EXTS:
    return _read_npz(path)
  if ext not in torch_io.SAFETENSORS_EXTS + torch_io.TORCH_EXTS:
    raise ValueError(
        f'{path}: unknown checkpoint extension {ext!r}; expected one of '
        f'{NPZ_EXTS + torch_io.SAFETENSORS_EXTS + torch_io.TORCH_EXTS}'
    )
  if _is_remote(path):
    return _read_remote_torch(path)
  return torch_io.load_state_dict(path)


def detect_format(state: Mapping[str, Any], source: str = 'state dict') -> str:
  """'timm', 'irpe', 'ceit' or 'big_vision', read from the keys."""
  keys = list(state)
  if any(k.endswith('embedding/kernel') for k in keys):
    return 'big_vision'
  if 'i2t.proj.weight' in state or any('.leff.' in k for k in keys):
    return 'ceit'
  if any(_IRPE_KEY.match(k) for k in keys):
    return 'irpe'
  if 'patch_embed.proj.weight' in state and 'cls_token' in state:
    return 'timm'
  raise ValueError(
      f'{source}: not a checkpoint of a known format ('
      + '; '.join(FORMATS.values())
      + f'); its first keys are '
      f'{sorted(keys)[:12]}'
  )
