"""Training features: precision, accumulation, layer decay, non-finite
updates, EMA evaluation, best checkpoints, preemption and observability."""

import logging
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import config_module
from conftest import set_config
from drpl_jax.parallel import sharding
from drpl_jax.train import checkpointing
from drpl_jax.train import loop as train
from drpl_jax.train import optim
from drpl_jax.train import step as step_lib

demo_config_lib = config_module('demo')


def tiny_config(steps=4, **overrides):
  """Depth-1 micro model at 32 px, batch 8, no warmup (lr > 0 at once)."""
  config = demo_config_lib.get_config(f'steps={steps}')
  config.model.depth = 1
  config.batch_size = 8
  config.eval_batch_size = 64
  config.optim.warmup_steps = 0
  return set_config(config, overrides)


def random_batch(seed=0, n=8, size=32, classes=10, dtype=np.uint8):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (n, size, size, 3), np.uint8)
  if dtype != np.uint8:
    image = (image / 255.0).astype(dtype)
  return {'image': image, 'label': rng.integers(0, classes, (n,), np.int32)}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------
# The step.

# The step tests share one plain-MLP, no-RPE model (it compiles in a
# fraction of the time of the full DRPL block; the switches are tested in
# test_models.py, here the step's logic is), its state and its K=1 step on
# float images (float, so that a NaN can be injected).
PLAIN = {
    'model.conv.kind': 'mlp',
    'model.rpe.kind': 'none',
    'optim.ema_decay': 0.9,
    'mixup.mixup_alpha': 0.8,
    'mixup.cutmix_alpha': 1.0,
}


class Built:
  """A config's model, optimizer, initial state and jitted step."""

  def __init__(self, config, state=None):
    self.config = config
    self.model_cfg = train.model_config_from(config)
    self.tx, self.schedule = optim.create_optimizer(
        optim.OptimConfig.from_config(config.optim),
        config.batch_size,
        config.total_steps,
        self.model_cfg.depth,
    )
    if state is None:
      mesh = sharding.create_mesh((-1, 1), jax.devices()[:1])
      self.graphdef, state, _ = train.create_train_state(
          config, self.model_cfg, self.tx, mesh
      )
    else:  # same parameters, new graph (e.g. dtype) and optimizer state
      self.graphdef, _, _ = nnx.split(
          train.abstract_model(self.model_cfg), nnx.Param, ...
      )
      state = state.replace(opt_state=self.tx.init(state.params))
    self.state = state
    cfg = step_lib.StepConfig.from_config(config, self.model_cfg)
    # No donation: tests reuse the input state.
    self.step = jax.jit(
        step_lib.make_train_step(self.graphdef, self.tx, cfg, self.schedule)
    )


@pytest.fixture(scope='module')
def plain():
  return Built(tiny_config(**PLAIN))


def test_grad_accumulation_equals_the_large_batch(plain):
  """K=4 micro-batches == one batch of 8 (no BatchNorm; mixup and the
  step key on the full batch)."""
  accum = Built(
      tiny_config(**PLAIN, **{'optim.grad_accum_steps': 4}), plain.state
  )
  batches = [
      random_batch(0, dtype=np.float32),
      random_batch(1, dtype=np.float32),
  ]
  results = {}
  for k, built in ((1, plain), (4, accum)):
    state = plain.state
    for batch in batches:
      state, metrics = built.step(state, batch)
    results[k] = (
        leaves(state.params) + leaves(state.ema),
        jax.device_get(metrics),
    )
  (p1, m1), (p4, m4) = results[1], results[4]
  for a, b in zip(p1, p4):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in ('loss', 'grad_norm', 'accuracy_cls', 'loss_dist'):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, err_msg=key)
  # The updates are not trivial: parameters moved well beyond tolerance.
  initial = leaves(plain.state.params)
  assert np.median([np.abs(a - b).max() for a, b in zip(initial, p1)]) > 1e-4
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    step_lib.StepConfig.from_config(
        tiny_config(**{'optim.grad_accum_steps': 3}), plain.model_cfg
    )


def test_grad_accumulation_threads_batchnorm_statistics():
  built = Built(
      tiny_config(
          **{'optim.grad_accum_steps': 2, 'model.rpe.kind': 'none'}  # LeFF + BN
      )
  )
  new, metrics = built.step(built.state, random_batch(0))
  assert np.isfinite(float(metrics['loss']))
  assert any(
      not np.allclose(a, b)
      for a, b in zip(leaves(built.state.rest), leaves(new.rest))
  )


