"""The iRPE tables' treatment in training, against the official iRPE DeiT
recipe (microsoft/Cream, iRPE/DeiT-with-iRPE): decayed like every other
matrix, same learning rate, zero initialisation; and their norms and the
teacher's figures in the step's metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_module
from conftest import set_config
from drpl_jax.models import create_model
from drpl_jax.parallel import sharding
from drpl_jax.train import loop as train
from drpl_jax.train import optim
from drpl_jax.train import step as step_lib

demo_config_lib = config_module('demo')


def tiny_config(**overrides):
  """Depth-1 micro DRPL at 32 px with iRPE on q, k and v."""
  config = demo_config_lib.get_config('steps=4')
  config.model.depth = 1
  config.batch_size = 8
  config.optim.warmup_steps = 0
  config.model.rpe.on_q = config.model.rpe.on_v = True
  return set_config(config, overrides)


def params_of(config):
  model = create_model(train.model_config_from(config), rngs=nnx.Rngs(0))
  return nnx.state(model, nnx.Param)


def flat(tree):
  """{'blocks.0.attn.rpe_k.table': leaf} (nnx's '.value' suffix dropped)."""
  return {
      optim.path_str(p).removesuffix('.value'): v
      for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.mark.parametrize('shared', [True, False])
def test_irpe_tables_are_decayed_as_in_the_reference(shared):
  config = tiny_config(**{'model.rpe.shared_heads': shared})
  mask = flat(optim.decay_mask(params_of(config)))
  tables = [
      n
      for n in mask
      if n.endswith(('rpe_q.table', 'rpe_k.table', 'rpe_v.table'))
  ]
  assert len(tables) == 3
  assert all(mask[n] for n in tables)
  # Still exempt: DeiT's no_weight_decay set and 1-D parameters.
  assert not mask['pos_embed'] and not mask['cls_token']
  assert not any(mask[n] for n in mask if n.endswith('.bias'))
  assert mask['blocks.0.attn.q.kernel']
  # The switch restores the old exemption of the tables only.
  old = flat(optim.decay_mask(params_of(config), rpe_weight_decay=False))
  assert not any(old[n] for n in tables)
  assert {n for n in old if old[n]} == {n for n in mask if mask[n]} - set(
      tables
  )


def test_swin_style_bias_tables_stay_exempt():
  mask = flat(
      optim.decay_mask(params_of(tiny_config(**{'model.rpe.kind': 'bias'})))
  )
  rpe = [n for n in mask if 'rpe_bias' in n]
  assert rpe and not any(mask[n] for n in rpe)


@pytest.mark.parametrize('rpe_decay', [True, False])
def test_optimizer_shrinks_irpe_tables_with_zero_gradients(rpe_decay):
  """With zero gradients AdamW's only update is the decay: the tables
  shrink by lr * wd exactly when they are decayed (the old mask: never)."""
  config = tiny_config(
      **{'optim.weight_decay': 0.5, 'optim.rpe_weight_decay': rpe_decay}
  )
  tx, schedule = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      train.model_config_from(config).depth,
  )
  params = jax.tree.map(lambda x: jnp.ones_like(x), params_of(config))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr = float(schedule(0))
  assert lr > 0
  updates = flat(updates)
  tables = [n for n in updates if n.endswith('.table')]
  assert len(tables) == 3
  for name in tables:
    expected = -lr * 0.5 if rpe_decay else 0.0
    np.testing.assert_allclose(
        np.asarray(updates[name]), expected, rtol=1e-6, err_msg=name
    )
  # A decayed matrix shrinks either way.
  assert float(np.max(updates['blocks.0.attn.q.kernel'])) < 0


# ----------------------------------------------------------------------------
# The step's metrics.


def test_train_metrics_teacher_figures_on_a_known_batch():
  labels = jnp.array([0, 1, 2, 1])
  # Mixed targets: the second image is mostly class 2 after mixup.
  targets = jnp.array([[1.0, 0, 0], [0, 0.3, 0.7], [0, 0, 1], [0, 1, 0]])
  teacher = jnp.eye(3)[jnp.array([0, 2, 1, 1])] * 4.0
  cls = jnp.eye(3)[jnp.array([0, 2, 2, 0])]
  dist = jnp.eye(3)[jnp.array([0, 2, 1, 1])]
  m = step_lib.train_metrics((cls, dist), labels, targets, teacher, {})
  np.testing.assert_allclose(m['teacher_accuracy'], 0.75)  # vs soft target
  np.testing.assert_allclose(m['teacher_accuracy_label'], 0.5)  # vs labels
  np.testing.assert_allclose(m['teacher_agreement_cls'], 0.5)
  np.testing.assert_allclose(m['teacher_agreement_dist'], 1.0)
  np.testing.assert_allclose(m['teacher_agreement'], 1.0)
  np.testing.assert_allclose(m['accuracy_cls'], 0.5)
  np.testing.assert_allclose(m['accuracy_dist'], 0.5)
  plain = step_lib.train_metrics(cls, labels, targets, None, {})
  assert not any(k.startswith('teacher') for k in plain)


def test_step_metrics_report_rpe_norms_and_the_teacher():
  """Through the jitted step: a teacher equal to the labels is 100% right
  and agrees with each head exactly as often as that head is right; the
  RPE norms are those of the updated tables."""
  config = tiny_config(**{'distill.kind': 'hard'})
  model_cfg = train.model_config_from(config)
  tx, schedule = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      model_cfg.depth,
  )
  mesh = sharding.create_mesh((-1, 1), jax.devices()[:1])
  graphdef, state, _ = train.create_train_state(config, model_cfg, tx, mesh)
  cfg = step_lib.StepConfig.from_config(config, model_cfg)
  step = jax.jit(step_lib.make_train_step(graphdef, tx, cfg, schedule))
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, (8,)).astype(np.int32)
  batch = {
      'image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
      'label': labels,
      'teacher_logits': np.eye(10, dtype=np.float32)[labels] * 5,
  }
  new, m = step(state, batch)
  m = jax.device_get(m)
  assert float(m['teacher_accuracy']) == 1.0
  assert float(m['teacher_agreement_cls']) == float(m['accuracy_cls'])
  assert float(m['teacher_agreement_dist']) == float(m['accuracy_dist'])
  tables = {
      n: np.asarray(v) for n, v in flat(new.params).items() if '.rpe_' in n
  }
  assert len(tables) == 3
  expected = np.sqrt(
      sum(np.sum(v.astype(np.float64) ** 2) for v in tables.values())
  )
  assert expected > 0  # zero-initialised, moved by one update
  np.testing.assert_allclose(m['rpe_norm_block0'], expected, rtol=1e-5)
  np.testing.assert_allclose(m['rpe_norm'], expected, rtol=1e-5)


