"""Tests of drpl_jax.pytorch.torch_io: safe checkpoint loading."""

import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch

from drpl_jax.pytorch import torch_io


class _WritesFileWhenUnpickled:
  """A pickle payload that would create a file if anything unpickled it."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_safetensors_roundtrip_keeps_values_and_dtypes(tmp_path):
  state = {
      'conv.weight': np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
      'bn.num_batches_tracked': np.array(7, dtype=np.int64),
      'half': np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16),
  }
  path = tmp_path / 'sub' / 'w.safetensors'
  torch_io.save_safetensors(state, path)
  loaded = torch_io.load_state_dict(path)
  assert sorted(loaded) == sorted(state)
  for k, v in state.items():
    assert loaded[k].dtype == v.dtype, k
    np.testing.assert_array_equal(loaded[k], v)


def test_safetensors_strips_module_prefix(tmp_path):
  path = tmp_path / 'ddp.safetensors'
  torch_io.save_safetensors(
      {'module.a': np.ones(2, np.float32), 'module.b': np.zeros(1)}, path
  )
  assert sorted(torch_io.load_state_dict(path)) == ['a', 'b']


def test_prefix_kept_unless_on_every_key(tmp_path):
  path = tmp_path / 'mixed.safetensors'
  torch_io.save_safetensors(
      {'module.a': np.ones(2, np.float32), 'b': np.zeros(1)}, path
  )
  assert sorted(torch_io.load_state_dict(path)) == ['b', 'module.a']


def test_unknown_extension_is_refused_naming_the_file(tmp_path):
  path = tmp_path / 'weights.npz'
  np.savez(path, a=np.ones(2))
  with pytest.raises(ValueError, match='weights.npz.*unknown checkpoint'):
    torch_io.load_state_dict(path)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothere.safetensors'):
    torch_io.load_state_dict(tmp_path / 'nothere.safetensors')


def test_corrupt_safetensors_is_named(tmp_path):
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json')
  with pytest.raises(ValueError, match='bad.safetensors'):
    torch_io.load_state_dict(path)


def test_save_safetensors_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match='out.pth'):
    torch_io.save_safetensors({'a': np.ones(1)}, tmp_path / 'out.pth')
  with pytest.raises(TypeError, match='3'):
    torch_io.save_safetensors({3: np.ones(1)}, tmp_path / 'o.safetensors')
  with pytest.raises(TypeError, match="'a'"):
    torch_io.save_safetensors({'a': 'text'}, tmp_path / 'o.safetensors')


@pytest.mark.torch
def test_pth_state_dict_loads_with_weights_only(tmp_path):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  path = tmp_path / 'model.pth'
  torch.save(model.state_dict(), path)
  loaded = torch_io.load_state_dict(path)
  expected = model.state_dict()
  assert sorted(loaded) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k], v.numpy())
  assert loaded['1.num_batches_tracked'].dtype == np.int64


@pytest.mark.torch
def test_pth_bfloat16_becomes_ml_dtypes(tmp_path):
  t = torch.linspace(-2, 2, 7).to(torch.bfloat16)
  path = tmp_path / 'half.pt'
  torch.save({'w': t}, path)
  loaded = torch_io.load_state_dict(path)['w']
  assert loaded.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded.astype(np.float32), t.float().numpy())


@pytest.mark.torch
def test_training_checkpoint_wrappers_and_ddp_prefix(tmp_path):
  a, b = torch.ones(2), torch.zeros(3)
  path = tmp_path / 'ckpt.pth'
  torch.save(
      {
          'model': {'module.a': a},
          'model_ema': {'module.b': b},
          'epoch': 3,
          'lr': 0.1,
      },
      path,
  )
  assert sorted(torch_io.load_state_dict(path)) == ['a']
  assert sorted(torch_io.load_state_dict(path, key='model_ema')) == ['b']
  with pytest.raises(ValueError, match="'optimizer'.*epoch"):
    torch_io.load_state_dict(path, key='optimizer')
  path2 = tmp_path / 'timm.bin'
  torch.save({'state_dict': {'w': a}, 'model': {'x': b}}, path2)
  assert sorted(torch_io.load_state_dict(path2)) == ['w']


@pytest.mark.torch
def test_pickled_module_is_refused_with_export_hint(tmp_path):
  path = tmp_path / 'full_model.pth'
  torch.save(torch.nn.Linear(2, 3), path)
  with pytest.raises(ValueError) as err:
    torch_io.load_state_dict(path)
  msg = str(err.value)
  assert 'full_model.pth' in msg
  assert 'model.state_dict()' in msg and 'safetensors.torch.save_file' in msg


@pytest.mark.torch
def test_non_tensor_entry_is_refused_naming_it(tmp_path):
  path = tmp_path / 'mixed.pth'
  torch.save({'w': torch.ones(2), 'step': 3}, path)
  with pytest.raises(ValueError, match="'step' is a int"):
    torch_io.load_state_dict(path)
  path2 = tmp_path / 'list.pth'
  torch.save([torch.ones(2)], path2)
  with pytest.raises(ValueError, match='list, not a state dict'):
    torch_io.load_state_dict(path2)


@pytest.mark.torch
@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
def test_malicious_pickle_is_never_executed(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  torch.save(
      {'w': torch.ones(1), 'x': _WritesFileWhenUnpickled(str(marker))}, path
  )
  with pytest.raises(ValueError, match='evil.pth'):
    torch_io.load_state_dict(path)
  assert not marker.exists()
  # A raw (non-torch) pickle with the same payload is refused as well.
  raw = tmp_path / 'raw.pt'
  raw.write_bytes(pickle.dumps(_WritesFileWhenUnpickled(str(marker))))
  with pytest.raises(ValueError, match='raw.pt'):
    torch_io.load_state_dict(raw)
  assert not marker.exists()


@pytest.mark.torch
def test_old_torch_is_refused_naming_the_cves(tmp_path, monkeypatch):
  path = tmp_path / 'sd.pth'
  torch.save({'w': torch.ones(1)}, path)
  monkeypatch.setattr(torch, '__version__', '2.5.1+cu121')
  with pytest.raises(RuntimeError) as err:
    torch_io.load_state_dict(path)
  assert 'CVE-2025-32434' in str(err.value)
  assert 'CVE-2026-24747' in str(err.value)
  # Safetensors needs no torch and is unaffected.
  st = tmp_path / 'sd.safetensors'
  torch_io.save_safetensors({'w': np.ones(1, np.float32)}, st)
  assert list(torch_io.load_state_dict(st)) == ['w']
  assert os.path.exists(path)
