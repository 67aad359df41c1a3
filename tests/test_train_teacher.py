"""Tests of the PyTorch teacher fine-tuning (drpl_jax.pytorch.train_teacher).

On the demo data set (32x32 digits, 10 classes) with ResNet-18 at 32 px and a
few steps; the real training run is marked slow.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

# pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import config_module
from drpl_jax.pytorch import soft_labels
from drpl_jax.pytorch import torch_data
from drpl_jax.pytorch import torch_io
from drpl_jax.pytorch import torchvision_models as tv_models
from drpl_jax.pytorch import train_teacher
from drpl_jax.teacher import load as teacher_load

demo_config = config_module('demo')

pytestmark = pytest.mark.torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(epochs=1, batch_size=8, max_steps_per_epoch=2, eval_limit=16)


@pytest.fixture(autouse=True)
def one_torch_thread():
  """2 shared cores: one intra-op thread is faster and less noisy."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def config(demo_data_dir):
  config = demo_config.get_config()
  config.data.data_dir = demo_data_dir
  config.seed = 3
  return config


def _reference_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
  model = torchvision.models.resnet18(num_classes=num_classes)
  return {
      k: tuple(v.shape)
      for k, v in model.state_dict().items()
      if not k.endswith('num_batches_tracked')
  }


def test_writes_torchvision_state_dict_and_metrics(config, tmp_path):
  out = str(tmp_path / 'teacher.safetensors')
  result = train_teacher.train_teacher(config, 'resnet18', out, **FAST)
  state = torch_io.load_state_dict(out)
  assert {k: v.shape for k, v in state.items()} == _reference_shapes(10)
  # Loads strictly into torchvision's own model.
  model = torchvision.models.resnet18(num_classes=10)
  model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=True
  )
  with open(tmp_path / 'teacher.json') as f:
    written = json.load(f)
  assert written['sha256'] == soft_labels.sha256_file(out)
  assert written['arch'] == 'resnet18' and written['seed'] == 3
  assert written['class_names'] == [str(d) for d in range(10)]
  assert written['dataset']['name'] == 'demo'
  assert written['dataset']['version'] == result['dataset']['version']
  assert written['image_size'] == 32
  assert written['mean'] == list(config.teacher.mean)
  assert written['std'] == list(config.teacher.std)
  assert written['epochs'] == 1 and written['best_epoch'] == 1
  val = written['validation']
  assert set(val['sensitivity']) == set(written['class_names'])
  assert val['num_examples'] == 16
  assert val['accuracy'] == pytest.approx(
      np.trace(val['confusion_matrix']) / 16
  )
  assert written['init'] is None
  assert len(written['history']) == 1
  assert written['history'][0]['steps'] == 2


def test_output_converts_to_the_flax_teacher(config, tmp_path):
  out = str(tmp_path / 'teacher.safetensors')
  train_teacher.train_teacher(config, 'resnet18', out, **FAST)
  flax_teacher = teacher_load.torch_teacher('resnet18', out, 10, image_size=32)
  model = torchvision.models.resnet18(num_classes=10).eval()
  state = torch_io.load_state_dict(out)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3))
  mean = np.asarray(config.teacher.mean)
  std = np.asarray(config.teacher.std)
  x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2))
  with torch.no_grad():
    expected = model(x.float()).numpy()
  got = np.asarray(flax_teacher(images.astype(np.float32)))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_deterministic_for_a_seed(config, tmp_path):
  shas = []
  for name, seed in (('a', 3), ('b', 3), ('c', 4)):
    config.seed = seed
    result = train_teacher.train_teacher(
        config, 'resnet18', str(tmp_path / f'{name}.safetensors'), **FAST
    )
    shas.append(result['sha256'])
  assert shas[0] == shas[1]
  assert shas[0] != shas[2]


def _save_resnet18(path, num_classes: int, seed: int) -> dict:
  torch.manual_seed(seed)
  state = {
      k: v.numpy().copy()
      for k, v in torchvision.models.resnet18(num_classes=num_classes)
      .state_dict()
      .items()
  }
  torch_io.save_safetensors(state, path)
  return state