class RecordingWriter:
  """Stands in for clu's writer: keeps every scalar written."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self.scalars.setdefault(k, []).append((step, float(v)))

  def __getattr__(self, name):  # write_hparams, flush, close...
    return lambda *a, **k: None


def test_training_writes_the_new_metrics(demo_data_dir, tmp_path, monkeypatch):
  """Online teacher, mixup on: the metrics reach the metric writer."""
  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import torch_io
  from drpl_jax.teacher import TeacherConfig, abstract_teacher
  from drpl_jax.teacher import random_state_dict
  # pylint: enable=g-import-not-at-top
  state = random_state_dict(
      abstract_teacher(
          TeacherConfig(arch='resnet18', num_classes=10, image_size=32)
      ),
      0,
  )
  teacher = str(tmp_path / 'resnet18.safetensors')
  torch_io.save_safetensors(state, teacher)
  config = tiny_config(
      **{
          'data.data_dir': demo_data_dir,
          'total_steps': 2,
          'log_every_steps': 1,
          'eval_every_steps': 100,
          'checkpoint_every_steps': 100,
          'mixup.mixup_alpha': 0.8,
          'teacher.arch': 'resnet18',
          'teacher.checkpoint': teacher,
          'teacher.image_size': 32,
          'distill.kind': 'hard',
      }
  )
  writer = RecordingWriter()
  monkeypatch.setattr(train, '_writer', lambda workdir: writer)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  for key in (
      'teacher_accuracy',
      'teacher_accuracy_label',
      'teacher_agreement_cls',
      'teacher_agreement_dist',
      'rpe_norm',
      'rpe_norm_block0',
  ):
    steps = [s for s, _ in writer.scalars.get(key, [])]
    assert steps == [1, 2], (key, writer.scalars.get(key))
  assert all(0 <= v <= 1 for _, v in writer.scalars['teacher_accuracy'])
  assert all(v > 0 for _, v in writer.scalars['rpe_norm'])