def test_bf16_compute_keeps_fp32_master_weights(plain):
  batch = random_batch(0, dtype=np.float32)
  bf16 = Built(
      tiny_config(
          **PLAIN, **{'model.dtype': 'bfloat16', 'optim.mu_dtype': 'bfloat16'}
      ),
      plain.state,
  )
  assert 'bf16' in bf16.step.lower(bf16.state, batch).as_text()
  new, metrics = bf16.step(bf16.state, batch)
  assert {x.dtype for x in leaves(new.params)} == {np.dtype('float32')}
  adam = new.opt_state[1][0]  # chain(clip, adamw) -> adamw -> adam
  assert {x.dtype for x in leaves(adam.mu)} == {np.dtype(jax.numpy.bfloat16)}
  assert {x.dtype for x in leaves(adam.nu)} == {np.dtype('float32')}
  _, metrics32 = plain.step(plain.state, batch)
  assert abs(float(metrics['loss']) - float(metrics32['loss'])) < 0.05
  assert float(metrics['loss']) != float(metrics32['loss'])


def test_layer_decay_follows_depth():
  params = nnx.state(
      train.abstract_model(
          train.model_config_from(tiny_config(**{'model.depth': 4}))
      ),
      nnx.Param,
  )
  scales = optim.layer_scales(params, depth=4, decay=0.5)
  flat = {
      optim.path_str(p): s
      for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]
  }
  flat = {k.replace('.value', ''): v for k, v in flat.items()}
  assert flat['blocks.3.attn.q.kernel'] == 0.5
  assert flat['blocks.0.ffn.expand.kernel'] == 0.5**4
  for name in (
      'pos_embed',
      'cls_token',
      'dist_token',
      'patch_embed.proj.kernel',
  ):
    assert flat[name] == 0.5**5, name
  for name in ('head.kernel', 'head_dist.bias', 'norm.scale'):
    assert flat[name] == 1.0, name
  with pytest.raises(ValueError, match='layer_decay=1.5'):
    optim.layer_scales(params, depth=4, decay=1.5)


def test_layer_decay_scales_the_whole_update(plain):
  params = plain.state.params  # depth 1: scales 1, 0.5, 0.25
  grads = jax.tree.map(lambda x: jax.numpy.full_like(x, 0.01), params)
  config = tiny_config(**PLAIN)
  updates = {}
  for decay in (1.0, 0.5):
    config.optim.layer_decay = decay
    tx, _ = optim.create_optimizer(
        optim.OptimConfig.from_config(config.optim),
        config.batch_size,
        config.total_steps,
        train.model_config_from(config).depth,
    )
    updates[decay], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  scales = optim.layer_scales(params, depth=1, decay=0.5)
  for full, decayed, scale in zip(
      leaves(updates[1.0]), leaves(updates[0.5]), jax.tree.leaves(scales)
  ):
    np.testing.assert_allclose(decayed, full * scale, rtol=1e-6)
  assert sorted(set(jax.tree.leaves(scales))) == [0.25, 0.5, 1.0]


def test_nonfinite_update_is_skipped_and_counted(plain):
  state, step = plain.state, plain.step
  good = random_batch(0, dtype=np.float32)
  bad = {'image': good['image'].copy(), 'label': good['label']}
  bad['image'][0, 0, 0, 0] = np.nan
  skipped, metrics = step(state, bad)
  assert float(metrics['finite']) == 0.0
  assert int(skipped.nonfinite) == 1 and int(skipped.step) == 1
  for key in ('params', 'ema', 'opt_state', 'rest'):
    for a, b in zip(leaves(getattr(state, key)), leaves(getattr(skipped, key))):
      np.testing.assert_array_equal(a, b, err_msg=key)
  after, metrics = step(skipped, good)
  assert float(metrics['finite']) == 1.0 and int(after.nonfinite) == 1
  assert all(np.isfinite(x).all() for x in leaves(after.params))
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(leaves(skipped.params), leaves(after.params))
  )


# ----------------------------------------------------------------------------
# The loop.