@pytest.mark.parametrize('init_classes', [4, 10])
def test_init_loads_weights_and_reinitialises_a_different_head(
    config, tmp_path, init_classes
):
  init = str(tmp_path / 'imagenet_like.safetensors')
  init_state = _save_resnet18(init, init_classes, seed=11)
  out = str(tmp_path / 'teacher.safetensors')
  # lr=0: the weights stay what the init gave (BN statistics still move).
  result = train_teacher.train_teacher(
      config, 'resnet18', out, init=init, lr=0.0, **FAST
  )
  state = torch_io.load_state_dict(out)
  np.testing.assert_array_equal(
      state['conv1.weight'], init_state['conv1.weight']
  )
  np.testing.assert_array_equal(
      state['layer4.1.conv2.weight'], init_state['layer4.1.conv2.weight']
  )
  assert state['fc.weight'].shape == (10, 512)
  report = result['init']
  assert report['sha256'] == soft_labels.sha256_file(init)
  assert report['checkpoint_num_classes'] == init_classes
  if init_classes == 10:
    assert report['head_reinitialised'] is False
    np.testing.assert_array_equal(state['fc.weight'], init_state['fc.weight'])
  else:
    assert report['head_reinitialised'] is True
    assert 'fc' in report['note'] and '4 classes' in report['note']
  with open(tmp_path / 'teacher.json') as f:
    assert json.load(f)['init'] == report


def _state(num_classes: int = 10) -> dict:
  return {
      k: v.numpy().copy()
      for k, v in torchvision.models.resnet18(num_classes=num_classes)
      .state_dict()
      .items()
  }


@pytest.mark.parametrize(
    'edit, match',
    [
        (
            lambda s: s.pop('layer1.0.conv1.weight'),
            r'missing keys \[.layer1\.0\.conv1\.weight',
        ),
        (
            lambda s: s.update(extra_thing=np.zeros(3)),
            r'unexpected keys \[.extra_thing',
        ),
        (
            lambda s: s.update(
                {'layer2.0.conv1.weight': np.zeros((1, 1, 3, 3))}
            ),
            r'layer2\.0\.conv1\.weight: file \(1, 1, 3, 3\)',
        ),
    ],
)
def test_load_state_names_bad_keys(edit, match):
  state = _state()
  edit(state)
  model = tv_models.build_model('resnet18', 10)
  with pytest.raises(ValueError, match=match):
    tv_models.load_state(
        model, state, arch='resnet18', path='ck.pth', reinit_head=True
    )


def test_load_state_refuses_other_head_unless_reinit():
  model = tv_models.build_model('resnet18', 10)
  with pytest.raises(ValueError, match=r'fc\.weight: file \(4, 512\)'):
    tv_models.load_state(model, _state(4), arch='resnet18')


def test_init_with_missing_key_fails_before_training(config, tmp_path):
  init = str(tmp_path / 'bad.safetensors')
  state = _state()
  del state['bn1.running_var']
  torch_io.save_safetensors(state, init)
  out = tmp_path / 'never.safetensors'
  with pytest.raises(ValueError, match=r'bad\.safetensors.*bn1\.running_var'):
    train_teacher.train_teacher(config, 'resnet18', str(out), init=init, **FAST)
  assert not out.exists()


def test_densenet_legacy_names_are_accepted():
  model = tv_models.build_model('densenet121', 10)
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  legacy = {
      k.replace('denselayer1.norm1.', 'denselayer1.norm.1.'): v
      for k, v in state.items()
  }
  assert legacy != state
  fresh = tv_models.build_model('densenet121', 10)
  report = tv_models.load_state(fresh, legacy, arch='densenet121')
  assert report['renamed_keys'] > 0
  key = 'features.denseblock1.denselayer1.norm1.weight'
  np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), state[key])


def test_bad_input_errors(config, tmp_path):
  out = str(tmp_path / 't.safetensors')
  with pytest.raises(ValueError, match=r"'resnet7'.*'resnet18'"):
    train_teacher.train_teacher(config, 'resnet7', out, **FAST)
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(PermissionError, match='a_file'):
    train_teacher.train_teacher(
        config, 'resnet18', str(blocker / 't.safetensors'), **FAST
    )
  with pytest.raises(ValueError, match=r'teacher\.pth.*\.safetensors'):
    train_teacher.train_teacher(
        config, 'resnet18', str(tmp_path / 'teacher.pth'), **FAST
    )
  config.model.num_classes = 4
  with pytest.raises(ValueError, match='num_classes=4.*10 classes'):
    train_teacher.train_teacher(config, 'resnet18', out, **FAST)


