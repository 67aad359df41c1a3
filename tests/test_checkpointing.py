"""Checkpoints: latest + best, incomplete ones skipped, other models refused,
preemption, and runs killed at a random step that resume bit-identically."""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import restore_on_one_device
from drpl_jax.models import ModelConfig, create_model
from drpl_jax.train import checkpointing
from drpl_jax.train import loop as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(value=0.0, shape=(4, 4)):
  return {
      'step': np.int32(value),
      'params': {
          'w': np.full(shape, value, np.float32),
          'b': np.full((4,), value, np.float32),
      },
  }


def shardings_of(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, state)


def save_steps(workdir, values, **kwargs):
  ckpt = checkpointing.Checkpointer(workdir, save_every=1, **kwargs)
  for step, value in values.items():
    metrics = None
    if isinstance(value, tuple):
      value, metrics = value
    ckpt.maybe_save(
        step,
        jax.device_put(small_state(value)),
        {'position': step},
        metrics=metrics,
    )
  ckpt.wait()
  return ckpt


def test_latest_and_best_are_kept_across_restarts(tmp_path):
  workdir = str(tmp_path)
  metric = 'val_accuracy_mean'
  ckpt = save_steps(
      workdir,
      {
          1: (1.0, {metric: 0.5}),
          2: (2.0, {metric: 0.9}),
          3: (3.0, {metric: 0.1}),
      },
      keep=1,
      best_metric=metric,
  )
  assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 2
  ckpt.close()
  # A restarted run still knows the metrics on disk: 2 survives new saves.
  ckpt = save_steps(
      workdir, {4: (4.0, {metric: 0.3}), 5: 5.0}, keep=1, best_metric=metric
  )
  assert ckpt.all_steps() == [2, 5] and ckpt.best_step() == 2
  ckpt.close()
  # Minimised when the name says loss.
  assert checkpointing.best_mode('val_loss_mean') == 'min'
  ckpt = save_steps(
      str(tmp_path / 'loss'),
      {
          1: (1.0, {'val_loss_mean': 0.5}),
          2: (2.0, {'val_loss_mean': 0.2}),
          3: (3.0, {'val_loss_mean': 0.7}),
      },
      keep=1,
      best_metric='val_loss_mean',
  )
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()


def test_incomplete_checkpoints_are_skipped(tmp_path, caplog):
  workdir = str(tmp_path)
  save_steps(workdir, {1: 1.0, 2: 2.0, 3: 3.0}, keep=5).close()
  ckpt_dir = tmp_path / 'checkpoints'
  shutil.rmtree(ckpt_dir / '3' / 'state' / 'd')  # data files lost
  tmp = ckpt_dir / ('4' + '.orbax-checkpoint-tmp-1234')  # save cut short
  shutil.copytree(ckpt_dir / '2', tmp)
  caplog.set_level(logging.WARNING)
  ckpt = checkpointing.Checkpointer(
      workdir, keep=5, save_every=1, cleanup_incomplete=True
  )
  assert str(tmp) in caplog.text
  target = jax.device_put(small_state(0.0))
  state, data = ckpt.restore_latest(target, shardings_of(target))
  assert f'Skipping incomplete checkpoint {ckpt_dir / "3"}' in caplog.text
  assert data == {'position': 2}
  np.testing.assert_array_equal(state['params']['w'], np.full((4, 4), 2.0))
  assert ckpt.all_steps() == [1, 2] and not tmp.exists()
  assert (tmp_path / checkpointing.INCOMPLETE_DIR / '3').exists()
  # The run goes on and can save step 3 again.
  assert ckpt.maybe_save(3, target, {'position': 3})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2, 3]
  ckpt.close()


def test_readers_leave_incomplete_checkpoints_alone(tmp_path):
  save_steps(str(tmp_path), {1: 1.0}, keep=5).close()
  tmp = tmp_path / 'checkpoints' / ('2' + '.orbax-checkpoint-tmp-1')
  tmp.mkdir()
  checkpointing.Checkpointer(str(tmp_path)).close()  # e.g. evaluation
  assert tmp.exists()


