"""The PyTorch side waits passively at OpenMP barriers unless told otherwise."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    'import drpl_jax.pytorch.torch_data, os, sys; '
    'print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)'
)


def _probe(**env_extra):
  env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
  env.update(env_extra, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-c', PROBE],
      env=env,
      check=True,
      capture_output=True,
      text=True,
  ).stdout.split()
  return out


def test_passive_by_default_before_torch_loads():
  policy, torch_loaded = _probe()
  assert policy == 'PASSIVE'
  assert torch_loaded == 'True'  # the module did import torch, after it


def test_an_explicit_policy_wins():
  assert _probe(OMP_WAIT_POLICY='ACTIVE')[0] == 'ACTIVE'
