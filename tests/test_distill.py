"""Distillation inside training: the online teacher and offline soft labels."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import config_module
from drpl_jax.evaluation import evaluate
from drpl_jax.parallel import sharding
from drpl_jax.pytorch import soft_labels
from drpl_jax.pytorch import torch_io
from drpl_jax.teacher import TeacherConfig, abstract_teacher, random_state_dict
from drpl_jax.train import loop as train
from drpl_jax.train import mixup as mixup_lib
from drpl_jax.train import optim
from drpl_jax.train import step as step_lib

demo_config_lib = config_module('demo')


def tiny_config(data_dir, steps=2):
  config = demo_config_lib.get_config(f'steps={steps}')
  config.data.data_dir = data_dir
  config.model.depth = 1
  config.batch_size = 8
  config.eval_batch_size = 64
  config.log_every_steps = 1
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.optim.warmup_steps = 1
  config.mixup.mixup_alpha = 0.8
  config.mixup.cutmix_alpha = 1.0
  return config


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory):
  """A resnet18 teacher for 10 classes, random torchvision-style weights."""
  cfg = TeacherConfig(arch='resnet18', num_classes=10, image_size=32)
  state = random_state_dict(abstract_teacher(cfg), 0)
  path = str(tmp_path_factory.mktemp('teacher') / 'resnet18.safetensors')
  torch_io.save_safetensors(state, path)
  return path


def with_teacher(config, checkpoint, kind='hard'):
  config.teacher.arch = 'resnet18'
  config.teacher.checkpoint = checkpoint
  config.teacher.image_size = 32
  config.distill.kind = kind
  return config


@pytest.fixture
def online(demo_data_dir, teacher_checkpoint):
  """(train state, online teacher, step config) of the tiny distilled run."""
  config = with_teacher(tiny_config(demo_data_dir), teacher_checkpoint)
  model_cfg = train.model_config_from(config)
  mesh = sharding.create_mesh((-1, 1))
  tx, _ = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      model_cfg.depth,
  )
  _, state, _ = train.create_train_state(config, model_cfg, tx, mesh)
  teacher = train.create_online_teacher(config, mesh)
  cfg = step_lib.StepConfig.from_config(config, model_cfg)
  return state, teacher, cfg


def test_online_teacher_sees_the_mixed_batch(online):
  state, teacher, cfg = online
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
      'label': rng.integers(0, 10, (8,), np.int32),
  }
  images, targets, logits, _ = jax.jit(
      lambda s, b, t: step_lib.step_inputs(cfg, s, b, teacher.graphdef, t)
  )(state, batch, teacher.state)
  # Independently: the same key derivation, mixup, then the teacher.
  key = jax.random.fold_in(state.rng, state.step)
  mix_key, _ = jax.random.split(key)
  expected_images, expected_targets = mixup_lib.mixup_cutmix(
      mix_key,
      batch['image'].astype(np.float32) / 255.0,
      jax.nn.one_hot(batch['label'], 10),
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
  )
  module = nnx.merge(teacher.graphdef, teacher.state)
  np.testing.assert_allclose(images, expected_images, atol=1e-6)
  np.testing.assert_allclose(targets, expected_targets, atol=1e-6)
  np.testing.assert_allclose(logits, module(expected_images), atol=1e-4)
  # And the batch was really mixed (otherwise the test proves little).
  assert not np.allclose(images, batch['image'] / 255.0)


def test_online_teacher_sees_its_own_view_mixed_alike(online):
  """With a 'teacher_image' in the batch the teacher sees it, mixed by the
  same lambda and box as the student's image; the student is unchanged."""
  state, teacher, cfg = online
  rng = np.random.default_rng(1)
  batch = {
      'image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
      'teacher_image': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
      'label': rng.integers(0, 10, (8,), np.int32),
  }
  inputs = jax.jit(
      lambda s, b, t: step_lib.step_inputs(cfg, s, b, teacher.graphdef, t)
  )
  images, targets, logits, _ = inputs(state, batch, teacher.state)
  mix_key, _ = jax.random.split(jax.random.fold_in(state.rng, state.step))
  mix = lambda x: mixup_lib.mixup_cutmix(
      mix_key,
      x.astype(np.float32) / 255.0,
      jax.nn.one_hot(batch['label'], 10),
      mixup_alpha=0.8,
      cutmix_alpha=1.0,
  )
  module = nnx.merge(teacher.graphdef, teacher.state)
  np.testing.assert_allclose(images, mix(batch['image'])[0], atol=1e-6)
  np.testing.assert_allclose(targets, mix(batch['image'])[1], atol=1e-6)
  np.testing.assert_allclose(
      logits, module(mix(batch['teacher_image'])[0]), atol=1e-4
  )
  without = {k: v for k, v in batch.items() if k != 'teacher_image'}
  _, _, student_view_logits, _ = inputs(state, without, teacher.state)
  assert not np.allclose(logits, student_view_logits, atol=1e-3)


def test_online_distillation_trains(
    demo_data_dir, teacher_checkpoint, tmp_path
):
  config = with_teacher(
      tiny_config(demo_data_dir), teacher_checkpoint, kind='soft'
  )
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 2
  # The teacher is not part of the student's checkpoint.
  meta = json.loads((tmp_path / 'run' / 'meta.json').read_text())
  assert meta['model']['distilled']


def test_distillation_without_teacher_is_an_error(demo_data_dir, tmp_path):
  config = tiny_config(demo_data_dir)
  config.distill.kind = 'hard'
  with pytest.raises(ValueError, match='needs a teacher'):
    train.train_and_evaluate(config, str(tmp_path / 'x'))
  config.teacher.arch = 'resnet18'
  with pytest.raises(ValueError, match='needs config.teacher.checkpoint'):
    train.train_and_evaluate(config, str(tmp_path / 'y'))
  # The no-teacher baseline of a recipe that names its teacher's arch
  # (configs/small_data.py:preset=deit_conv --config.distill.kind=none)
  # trains without one.
  config.distill.kind = 'none'
  assert train.train_and_evaluate(config, str(tmp_path / 'z'))['step'] == 2
  report = evaluate.evaluate(config, str(tmp_path / 'z'), n_bootstrap=0)
  assert 'teacher' not in report and 0 <= report['accuracy'] <= 1


def test_offline_soft_labels_train(demo_data_dir, tmp_path):
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  config = tiny_config(demo_data_dir)
  info = data.ensure_prepared(config.data)
  source = data.get_source(config.data, 'train')
  ids = [source[i]['id'] for i in range(len(source))]
  logits = np.random.default_rng(0).normal(size=(len(ids), 10))
  path = str(tmp_path / 'soft.npz')
  soft_labels.save_soft_labels(
      path,
      ids,
      logits,
      ['train'] * len(ids),
      {
          'class_names': list(info.class_names),
          'teacher': 'test',
          'dataset': {'name': info.name, 'version': info.version},
      },
  )
  config.teacher.soft_labels = path
  config.distill.kind = 'hard'
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 2
  # A file for other classes is refused before training starts.
  bad = str(tmp_path / 'bad.npz')
  soft_labels.save_soft_labels(
      bad,
      ids,
      logits[:, :4],
      ['train'] * len(ids),
      {'class_names': list('abcd')},
  )
  config.teacher.soft_labels = bad
  with pytest.raises(ValueError, match='bad.npz'):
    train.train_and_evaluate(config, str(tmp_path / 'run2'))
