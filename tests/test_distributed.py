"""Tests of drpl_jax.parallel.distributed: when to initialise, and a real 2-process
run on this machine (localhost coordinator, 2 fake CPU devices each)."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from drpl_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Variables that could make the test process itself look multi-process.
_CLUSTER_VARS = (
    'SLURM_',
    'TPU_',
    'MEGASCALE_',
    'CLOUD_TPU_',
    'DRPL_',
    'JAX_COORDINATOR',
    'JAX_LOCAL_DEVICE_IDS',
    'OMPI_',
)

SLURM_2_NODES = {
    'SLURM_JOB_ID': '4242',
    'SLURM_NTASKS': '2',
    'SLURM_STEP_NUM_TASKS': '2',
    'SLURM_STEP_NUM_NODES': '2',
    'SLURM_STEP_NODELIST': 'gpu[017-018]',
    'SLURM_PROCID': '1',
    'SLURM_LOCALID': '0',
}


def clean_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
  env.update(extra)
  return env


@pytest.mark.parametrize(
    'env',
    [
        {},
        {'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'},
        {'TPU_WORKER_HOSTNAMES': 'host0', 'CLOUD_TPU_TASK_ID': '0'},
        {'MEGASCALE_NUM_SLICES': '1'},
        {'DRPL_DISTRIBUTED': 'auto'},
    ],
)
def test_single_process_environments_do_not_initialise(env):
  assert distributed.plan_initialization(env=env) is None


def test_initialize_single_process_is_a_noop(monkeypatch):
  for key in list(os.environ):
    if key.startswith(_CLUSTER_VARS):
      monkeypatch.delenv(key)

  def fail(*args, **kwargs):
    raise AssertionError(f'initialize called with {args} {kwargs}')

  monkeypatch.setattr(jax.distributed, 'initialize', fail)
  info = distributed.initialize()
  assert info['initialized'] is False
  assert info['source'] == 'single-process'
  assert info['process_count'] == 1 and info['process_index'] == 0
  assert info['device_count'] == jax.device_count()
  assert not jax.distributed.is_initialized()


def test_drpl_env_launch():
  plan = distributed.plan_initialization(
      env={
          'DRPL_COORDINATOR': '10.0.0.1:1234',
          'DRPL_NUM_PROCESSES': '4',
          'DRPL_PROCESS_ID': '3',
          'DRPL_LOCAL_DEVICE_IDS': '0, 1',
      }
  )
  assert plan == distributed.InitPlan(
      'env',
      {
          'coordinator_address': '10.0.0.1:1234',
          'num_processes': 4,
          'process_id': 3,
          'local_device_ids': [0, 1],
      },
  )


def test_incomplete_drpl_env_names_the_missing_variables():
  with pytest.raises(RuntimeError, match='DRPL_NUM_PROCESSES.*DRPL_PROCESS_ID'):
    distributed.plan_initialization(env={'DRPL_COORDINATOR': 'h:1'})


@pytest.mark.parametrize(
    'env,match',
    [
        (
            {
                'DRPL_COORDINATOR': 'h:1',
                'DRPL_NUM_PROCESSES': 'two',
                'DRPL_PROCESS_ID': '0',
            },
            "DRPL_NUM_PROCESSES='two'",
        ),
        (
            {
                'DRPL_COORDINATOR': 'h:1',
                'DRPL_NUM_PROCESSES': '2',
                'DRPL_PROCESS_ID': '2',
            },
            'DRPL_PROCESS_ID=2 must be <',
        ),
        (
            {
                'DRPL_COORDINATOR': 'localhost',
                'DRPL_NUM_PROCESSES': '2',
                'DRPL_PROCESS_ID': '0',
            },
            "DRPL_COORDINATOR='localhost' must be host:port",
        ),
        ({'DRPL_DISTRIBUTED': 'maybe'}, "DRPL_DISTRIBUTED='maybe'"),
        (
            {'DRPL_DISTRIBUTED': '1', 'DRPL_LOCAL_DEVICE_IDS': '0,x'},
            'DRPL_LOCAL_DEVICE_IDS',
        ),
    ],
)
def test_bad_values_are_named(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan_initialization(env=env)


def test_explicit_arguments_win_over_environment():
  env = {
      'DRPL_DISTRIBUTED': '0',
      'DRPL_COORDINATOR': 'envhost:1',
      'DRPL_NUM_PROCESSES': '8',
      'DRPL_PROCESS_ID': '7',
      **SLURM_2_NODES,
  }
  plan = distributed.plan_initialization('cli:99', 2, 1, env=env)
  assert plan.source == 'explicit'
  assert plan.kwargs == {
      'coordinator_address': 'cli:99',
      'num_processes': 2,
      'process_id': 1,
  }
  # A partial set is completed from DRPL_* (JAX detects what is still unset).
  plan = distributed.plan_initialization(process_id=5, env=env)
  assert plan.kwargs == {
      'coordinator_address': 'envhost:1',
      'num_processes': 8,
      'process_id': 5,
  }
  with pytest.raises(
      ValueError, match='process_id=2 must be < num_processes=2'
  ):
    distributed.plan_initialization('h:1', 2, 2, env={})
  with pytest.raises(ValueError, match="coordinator_address='h'"):
    distributed.plan_initialization('h', 2, 0, env={})


def test_off_switch_beats_cluster_detection():
  env = {**SLURM_2_NODES, 'TPU_WORKER_HOSTNAMES': 'a,b'}
  assert distributed.plan_initialization(env=env).source == 'slurm'
  assert (
      distributed.plan_initialization(env={**env, 'DRPL_DISTRIBUTED': 'off'})
      is None
  )


@pytest.mark.parametrize(
    'gpu_env,expected',
    [
        ({'CUDA_VISIBLE_DEVICES': '4,5,6,7'}, [0, 1, 2, 3]),
        ({'SLURM_GPUS_ON_NODE': '8'}, list(range(8))),
        ({}, []),
    ],
)
def test_slurm_one_task_per_node_drives_all_node_gpus(gpu_env, expected):
  plan = distributed.plan_initialization(env={**SLURM_2_NODES, **gpu_env})
  assert plan == distributed.InitPlan('slurm', {'local_device_ids': expected})


def test_slurm_task_per_gpu_is_left_to_jax():
  env = {**SLURM_2_NODES, 'SLURM_STEP_NUM_TASKS': '16', 'SLURM_LOCALID': '3'}
  assert distributed.plan_initialization(env=env) == distributed.InitPlan(
      'slurm', {}
  )


def test_slurm_plan_feeds_jax_slurm_detection(monkeypatch):
  """JAX fills coordinator/count/id and keeps our device list (even [])."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  for key in list(os.environ):
    if key.startswith(_CLUSTER_VARS):
      monkeypatch.delenv(key)
  for key, value in SLURM_2_NODES.items():
    monkeypatch.setenv(key, value)
  for ids in ([0, 1, 2, 3], []):
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, ids, None, 10
    )
    port = 4242 % 2**12 + 65535 - 2**12 + 1
    assert detected == (f'gpu017:{port}', 2, 1, ids)


