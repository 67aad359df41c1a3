"""Sharded training on 8 fake CPU devices equals single-device training."""

import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from drpl_jax.parallel import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


def test_param_spec_rules():
  # Small tensors and a trivial fsdp axis stay replicated.
  assert sharding.param_spec((64, 64), fsdp_size=4) == P()
  assert sharding.param_spec((384, 1536), fsdp_size=1) == P()
  # Big ones split their largest divisible dimension.
  assert sharding.param_spec((384, 1536), fsdp_size=4) == P(None, 'fsdp')
  assert sharding.param_spec((1536, 384), fsdp_size=4) == P('fsdp', None)
  # No divisible dimension: replicated rather than an invalid sharding.
  assert sharding.param_spec((1001, 1003), fsdp_size=4) == P()


def test_mesh_shape_errors():
  with pytest.raises(ValueError, match='needs 6 devices'):
    sharding.create_mesh((2, 3))
  with pytest.raises(ValueError, match='2 entries'):
    sharding.create_mesh((1, 1, 1))


@pytest.mark.slow
def test_meshes_give_same_parameters(tmp_path):
  """3 updates on meshes 1, 8x1, 4x2, 2x4 (46-70 s on 2 shared cores)."""
  out = str(tmp_path / 'params.npz')
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
      JAX_PLATFORMS='cpu',
  )
  subprocess.run(
      [sys.executable, os.path.join(HERE, 'mesh_equivalence.py'), out],
      check=True,
      env=env,
      timeout=900,
  )
  results = np.load(out)
  names = sorted(results.files)
  compared = ('params/', 'ema/', 'batch_stats/')
  ref = {
      n.split('/', 1)[1]: results[n]
      for n in names
      if n.startswith('1/') and n.split('/', 1)[1].startswith(compared)
  }
  assert ref
  # The 3 updates moved the parameters well beyond the tolerance.
  moved = [
      np.max(np.abs(results[f'1/params/{i}'] - results[n]))
      for i, n in enumerate(
          sorted(
              (n for n in names if n.startswith('1/initial/')),
              key=lambda n: int(n.rsplit('/', 1)[1]),
          )
      )
  ]
  assert np.median(moved) > 1e-3, moved
  for mesh in ('8x1', '4x2', '2x4'):
    for key, value in ref.items():
      np.testing.assert_allclose(
          results[f'{mesh}/{key}'],
          value,
          rtol=2e-5,
          atol=2e-6,
          err_msg=f'{mesh} {key}',
      )
  assert int(results['1/fsdp_sharded/0']) == 0
  assert int(results['8x1/fsdp_sharded/0']) == 0
  assert int(results['4x2/fsdp_sharded/0']) > 0
  assert int(results['2x4/fsdp_sharded/0']) > 0