def test_other_shapes_are_refused_naming_them(tmp_path):
  save_steps(str(tmp_path), {1: 1.0}, keep=5).close()
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  target = jax.device_put(small_state(0.0, shape=(4, 8)))
  with pytest.raises(
      ValueError, match=r'params\.w: checkpoint \(4, 4\), config \(4, 8\)'
  ):
    ckpt.restore(1, target, shardings_of(target))
  ckpt.close()


def test_other_model_config_is_refused_naming_shapes(tmp_path):
  def model_state(**changes):
    kwargs = dict(
        num_classes=4,
        image_size=32,
        patch_size=8,
        width=32,
        depth=1,
        num_heads=2,
    )
    cfg = ModelConfig(**{**kwargs, **changes})
    return {'params': nnx.state(create_model(cfg, rngs=nnx.Rngs(0)), nnx.Param)}

  saved = model_state()
  ckpt = checkpointing.Checkpointer(str(tmp_path), save_every=1)
  ckpt.maybe_save(1, saved, {})
  ckpt.wait()
  other = model_state(patch_size=4, distilled=False)
  with pytest.raises(ValueError) as err:
    ckpt.restore(1, other, shardings_of(other))
  message = str(err.value)
  assert 'params.pos_embed: checkpoint (1, 18, 32), config (1, 65, 32)' in (
      message
  )
  assert 'params.patch_embed.proj.kernel: checkpoint (8, 8, 3, 32)' in message
  assert "only in the checkpoint: ['params.dist_token'" in message
  ckpt.close()


def test_preemption_watcher_catches_sigterm():
  previous = signal.getsignal(signal.SIGTERM)
  watcher = checkpointing.PreemptionWatcher()
  try:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert watcher.reached(2)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) is previous


# ----------------------------------------------------------------------------
# In-process: a run stopped at step 3, with the debris of a killed save.


class SignalBefore:
  """Wraps the train iterator; sends SIGTERM to this process before the
  n-th batch (a preemption notice arriving mid-run)."""

  def __init__(self, it, n):
    self.it, self.n, self.count = it, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def test_interrupted_run_with_debris_resumes_bit_identically(
    demo_data_dir, tmp_path, monkeypatch, compilation_cache
):
  """Fast variant of the SIGKILL test below."""
  del compilation_cache
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  demo_config_lib = config_module('demo')
  config = demo_config_lib.get_config('steps=6')
  config.data.data_dir = demo_data_dir
  config.model.conv.kind, config.model.rpe.kind = 'mlp', 'none'
  config.model.depth = 1
  config.batch_size, config.eval_batch_size = 8, 256
  config.checkpoint_every_steps, config.eval_every_steps = 2, 100
  config.optim.warmup_steps = 2
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  resumed = str(tmp_path / 'resumed')
  original = train.input_pipeline.create_train_iterator
  monkeypatch.setattr(
      train.input_pipeline,
      'create_train_iterator',
      lambda *a, **k: SignalBefore(original(*a, **k), 3),
  )
  assert train.train_and_evaluate(config, resumed)['step'] == 3
  monkeypatch.undo()
  # What a SIGKILL during saves leaves: a half-written folder, and a step
  # folder whose array data never reached the disk.
  ckpt_dir = os.path.join(resumed, 'checkpoints')
  shutil.copytree(
      os.path.join(ckpt_dir, '3'),
      os.path.join(ckpt_dir, '5.orbax-checkpoint-tmp-77'),
  )
  shutil.copytree(os.path.join(ckpt_dir, '3'), os.path.join(ckpt_dir, '4'))
  shutil.rmtree(os.path.join(ckpt_dir, '4', 'state', 'd'))
  result = train.train_and_evaluate(config, resumed)
  assert result['step'] == 6
  assert final_params_hash(resumed) == final_params_hash(straight)