def test_slurm_allocation_without_srun_is_an_error():
  env = {'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '2'}
  with pytest.raises(RuntimeError, match='srun'):
    distributed.plan_initialization(env=env)


@pytest.mark.parametrize(
    'env,source',
    [
        ({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3', 'TPU_WORKER_ID': '2'}, 'tpu'),
        ({'TPU_PROCESS_ADDRESSES': 'h0:8476,h1:8476'}, 'tpu'),
        ({'MEGASCALE_NUM_SLICES': '2'}, 'tpu'),
        ({'DRPL_DISTRIBUTED': '1'}, 'forced'),
        ({'DRPL_DISTRIBUTED': 'on', **SLURM_2_NODES}, 'slurm'),
    ],
)
def test_multihost_detection_leaves_values_to_jax(env, source):
  plan = distributed.plan_initialization(env=env)
  assert plan.source == source
  assert 'coordinator_address' not in plan.kwargs


def test_forced_without_a_cluster_says_what_to_set():
  proc = subprocess.run(
      [
          sys.executable,
          '-c',
          'from drpl_jax.parallel import distributed; distributed.initialize()',
      ],
      env=clean_env(DRPL_DISTRIBUTED='1', JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
      check=False,
  )
  assert proc.returncode != 0
  assert 'DRPL_COORDINATOR' in proc.stderr, proc.stderr[-2000:]


_WORKER = r"""
import json
import numpy as np
from drpl_jax.parallel import distributed
info = distributed.initialize(initialization_timeout=60)
again = distributed.initialize()
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.asarray(jax.devices()), ('data',))
pid = jax.process_index()
local = (np.arange(3 * jax.local_device_count(), dtype=np.float32)
         + 100.0 * pid)  # [3 * local devices]
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P('data')), local)  # [3 * global devices]
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print('RESULT', json.dumps({'info': info, 'again': again['source'],
                            'global_shape': list(x.shape),
                            'sum': float(total)}), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_agree_on_a_global_sum():
  port = _free_port()
  procs = []
  try:
    for pid in range(2):
      env = clean_env(
          XLA_FLAGS='--xla_force_host_platform_device_count=2',
          JAX_PLATFORMS='cpu',
          DRPL_COORDINATOR=f'127.0.0.1:{port}',
          DRPL_NUM_PROCESSES='2',
          DRPL_PROCESS_ID=str(pid),
      )
      procs.append(
          subprocess.Popen(
              [sys.executable, '-c', _WORKER],
              env=env,
              cwd=ROOT,
              text=True,
              stdout=subprocess.PIPE,
              stderr=subprocess.PIPE,
          )
      )
    outs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    line = [t for t in out.splitlines() if t.startswith('RESULT ')][-1]
    results.append(json.loads(line[len('RESULT ') :]))
  # Each process holds 3 values per local device: pid*100 + 0..5.
  expected = sum(100.0 * pid * 6 + sum(range(6)) for pid in range(2))
  for pid, r in enumerate(results):
    assert r['info']['initialized'] is True and r['info']['source'] == 'env'
    assert r['info']['process_index'] == pid
    assert r['info']['process_count'] == 2
    assert r['info']['local_device_count'] == 2
    assert r['info']['device_count'] == 4
    assert r['again'] == 'already'
    assert r['global_shape'] == [12]
    assert r['sum'] == expected
