"""Two real JAX processes (localhost coordinator, 2 CPU devices each) train,
checkpoint and evaluate like one process with 4 devices."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import restore_on_one_device
from drpl_jax.train import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
STEPS = 4


def command(data_dir, workdir, steps=STEPS):
  # LeFF with LayerNorm, no RPE: no BatchNorm-fed biases whose exactly-zero
  # gradient Adam would turn into rounding-dependent steps, and a faster
  # compile. A large lr moves every parameter far beyond the tolerance.
  return [
      sys.executable,
      '-m',
      'drpl_jax.main',
      f'--config={ROOT}/configs/demo.py:steps={steps}',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      '--config.model.rpe.kind=none',
      '--config.model.conv.norm=layer',
      '--config.batch_size=8',
      '--config.eval_batch_size=64',
      '--config.log_every_steps=1',
      '--config.eval_every_steps=2',
      '--config.checkpoint_every_steps=2',
      '--config.optim.warmup_steps=1',
      '--config.optim.base_lr=0.5',
      # absl INFO on: the tests watch clu's per-step log lines.
      '--verbosity=0',
  ]


def env_for(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_VARS)}
  env.update(
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
      **extra,
  )
  return env


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(cmds_envs, timeout):
  """Starts all, waits with a bound, kills every one on any failure."""
  procs = [
      subprocess.Popen(
          cmd,
          env=env,
          cwd=ROOT,
          text=True,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
      )
      for cmd, env in cmds_envs
  ]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [(json.loads(out.strip().splitlines()[-1]), err) for out, err in outs]


def checkpoint_params(workdir):
  """{step: {path: array}} of every checkpoint in workdir."""
  ckpt = checkpointing.Checkpointer(workdir)
  out = {}
  for step in ckpt.all_steps():
    state = restore_on_one_device(ckpt, step)
    flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
    out[step] = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
  ckpt.close()
  return out


@pytest.mark.slow
def test_two_processes_match_one_process(demo_data_dir, tmp_path):
  single = str(tmp_path / 'single')
  [(one, _)] = run_processes(
      [(command(demo_data_dir, single), env_for(4, DRPL_DISTRIBUTED='0'))],
      timeout=900,
  )
  multi = str(tmp_path / 'multi')
  port = free_port()
  results = run_processes(
      [
          (
              command(demo_data_dir, multi),
              env_for(
                  2,
                  DRPL_COORDINATOR=f'127.0.0.1:{port}',
                  DRPL_NUM_PROCESSES='2',
                  DRPL_PROCESS_ID=str(pid),
              ),
          )
          for pid in range(2)
      ],
      timeout=900,
  )
  for pid, (r, err) in enumerate(results):
    # Really two processes of one job (drpl_jax.parallel.distributed logs this).
    assert f"'process_index': {pid}, 'process_count': 2" in err, err[-3000:]
    assert r['step'] == one['step'] == STEPS
    assert r['num_test_examples'] == one['num_test_examples'] > 0
    # Same predictions up to ties broken by rounding.
    assert abs(r['test_accuracy'] - one['test_accuracy']) <= (
        1.0 / one['num_test_examples']
    )
  ckpts_one, ckpts_multi = checkpoint_params(single), checkpoint_params(multi)
  assert sorted(ckpts_one) == sorted(ckpts_multi) == [2, STEPS]
  params_one, params_multi = ckpts_one[STEPS], ckpts_multi[STEPS]
  assert params_one.keys() == params_multi.keys()
  for name, value in params_one.items():
    if "['attn']['k']['bias']" in name:
      # A key bias adds q.b to every key's logit alike, so softmax leaves
      # it an exactly-zero gradient; Adam turns the rounding left there
      # into +-lr steps that differ with the reduction order.
      continue
    np.testing.assert_allclose(
        params_multi[name], value, rtol=1e-5, atol=1e-5, err_msg=name
    )
  # Steps 3-4 moved the parameters far beyond that tolerance.
  moved = [np.abs(v - ckpts_one[2][k]).max() for k, v in params_one.items()]
  assert np.median(moved) > 1e-3, moved
  with open(os.path.join(multi, 'eval', 'test', 'report.json')) as f:
    report = json.load(f)
  assert report['num_examples'] == one['num_test_examples']


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(
    demo_data_dir, tmp_path
):
  """JAX's preemption service: every process saves the same step, exits 0."""
  workdir = str(tmp_path / 'run')
  cmd = command(demo_data_dir, workdir, steps=100000)
  cmd += [
      '--config.eval_every_steps=100000',
      '--config.checkpoint_every_steps=100000',
  ]
  port = free_port()
  procs = [
      subprocess.Popen(
          cmd,
          env=env_for(
              2,
              DRPL_COORDINATOR=f'127.0.0.1:{port}',
              DRPL_NUM_PROCESSES='2',
              DRPL_PROCESS_ID=str(pid),
          ),
          cwd=ROOT,
          text=True,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
      )
      for pid in range(2)
  ]
  try:
    readers = [LineReader(p.stderr) for p in procs]
    deadline = time.time() + 600
    while not re.search(r'\[3\] .*loss', readers[0].text()):
      assert time.time() < deadline, 'training did not start'
      assert all(p.poll() is None for p in procs), readers[0].text()[-3000:]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
  for p, reader in zip(procs, readers):
    reader.thread.join(30)
    assert p.returncode == 0, reader.text()[-4000:]
  steps = [
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  ]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  for reader in readers:
    assert f'Preempted: saved checkpoint at step {steps[0]}' in reader.text()


class LineReader:
  """Collects a pipe's lines in a thread (so the child never blocks)."""

  def __init__(self, pipe):
    self.lines = []
    self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
    self.thread.start()

  def _read(self, pipe):
    for line in pipe:
      self.lines.append(line)

  def text(self):
    return ''.join(self.lines)