def test_views_resize_like_torchvision_and_crop_reproducibly():
  v2 = pytest.importorskip('torchvision.transforms.v2.functional')
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
  expected = v2.normalize(v2.resize(chw, [24, 24], antialias=True), mean, std)
  got = torch_data.eval_view(image, 24, mean, std)
  torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

  source = [{'image': image, 'label': 1, 'id': 'x'}] * 3
  data = torch_data.TeacherDataset(
      source, image_size=24, mean=mean, std=std, train=True, seed=5
  )
  first = data[2]['image']
  torch.testing.assert_close(data[2]['image'], first)  # Same (epoch, index).
  assert not torch.equal(data[1]['image'], first)  # Other index.
  data.set_epoch(1)
  assert not torch.equal(data[2]['image'], first)  # Other epoch.


def test_student_view_is_the_students_train_transform(config, tmp_path):
  """augment='student' trains on the student's RandAugment'ed crops."""
  from drpl_jax.input import augment  # pylint: disable=g-import-not-at-top

  image = np.random.default_rng(1).integers(0, 256, (40, 30, 3), np.uint8)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  recipe = augment.AugmentConfig(
      crop_scale=(0.35, 1.0), randaugment_magnitude=5.0, random_erase=0.0
  )
  data = torch_data.TeacherDataset(
      [{'image': image, 'label': 0, 'id': 'x'}] * 2,
      image_size=24,
      mean=mean,
      std=std,
      train=True,
      seed=5,
      student=recipe,
  )
  view = augment.train_transform(
      image, np.random.default_rng([5, 0, 1]), size=24, config=recipe
  )
  expected = torch_data.normalise(torch_data.to_float_chw(view), mean, std)
  torch.testing.assert_close(data[1]['image'], expected)
  lite = torch_data.train_view(
      image, 24, mean, std, np.random.default_rng([5, 0, 1])
  )
  assert not torch.equal(data[1]['image'], lite)

  config.data.augment.randaugment_ops = 2
  out = str(tmp_path / 's.safetensors')
  result = train_teacher.train_teacher(
      config, 'resnet18', out, augment='student', **FAST
  )
  assert result['hparams']['augment'] == 'student'
  assert result['hparams']['student_augment']['randaugment_ops'] == 2
  with pytest.raises(ValueError, match="augment='strong'"):
    train_teacher.train_teacher(
        config, 'resnet18', out, augment='strong', **FAST
    )


def test_cli(demo_data_dir, tmp_path):
  out = tmp_path / 'cli.safetensors'
  env = dict(os.environ, OMP_NUM_THREADS='1')
  common = [
      sys.executable,
      '-m',
      'drpl_jax.train_teacher',
      '--config=configs/demo.py',
      f'--config.data.data_dir={demo_data_dir}',
      f'--out={out}',
  ]
  run = subprocess.run(
      common
      + [
          '--arch=resnet18',
          '--epochs=1',
          '--batch_size=8',
          '--max_steps_per_epoch=1',
          '--image_size=16',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert '[train_teacher] epoch 1/1 loss' in run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary['sha256'] == soft_labels.sha256_file(str(out))
  with open(tmp_path / 'cli.json') as f:
    assert json.load(f)['image_size'] == 16
  bad = subprocess.run(
      common + ['--arch=resnet7'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert bad.returncode != 0
  assert "unknown teacher arch 'resnet7'" in bad.stderr
  assert 'Traceback' not in bad.stderr


@pytest.mark.slow
def test_short_training_beats_chance(config, tmp_path):
  result = train_teacher.train_teacher(
      config,
      'resnet18',
      str(tmp_path / 't.safetensors'),
      epochs=3,
      batch_size=32,
      lr=2e-3,
  )
  # Chance is 0.1 on the 10 balanced digit classes.
  assert result['validation']['accuracy'] > 0.6, result['history']
  assert (
      result['best_epoch']
      == max(
          result['history'], key=lambda h: (h['val_accuracy'], -h['val_loss'])
      )['epoch']
  )
