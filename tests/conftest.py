"""Shared fixtures. Tests that need 8 fake devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/multidevice.py),
so this process keeps the default single CPU device."""

import os
import subprocess
import sys

# Tests run two pytest-xdist workers on 2 cores: PyTorch's OpenMP pool with
# 2 threads per worker oversubscribes the CPU and spins (measured 4x slower
# than 1 thread under load), so each worker gets one OpenMP thread.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')


def config_module(name: str):
  """The config file configs/<name>.py as a module (no sys.path change)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = os.path.join(ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def demo_data_dir(tmp_path_factory):
  """The demo data set, prepared once per test session (per xdist worker)."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp('demo_data')
  data.prepare('demo', data_dir=str(path))
  return str(path)


@pytest.fixture
def compilation_cache(tmp_path):
  """Successive runs in one test load identical compiles from disk."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cache

  names = (
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
  )
  old = {name: getattr(jax.config, name) for name in names}
  cache.reset_cache()
  cache.set_cache_dir(str(tmp_path / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  cache.reset_cache()
  for name, value in old.items():
    jax.config.update(name, value)


def set_config(config, overrides):
  """Sets dotted keys ('optim.warmup_steps': 2) of a ConfigDict; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def restore_on_one_device(ckpt, step):
  """A checkpoint's state on this process's first device, whatever the
  devices or processes that wrote it."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  meta = ckpt.manager.item_metadata(step)['state']
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  is_leaf = lambda x: hasattr(x, 'shape') and not isinstance(x, dict)
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      meta,
      is_leaf=is_leaf,
  )
  return ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
  )['state']


# A plain 2-block DeiT at patch 8 (what a timm checkpoint fills entirely).
DEIT_OVERRIDES = {
    'model.depth': 2,
    'model.patch_size': 8,
    'model.rpe.kind': 'none',
    'model.conv.kind': 'mlp',
}


def tiny_demo_config(data_dir, steps=2, **overrides):
  """The demo config at test size (batch 8, a checkpoint at the last step,
  evaluation only at the end), then dotted overrides:
  tiny_demo_config(d, 2, **{'model.depth': 1})."""
  demo_config_lib = config_module('demo')
  config = demo_config_lib.get_config(f'steps={steps}')
  config.data.data_dir = data_dir
  config.batch_size = 8
  config.eval_batch_size = 64
  config.log_every_steps = 1
  config.eval_every_steps = 100
  config.checkpoint_every_steps = steps
  config.optim.warmup_steps = 1
  return set_config(config, overrides)


def randomize_torch_model(model, seed=0):
  """Draws a PyTorch model's parameters and BatchNorm statistics anew at
  O(1) activations, so GELU/LayerNorm details and layouts matter in a
  parity test; returns the model in eval mode."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'token' in name:
        t.add_(0.3 * torch.randn(t.shape, generator=g))
      elif 'pos_' in name or 'lookup_table' in name:
        t.normal_(0.0, 0.5, generator=g)
      elif name.endswith('gamma'):  # layer scale
        t.uniform_(0.5, 1.5, generator=g)
      elif t.ndim >= 2:
        t.normal_(0.0, int(np.prod(t.shape[1:])) ** -0.5, generator=g)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_(0.0, 0.2, generator=g)
      elif name.endswith('running_var'):
        b.uniform_(0.5, 1.5, generator=g)
  return model.eval()


def write_dicom(
    path, pixels, photometric='MONOCHROME2', bits_stored=None, **attrs
):
  """A minimal single-frame DICOM file of unsigned `pixels` [H, W]; extra
  dataset attributes (RescaleSlope=1, ...) as keywords."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pydicom.dataset import Dataset, FileMetaDataset  # pylint: disable=g-import-not-at-top
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # pylint: disable=g-import-not-at-top

  pixels = np.ascontiguousarray(pixels)
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.MediaStorageSOPClassUID = '1.2.840.10008.5.1.4.1.1.1.1'
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated = pixels.dtype.itemsize * 8
  ds.BitsStored = bits_stored or ds.BitsAllocated
  ds.HighBit = ds.BitsStored - 1
  ds.PixelRepresentation = 0
  for name, value in attrs.items():
    setattr(ds, name, value)
  ds.PixelData = pixels.tobytes()
  try:
    ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
  except TypeError:
    ds.save_as(path, write_like_original=False)


@pytest.fixture(scope='session')
def tiny_run(demo_data_dir, tmp_path_factory):
  """A demo run trained for 2 steps (checkpoints 1 and 2), shared by tests
  that only read a workdir (evaluate, predict, export, the docs test).
  Returns (workdir, config); copy the workdir before changing it."""
  from drpl_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  # The smallest model: the least compile time.
  config = tiny_demo_config(
      demo_data_dir, 2, checkpoint_every_steps=1, **{'model.depth': 1}
  )
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  train.train_and_evaluate(config, workdir)
  return workdir, config


def run_module(
    module: str, *args: str, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
  """`python -m MODULE ARGS` from the worktree root, output captured (the
  absl commands parse global flags, so tests run them in a subprocess)."""
  return subprocess.run(
      [sys.executable, '-m', module, *args],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
