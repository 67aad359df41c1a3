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