# ----------------------------------------------------------------------------
# Runs of `python -m drpl_jax.main` that are killed or preempted.


def main_command(data_dir, workdir, steps, every=1):
  return [
      sys.executable,
      '-m',
      'drpl_jax.main',
      f'--config={ROOT}/configs/demo.py:steps={steps}',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      # A plain micro ViT (MLP, no RPE) compiles fastest.
      '--config.model.conv.kind=mlp',
      '--config.model.rpe.kind=none',
      '--config.batch_size=8',
      '--config.eval_batch_size=256',
      '--config.log_every_steps=1',
      f'--config.eval_every_steps={steps}',
      f'--config.checkpoint_every_steps={every}',
      '--config.optim.warmup_steps=2',
      # absl INFO on: the tests watch clu's per-step log lines.
      '--verbosity=0',
  ]


def subprocess_env(cache_dir):
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      DRPL_DISTRIBUTED='0',
      JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  env.pop('XLA_FLAGS', None)
  return env


def run_to_end(cmd, env, timeout=600):
  proc = subprocess.run(
      cmd,
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def final_params_hash(workdir):
  """sha256 over the final checkpoint's parameters (sorted paths)."""
  ckpt = checkpointing.Checkpointer(workdir)
  step = ckpt.latest_step()
  state = restore_on_one_device(ckpt, step)
  ckpt.close()
  flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
  digest = hashlib.sha256()
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return step, digest.hexdigest()


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


def wait_for(predicate, proc, timeout, what, stderr=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      text = stderr.text() if stderr else proc.stderr.read()
      raise AssertionError(
          f'process ended ({proc.returncode}) before {what}: {text[-3000:]}'
      )
    time.sleep(0.2)
  raise AssertionError(f'timed out waiting for {what}')


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_bit_identically(
    demo_data_dir, tmp_path
):
  steps = 8
  kill_after = random.SystemRandom().randint(2, steps - 2)
  env = subprocess_env(tmp_path / 'jax_cache')
  straight = str(tmp_path / 'straight')
  run_to_end(main_command(demo_data_dir, straight, steps), env)
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen(
      main_command(demo_data_dir, killed, steps),
      env=env,
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    err = LineReader(proc.stderr)
    marker = os.path.join(killed, 'checkpoints', str(kill_after))
    wait_for(
        lambda: os.path.isdir(marker),
        proc,
        600,
        f'checkpoint {kill_after}',
        err,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    kill_all([proc])
  assert proc.returncode == -signal.SIGKILL
  done = sorted(
      int(s) for s in os.listdir(os.path.dirname(marker)) if s.isdigit()
  )
  assert done[-1] < steps, f'killed after {kill_after}, too late: {done}'
  run_to_end(main_command(demo_data_dir, killed, steps), env)
  assert final_params_hash(killed) == final_params_hash(
      straight
  ), f'killed after checkpoint {kill_after}'


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(demo_data_dir, tmp_path):
  env = subprocess_env(tmp_path / 'jax_cache')
  workdir = str(tmp_path / 'run')
  proc = subprocess.Popen(
      main_command(demo_data_dir, workdir, 10_000, every=10_000),
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    # Training runs: clu has logged the summary of step 2.
    wait_for(
        lambda: re.search(r'\[2\] .*loss', err.text()), proc, 600, 'step 2', err
    )
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    out.thread.join(30)
    err.thread.join(30)
  finally:
    kill_all([proc])
  assert proc.returncode == 0, err.text()[-4000:]
  steps = [
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  ]
  assert len(steps) == 1 and 2 <= steps[0] < 10_000
  assert f'Preempted: saved checkpoint at step {steps[0]}' in err.text()
  summary = json.loads(out.lines[-1])
  assert summary['step'] == steps[0] and summary['preempted'] is True
