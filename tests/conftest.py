"""Shared fixtures. Tests that need 8 fake devices run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/multidevice.py),
so this process keeps the default single CPU device."""

import os
import sys

# Tests run two pytest-xdist workers on 2 cores: PyTorch's OpenMP pool with
# 2 threads per worker oversubscribes the CPU and spins (measured 4x slower
# than 1 thread under load), so each worker gets one OpenMP thread.
os.environ.setdefault('OMP_NUM_THREADS', '1')

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
sys.path.insert(0, os.path.join(ROOT, 'configs'))


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
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
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
      meta, is_leaf=is_leaf)
  return ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))['state']


@pytest.fixture(scope='session')
def tiny_run(demo_data_dir, tmp_path_factory):
  """A demo run trained for 2 steps (checkpoints 1 and 2), shared by tests
  that only read a workdir (evaluate, predict, export, the docs test).
  Returns (workdir, config); copy the workdir before changing it."""
  sys.path.insert(0, os.path.join(ROOT, 'configs'))
  import demo as demo_config_lib  # pylint: disable=g-import-not-at-top
  from drpl_jax import train  # pylint: disable=g-import-not-at-top
  config = demo_config_lib.get_config('steps=2')
  config.data.data_dir = demo_data_dir
  config.batch_size = 8
  config.eval_batch_size = 64
  config.log_every_steps = 1
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 1
  config.optim.warmup_steps = 1
  config.model.depth = 1  # the smallest model: the least compile time
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  train.train_and_evaluate(config, workdir)
  return workdir, config
