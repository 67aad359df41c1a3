"""End-to-end: demo data -> jitted training -> checkpoints -> evaluation."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import config_module
from conftest import tiny_demo_config
from drpl_jax.evaluation import evaluate
from drpl_jax.train import loop as train
from drpl_jax.train import state as state_lib
from drpl_jax.train import step as step_lib

demo_config_lib = config_module('demo')


def small_config(data_dir, steps=6, **overrides):
  """tiny_demo_config with batch 16 and an evaluation and checkpoint every
  3 steps."""
  return tiny_demo_config(
      data_dir,
      steps,
      **{
          'batch_size': 16,
          'log_every_steps': 2,
          'eval_every_steps': 3,
          'checkpoint_every_steps': 3,
          'optim.warmup_steps': 2,
          **overrides,
      }
  )


def final_params(workdir):
  steps = sorted(
      int(s)
      for s in os.listdir(os.path.join(workdir, 'checkpoints'))
      if s.isdigit()
  )
  return steps


def test_train_resume_and_evaluate(demo_data_dir, tmp_path, compilation_cache):
  workdir = str(tmp_path / 'run')
  config = small_config(demo_data_dir, steps=6)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 6
  assert 0.0 <= result['validation']['accuracy_mean'] <= 1.0
  assert final_params(workdir) == [3, 6]
  # A longer run in the same workdir resumes from step 6, not from scratch.
  config = small_config(demo_data_dir, steps=9)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 9
  assert final_params(workdir)[-1] == 9

  report = evaluate.evaluate(config, workdir, n_bootstrap=50)
  path = os.path.join(workdir, 'eval', 'test', 'report.json')
  with open(path) as f:
    on_disk = json.load(f)
  assert on_disk['checkpoint_step'] == 9
  assert on_disk['num_examples'] == report['num_examples'] > 0
  cm = np.asarray(on_disk['confusion_matrix'])
  assert cm.shape == (10, 10) and cm.sum() == on_disk['num_examples']
  assert set(on_disk['heads']) == {'cls', 'dist', 'mean'}
  for name in on_disk['class_names']:
    assert 0.0 <= (on_disk['per_class'][name]['sensitivity'] or 0.0) <= 1.0


def test_resume_is_exact(demo_data_dir, tmp_path, compilation_cache):
  """3 steps + restart + 3 steps == 6 uninterrupted steps, bit for bit."""

  def params_of(workdir, steps):
    config = small_config(demo_data_dir, steps=steps)
    config.eval_every_steps = 100
    train.train_and_evaluate(config, workdir)
    ev = evaluate.Evaluator(config, workdir)
    return jax.tree.leaves(jax.device_get(ev.state.params))

  straight = params_of(str(tmp_path / 'a'), 6)
  params_of(str(tmp_path / 'b'), 3)
  resumed = params_of(str(tmp_path / 'b'), 6)
  for x, y in zip(straight, resumed):
    np.testing.assert_array_equal(x, y)


def test_train_step_compiles_once(demo_data_dir):
  config = small_config(demo_data_dir)
  setup = state_lib.build(config)
  state = setup.state
  traces = []
  raw = step_lib.make_train_step(
      setup.graphdef, setup.tx, setup.step_cfg, setup.schedule
  )

  def counted(state, batch):
    traces.append(1)
    return raw(state, batch)

  step = jax.jit(counted, donate_argnums=(0,))
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {
        'image': rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
        'label': rng.integers(0, 10, (16,), np.int32),
    }
    state, metrics = step(state, batch)
  assert len(traces) == 1
  assert int(state.step) == 3
  assert np.isfinite(float(metrics['loss']))


def test_num_classes_mismatch_is_clear(demo_data_dir, tmp_path):
  config = small_config(demo_data_dir, **{'model.num_classes': 4})
  with pytest.raises(ValueError, match='num_classes=4.*10 classes'):
    train.train_and_evaluate(config, str(tmp_path / 'x'))


@pytest.mark.slow
def test_demo_beats_chance(demo_data_dir, tmp_path):
  config = demo_config_lib.get_config()
  config.data.data_dir = demo_data_dir
  workdir = str(tmp_path / 'demo')
  train.train_and_evaluate(config, workdir)
  report = evaluate.evaluate(config, workdir, n_bootstrap=100)
  assert report['accuracy'] > 0.7  # chance is 0.1