class FloatBatches:
  """Wraps the train iterator: float [0, 1] images, NaN at chosen steps,
  and optionally a callback (e.g. a signal) before a given batch."""

  def __init__(self, it, nan_at=(), before=None):
    self.it, self.nan_at, self.before, self.n = it, set(nan_at), before, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.n += 1
    if self.before is not None:
      self.before(self.n)
    batch = next(self.it)
    image = (batch['image'] / 255.0).astype(np.float32)
    if self.n in self.nan_at:
      image[0, 0, 0, 0] = np.nan
    return dict(batch, image=image)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def wrap_iterator(monkeypatch, **kwargs):
  original = train.input_pipeline.create_train_iterator
  monkeypatch.setattr(
      train.input_pipeline,
      'create_train_iterator',
      lambda *a, **k: FloatBatches(original(*a, **k), **kwargs),
  )


def loop_config(data_dir, steps, **overrides):
  defaults = {
      'data.data_dir': data_dir,
      'log_every_steps': 1,
      'eval_every_steps': 100,
      'checkpoint_every_steps': 100,
      'model.conv.kind': 'mlp',
      'model.rpe.kind': 'none',
  }
  return tiny_config(steps, **{**defaults, **overrides})


def test_loop_features(demo_data_dir, tmp_path, monkeypatch, caplog):
  """EMA eval, best + latest kept, NaN skipped, profile, progress, table."""
  wrap_iterator(monkeypatch, nan_at={3})
  scripted = {2: 0.5, 4: 0.9, 6: 0.1}
  real_evaluate = train._evaluate

  def evaluate(run, step):
    out = real_evaluate(run, step)
    out['val_accuracy_mean'] = scripted[step]
    return out

  monkeypatch.setattr(train, '_evaluate', evaluate)
  config = loop_config(
      demo_data_dir,
      6,
      **{
          'optim.ema_decay': 0.5,
          'eval_every_steps': 2,
          'keep_checkpoints': 1,
          'best_metric': 'val_accuracy_mean',
          'profile_steps': (1, 2),
          'progress_every_secs': 0.0,
      },
  )
  workdir = str(tmp_path / 'run')
  # Another test in this worker may have run an absl app, which sets the
  # absl logger to WARNING; ask for INFO on it explicitly.
  caplog.set_level(logging.INFO, logger='absl')
  caplog.set_level(logging.INFO)
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 6 and result['nonfinite'] == 1
  assert result['validation_ema']['num_examples'] > 0
  assert 0 <= result['validation_ema']['accuracy_mean'] <= 1
  # Latest (6) and best (4) are kept; 2 was deleted.
  assert sorted(
      int(s)
      for s in os.listdir(tmp_path / 'run' / 'checkpoints')
      if s.isdigit()
  ) == [4, 6]
  assert result['best_step'] == 4
  reopened = checkpointing.Checkpointer(
      workdir, best_metric='val_accuracy_mean'
  )
  assert (
      reopened.best_step() == 4
      and reopened.metrics(4)['val_accuracy_mean'] == 0.9
  )
  reopened.close()
  profile = tmp_path / 'run' / 'profile'
  assert any(files for _, _, files in os.walk(profile))
  log = caplog.text
  assert 'Skipped 1 updates with a non-finite' in log
  assert 'blocks/0/attn/q/kernel' in log  # the parameter table
  assert 'ETA' in log  # clu ReportProgress
  assert 'examples_per_sec_per_device' in log and 'grad_norm' in log
  assert 'eval validation: ' in log and ' batches, ' in log


def test_nonfinite_stop_names_the_step(demo_data_dir, tmp_path, monkeypatch):
  wrap_iterator(monkeypatch, nan_at={2})
  config = loop_config(
      demo_data_dir, 4, nonfinite='stop', checkpoint_every_steps=1
  )
  with pytest.raises(FloatingPointError, match='at step 2 '):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  # Step 1 was saved, the diverged step 2 was not.
  assert sorted(
      int(s)
      for s in os.listdir(tmp_path / 'run' / 'checkpoints')
      if s.isdigit()
  ) == [1]


def test_sigterm_saves_and_stops_cleanly(
    demo_data_dir, tmp_path, monkeypatch, caplog
):
  """SIGTERM before batch 3: step 3 is saved, the loop returns."""

  def preempt(n):
    if n == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  wrap_iterator(monkeypatch, before=preempt)
  previous = signal.getsignal(signal.SIGTERM)
  caplog.set_level(logging.INFO, logger='absl')
  caplog.set_level(logging.INFO)
  config = loop_config(demo_data_dir, 50)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['preempted'] and result['step'] == 3
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['3']
  assert 'Preempted: saved checkpoint at step 3' in caplog.text
  assert signal.getsignal(signal.SIGTERM) is previous
