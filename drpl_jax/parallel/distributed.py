"""Multi-process (multi-host) start-up: when and how to call
`jax.distributed.initialize`.

JAX runs one process per host ("single controller per host"); on a TPU pod
slice or a multi-node GPU job every process must call
`jax.distributed.initialize` before its first JAX computation. A plain
single-process run (a laptop, one GPU, one multi-GPU node) must not. This
module decides which case applies from the environment alone, without
network access, and then lets JAX fill in what it can detect itself.

Decision order (first match wins):

1. Explicit arguments (`coordinator_address`, `num_processes`,
   `process_id`, `local_device_ids`; `main.py` exposes them as flags for
   generic clusters). Values left out come from the `DRPL_*` variables
   below, then from JAX's own cluster detection.
2. `DRPL_DISTRIBUTED=0` (also `off`, `false`, `no`): never initialise. The
   single-process launchers set it, so a stray SLURM or TPU variable cannot
   make a local run wait for peers that do not exist.
3. A hand-made launch: `DRPL_COORDINATOR=host:port`,
   `DRPL_NUM_PROCESSES=N`, `DRPL_PROCESS_ID=i` (all three, the same
   coordinator and N on every process, i = 0..N-1; process 0 hosts the
   coordinator) and optionally `DRPL_LOCAL_DEVICE_IDS=0,1,...`.
4. `DRPL_DISTRIBUTED=1` (also `on`, `true`, `yes`): always initialise and
   let JAX detect everything (`launch/tpu_pod.sh run` sets this; on a Cloud
   TPU VM JAX reads the worker list from the VM metadata server).
5. SLURM: `SLURM_JOB_ID` set and more than one task in the step
   (`SLURM_STEP_NUM_TASKS`, else `SLURM_NTASKS`). JAX's SLURM detection
   supplies the coordinator (first node of the step), the process count
   and id. With one task per node (our launchers) each process is given all
   GPUs of its node; JAX alone would restrict it to GPU `SLURM_LOCALID`.
6. A multi-host TPU environment: `TPU_WORKER_HOSTNAMES` or
   `TPU_PROCESS_ADDRESSES` listing more than one host (GKE, and
   `CLOUD_TPU_TASK_ID` set-ups that export the worker list), or
   `MEGASCALE_NUM_SLICES` > 1 (multislice).
7. Otherwise: single process, nothing is initialised.

On CPU, cross-process collectives need an implementation; `gloo` is selected
when none is set (the default in recent JAX). Two local processes with two
fake CPU devices each (`tests/test_distributed.py`) are the only multi-process
run that was tried here; TPU pods and SLURM clusters were not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

ENV_MODE = 'DRPL_DISTRIBUTED'
ENV_COORDINATOR = 'DRPL_COORDINATOR'
ENV_NUM_PROCESSES = 'DRPL_NUM_PROCESSES'
ENV_PROCESS_ID = 'DRPL_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'DRPL_LOCAL_DEVICE_IDS'

_OFF = ('0', 'off', 'false', 'no')
_ON = ('1', 'on', 'true', 'yes')
_AUTO = ('', 'auto')

_logged = False


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """How to call `jax.distributed.initialize`.

  Attributes:
    source: why: 'explicit', 'env', 'forced', 'slurm' or 'tpu'.
    kwargs: arguments for `jax.distributed.initialize`; a missing key (or
      None) is left to JAX's cluster detection.
  """

  source: str
  kwargs: dict[str, Any]


def _parse_int(value: Any, name: str) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def _parse_ids(
    value: str | Sequence[int] | None, name: str
) -> list[int] | None:
  """'0,1,2' or [0, 1, 2] -> [0, 1, 2]; None stays None."""
  if value is None:
    return None
  if isinstance(value, str):
    parts = [p for p in value.replace(' ', '').split(',') if p]
    if not parts:
      raise ValueError(f'{name}={value!r} lists no device ids')
    return [_parse_int(p, name) for p in parts]
  return [_parse_int(v, name) for v in value]


def _check_coordinator(address: str, name: str) -> str:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ValueError(
        f'{name}={address!r} must be host:port, e.g. 10.0.0.1:1234'
    )
  return address


def _check_process(
    num_processes: int | None, process_id: int | None, names: tuple[str, str]
) -> None:
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'{names[0]}={num_processes} must be >= 1')
  if process_id is not None and process_id < 0:
    raise ValueError(f'{names[1]}={process_id} must be >= 0')
  if (
      num_processes is not None
      and process_id is not None
      and process_id >= num_processes
  ):
    raise ValueError(
        f'{names[1]}={process_id} must be < {names[0]}={num_processes}'
    )


def _from_drpl_env(env: Mapping[str, str]) -> dict[str, Any]:
  """The DRPL_* launch variables that are set, parsed and checked."""
  out: dict[str, Any] = {}
  if env.get(ENV_COORDINATOR):
    out['coordinator_address'] = _check_coordinator(
        env[ENV_COORDINATOR], ENV_COORDINATOR
    )
  if env.get(ENV_NUM_PROCESSES):
    out['num_processes'] = _parse_int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
  if env.get(ENV_PROCESS_ID):
    out['process_id'] = _parse_int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
  if env.get(ENV_LOCAL_DEVICE_IDS):
    out['local_device_ids'] = _parse_ids(
        env[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS
    )
  return out


def _slurm_num_tasks(env: Mapping[str, str]) -> int:
  name = (
      'SLURM_STEP_NUM_TASKS'
      if 'SLURM_STEP_NUM_TASKS' in env
      else ('SLURM_NTASKS')
  )
  return _parse_int(env.get(name, '1'), name)


def _slurm_plan(env: Mapping[str, str]) -> InitPlan:
  """JAX's SLURM detection, with all node GPUs when one task per node."""
  missing = [
      v
      for v in ('SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
      if v not in env
  ]
  if missing:
    raise RuntimeError(
        f'SLURM job with {_slurm_num_tasks(env)} tasks but {missing} not '
        f'set: start every task with srun (see launch/slurm.sbatch), or set '
        f'{ENV_MODE}=0 for a single-process run'
    )
  nodes_name = (
      'SLURM_STEP_NUM_NODES'
      if 'SLURM_STEP_NUM_NODES' in env
      else ('SLURM_NNODES')
  )
  nodes = _parse_int(env.get(nodes_name, '0'), nodes_name)
  kwargs: dict[str, Any] = {}
  if nodes and nodes == _slurm_num_tasks(env):
    # One process drives every GPU of its node. An empty list means "no
    # restriction" to jax.distributed.initialize; a known count is explicit.
    kwargs['local_device_ids'] = _node_gpu_ids(env)
  return InitPlan('slurm', kwargs)


def _node_gpu_ids(env: Mapping[str, str]) -> list[int]:
  """0..n-1 for the n GPUs SLURM gave this node ([] when unknown)."""
  visible = env.get('CUDA_VISIBLE_DEVICES', '').strip()
  if visible and visible != 'NoDevFiles':
    return list(range(len([v for v in visible.split(',') if v])))
  if env.get('SLURM_GPUS_ON_NODE', '').strip().isdigit():
    return list(range(int(env['SLURM_GPUS_ON_NODE'])))
  return []


def _is_multihost_tpu(env: Mapping[str, str]) -> bool:
  for name in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    hosts = [h for h in env.get(name, '').split(',') if h.strip()]
    if len(hosts) > 1:
      return True
  slices = env.get('MEGASCALE_NUM_SLICES', '').strip()
  return slices.isdigit() and int(slices) > 1


def plan_initialization(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
) -> InitPlan | None:
  """Decides whether (and with what) to initialise, without side effects.

  Args:
    coordinator_address: 'host:port' of process 0 (explicit, wins).
    num_processes: total number of processes (explicit, wins).
    process_id: this process, 0..num_processes-1 (explicit, wins).
    local_device_ids: the local devices this process drives (explicit).
    env: the environment to read; `os.environ` when None.

  Returns:
    An `InitPlan`, or None for a single-process run. See the module
    docstring for the decision order.

  Raises:
    ValueError: a malformed argument or DRPL_* variable (named).
    RuntimeError: an incomplete DRPL_* set or a SLURM step not run by srun.
  """
  env = os.environ if env is None else env
  explicit = {
      'coordinator_address': coordinator_address,
      'num_processes': num_processes,
      'process_id': process_id,
      'local_device_ids': _parse_ids(local_device_ids, 'local_device_ids'),
  }
  explicit = {k: v for k, v in explicit.items() if v is not None}
  if explicit:
    if 'coordinator_address' in explicit:
      _check_coordinator(coordinator_address, 'coordinator_address')
    kwargs = {**_from_drpl_env(env), **explicit}
    _check_process(
        kwargs.get('num_processes'),
        kwargs.get('process_id'),
        ('num_processes', 'process_id'),
    )
    return InitPlan('explicit', kwargs)
  mode = env.get(ENV_MODE, '').strip().lower()
  if mode not in _OFF + _ON + _AUTO:
    raise ValueError(f'{ENV_MODE}={env[ENV_MODE]!r}: use 0/off, 1/on or auto')
  if mode in _OFF:
    return None
  from_env = _from_drpl_env(env)
  required = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  if any(env.get(v) for v in required):
    missing = [v for v in required if not env.get(v)]
    if missing:
      raise RuntimeError(
          f'hand-made multi-process launch: {missing} not set '
          f'(set all of {list(required)})'
      )
    _check_process(
        from_env['num_processes'],
        from_env['process_id'],
        (ENV_NUM_PROCESSES, ENV_PROCESS_ID),
    )
    return InitPlan('env', from_env)
  is_slurm = 'SLURM_JOB_ID' in env and _slurm_num_tasks(env) > 1
  if mode in _ON:
    return _slurm_plan(env) if is_slurm else InitPlan('forced', from_env)
  if is_slurm:
    return _slurm_plan(env)
  if _is_multihost_tpu(env):
    return InitPlan('tpu', from_env)
  return None


def process_info(initialized: bool, source: str) -> dict[str, Any]:
  """Process and device counts of this process (initialises the backend)."""
  return {
      'initialized': initialized,
      'source': source,
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'local_device_count': jax.local_device_count(),
      'device_count': jax.device_count(),
      'platform': jax.devices()[0].platform,
  }


def _use_gloo_on_cpu() -> None:
  """Cross-process CPU collectives need an implementation; pick gloo."""
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
) -> dict[str, Any]:
  """Initialises JAX's multi-process runtime when this is a multi-process run.

  Call it first thing in a program, before any JAX computation. A plain
  single-process run is a no-op. Calling it again returns the current state.

  Args:
    coordinator_address: 'host:port' of process 0 (generic clusters).
    num_processes: total number of processes.
    process_id: index of this process.
    local_device_ids: local device ids this process drives (GPU).
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    {'initialized', 'source', 'process_index', 'process_count',
    'local_device_count', 'device_count', 'platform'}; also logged once.
  """
  global _logged
  if jax.distributed.is_initialized():
    return process_info(True, 'already')
  plan = plan_initialization(
      coordinator_address, num_processes, process_id, local_device_ids
  )
  if plan is None:
    info = process_info(False, 'single-process')
  else:
    _use_gloo_on_cpu()
    kwargs = {k: v for k, v in plan.kwargs.items() if v is not None}
    logging.info('jax.distributed.initialize(%s) [%s]', kwargs, plan.source)
    try:
      jax.distributed.initialize(
          **kwargs, initialization_timeout=initialization_timeout
      )
    except ValueError as e:  # JAX could not detect the missing values.
      raise ValueError(
          f'{e} [multi-process start via {plan.source}; pass the '
          f'coordinator flags or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} '
          f'and {ENV_PROCESS_ID}]'
      ) from e
    info = process_info(True, plan.source)
  if not _logged:
    logging.info('Processes: %s', info)
    _logged = True
  return info
