"""Tests of the offline teacher (drpl_jax.pytorch.soft_labels) on the demo data set."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from drpl_jax.pytorch import soft_labels
from drpl_jax.teacher import load as teacher_load

pytestmark = pytest.mark.torch  # Every file here is written with torch.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = tuple(str(d) for d in range(10))
SPLITS = ('validation', 'test')

# A tiny teacher as a user's own module (for --module and --torchscript).
TINY_MODULE = """
import torch


class Tiny(torch.nn.Module):

  def __init__(self, num_classes=10):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
    self.fc = torch.nn.Linear(4, num_classes)

  def forward(self, x):
    return self.fc(self.conv(x).mean(dim=(2, 3)))


def build():
  torch.manual_seed(0)
  return Tiny()


def build_seven():
  return Tiny(num_classes=7)


def not_a_module():
  return 3
"""


@pytest.fixture(scope='module')
def torch():
  torch = pytest.importorskip('torch')
  pytest.importorskip('torchvision')
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch
  torch.set_num_threads(threads)


@pytest.fixture
def config(demo_data_dir):
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  demo_config = config_module('demo')
  config = demo_config.get_config()
  config.data.data_dir = demo_data_dir
  return config


@pytest.fixture(scope='module')
def checkpoint(torch, tmp_path_factory):
  """A ResNet-18 state dict with 10 classes (random but fixed weights)."""
  import torchvision  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import torch_io  # pylint: disable=g-import-not-at-top

  torch.manual_seed(1)
  model = torchvision.models.resnet18(num_classes=10)
  path = str(tmp_path_factory.mktemp('ckpt') / 'teacher.safetensors')
  torch_io.save_safetensors(
      {k: v.numpy().copy() for k, v in model.state_dict().items()}, path
  )
  return path


@pytest.fixture
def npz(config, checkpoint, tmp_path):
  out = str(tmp_path / 'labels.npz')
  metadata = soft_labels.write_soft_labels(
      config,
      out,
      arch='resnet18',
      checkpoint=checkpoint,
      splits=SPLITS,
      batch_size=64,
  )
  return out, metadata


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
  folder = tmp_path / 'user_code'
  folder.mkdir()
  (folder / 'tiny_teacher.py').write_text(textwrap.dedent(TINY_MODULE))
  monkeypatch.syspath_prepend(str(folder))
  sys.modules.pop('tiny_teacher', None)
  yield str(folder)
  sys.modules.pop('tiny_teacher', None)


def _examples(config, split):
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  source = data.get_source(config.data, split)
  return [source[i] for i in range(len(source))]


def _torch_logits(torch, model, config, examples):
  """The model's own output on the eval view of each example, one by one."""
  from drpl_jax.pytorch import torch_data  # pylint: disable=g-import-not-at-top

  model.eval()
  out = []
  with torch.no_grad():
    for example in examples:
      x = torch_data.eval_view(
          example['image'],
          config.teacher.image_size,
          config.teacher.mean,
          config.teacher.std,
      )
      out.append(model(x[None])[0].numpy())
  return np.stack(out)


def test_ids_cover_the_splits_exactly_once(npz, config, checkpoint):
  out, metadata = npz
  with np.load(out, allow_pickle=False) as f:
    ids, splits = list(f['ids']), list(f['splits'])
    assert f['logits'].dtype == np.float32
    assert f['logits'].shape == (len(ids), 10)
  assert len(ids) == len(set(ids))
  for split in SPLITS:
    expected = sorted(e['id'] for e in _examples(config, split))
    assert sorted(i for i, s in zip(ids, splits) if s == split) == expected
    assert metadata['num_examples'][split] == len(expected)
  assert set(splits) == set(SPLITS)
  assert metadata['teacher'] == {
      'kind': 'arch',
      'arch': 'resnet18',
      'file': os.path.abspath(checkpoint),
      'sha256': soft_labels.sha256_file(checkpoint),
  }
  assert metadata['class_names'] == list(CLASSES)
  assert metadata['dataset']['name'] == 'demo'
  assert metadata['image_size'] == 32
  assert metadata['mean'] == list(config.teacher.mean)
  assert metadata['created'].endswith('+00:00')


def test_logits_equal_the_torch_model_output(torch, npz, config, checkpoint):
  import torchvision  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import torch_io  # pylint: disable=g-import-not-at-top

  labels = soft_labels.SoftLabels.load(npz[0], class_names=CLASSES)
  model = torchvision.models.resnet18(num_classes=10)
  model.load_state_dict(
      {
          k: torch.from_numpy(v)
          for k, v in torch_io.load_state_dict(checkpoint).items()
      }
  )
  examples = (
      _examples(config, 'test')[:2] + _examples(config, 'validation')[5:6]
  )
  expected = _torch_logits(torch, model, config, examples)
  got = labels.lookup([e['id'] for e in examples])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  assert not np.allclose(got[0], got[1])  # Really per-example.


def test_safetensors_format_matches_npz(npz, config, checkpoint, tmp_path):
  out = str(tmp_path / 'labels.safetensors')
  soft_labels.write_soft_labels(
      config, out, arch='resnet18', checkpoint=checkpoint, splits=('test',)
  )
  a = soft_labels.SoftLabels.load(out, class_names=CLASSES)
  b = soft_labels.SoftLabels.load(npz[0], class_names=CLASSES)
  assert len(a) == npz[1]['num_examples']['test']
  assert set(a.splits) == {'test'}
  np.testing.assert_allclose(a.lookup(a.ids), b.lookup(a.ids), atol=1e-6)
  assert a.metadata['teacher'] == b.metadata['teacher']


def test_load_refuses_wrong_classes_and_missing_ids(npz):
  path = npz[0]
  with pytest.raises(ValueError, match=r'labels\.npz.*10 classes.*has 4'):
    soft_labels.SoftLabels.load(path, class_names=['a', 'b', 'c', 'd'])
  with pytest.raises(ValueError, match=r'labels\.npz: class names'):
    soft_labels.SoftLabels.load(path, class_names=CLASSES[::-1])
  labels = soft_labels.SoftLabels.load(path, class_names=CLASSES)
  expected = labels.ids[:3] + ['9/digit-9998', '9/digit-9999']
  with pytest.raises(
      ValueError, match=r"labels\.npz: 2 of 5 ids .*'9/digit-9998'"
  ):
    soft_labels.SoftLabels.load(
        path, class_names=CLASSES, expected_ids=expected
    )
  with pytest.raises(KeyError, match='nope'):
    labels.lookup(['nope'])
  assert labels.lookup([]).shape == (0, 10)
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    soft_labels.SoftLabels.load(path + '.missing.npz', class_names=CLASSES)


def test_loading_needs_no_torch(npz):
  code = (
      'import sys; from drpl_jax.pytorch.soft_labels import SoftLabels; '
      f'l = SoftLabels.load({npz[0]!r}, class_names={list(CLASSES)!r}); '
      'l.lookup(l.ids[:4]); assert "torch" not in sys.modules, "torch"'
  )
  run = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-2000:]


def test_module_teacher_via_cli(
    torch, config, tiny_module, demo_data_dir, tmp_path
):
  out = tmp_path / 'module.npz'
  env = dict(os.environ, PYTHONPATH=tiny_module, OMP_NUM_THREADS='1')
  run = subprocess.run(
      [
          sys.executable,
          '-m',
          'drpl_jax.soft_labels',
          '--config=configs/demo.py',
          f'--config.data.data_dir={demo_data_dir}',
          f'--out={out}',
          '--module=tiny_teacher:build',
          '--splits=validation',
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  printed = json.loads(run.stdout.strip().splitlines()[-1])
  assert printed['teacher']['kind'] == 'module'
  assert printed['teacher']['module'] == 'tiny_teacher:build'
  import tiny_teacher  # pylint: disable=g-import-not-at-top,import-error

  labels = soft_labels.SoftLabels.load(str(out), class_names=CLASSES)
  examples = _examples(config, 'validation')[:3]
  expected = _torch_logits(torch, tiny_teacher.build(), config, examples)
  np.testing.assert_allclose(
      labels.lookup([e['id'] for e in examples]), expected, atol=1e-5, rtol=1e-5
  )


def test_torchscript_teacher(torch, config, tiny_module, tmp_path):
  import tiny_teacher  # pylint: disable=g-import-not-at-top,import-error

  model = tiny_teacher.build().eval()
  path = str(tmp_path / 'tiny.pt')
  with warnings.catch_warnings():  # torch.jit is deprecated upstream.
    warnings.simplefilter('ignore', FutureWarning)
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 32, 32)), path)
  out = str(tmp_path / 'ts.npz')
  metadata = soft_labels.write_soft_labels(
      config, out, torchscript=path, splits=('test',), batch_size=50
  )
  assert metadata['teacher']['kind'] == 'torchscript'
  assert metadata['teacher']['sha256'] == soft_labels.sha256_file(path)
  labels = soft_labels.SoftLabels.load(out, class_names=CLASSES)
  examples = _examples(config, 'test')[-2:]
  expected = _torch_logits(torch, model, config, examples)
  np.testing.assert_allclose(
      labels.lookup([e['id'] for e in examples]), expected, atol=1e-5, rtol=1e-5
  )


def test_bad_teachers_are_refused(
    torch, config, tiny_module, checkpoint, tmp_path
):
  out = str(tmp_path / 'x.npz')

  def write(**teacher):
    return soft_labels.write_soft_labels(
        config, out, splits=('test',), **teacher
    )

  with pytest.raises(ValueError, match='not a torch.nn.Module'):
    write(module='tiny_teacher:not_a_module')
  with pytest.raises(ValueError, match='gives 7 logits.*10 classes'):
    write(module='tiny_teacher:build_seven')
  with pytest.raises(ValueError, match='no attribute'):
    write(module='tiny_teacher:nothing_here')
  with pytest.raises(ValueError, match='pkg.mod:callable'):
    write(module='tiny_teacher')
  with pytest.raises(ValueError, match='exactly one teacher'):
    write(arch='resnet18', checkpoint=checkpoint, module='tiny_teacher:build')
  with pytest.raises(ValueError, match='goes with --arch'):
    write(module='tiny_teacher:build', checkpoint=checkpoint)
  with pytest.raises(ValueError, match='needs --checkpoint'):
    write(arch='resnet18')
  with pytest.raises(ValueError, match=r"unknown teacher arch 'resnet7'"):
    write(arch='resnet7', checkpoint=checkpoint)
  not_ts = tmp_path / 'not_torchscript.pt'
  not_ts.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='not_torchscript.pt'):
    write(torchscript=str(not_ts))
  with pytest.raises(ValueError, match=r'x\.csv.*\.npz'):
    soft_labels.write_soft_labels(
        config, str(tmp_path / 'x.csv'), module='tiny_teacher:build'
    )
  assert not os.path.exists(out)


def test_offline_logits_match_the_converted_online_teacher(
    npz, config, checkpoint
):
  """The offline eval view equals what the Flax teacher computes in-step."""
  out, metadata = npz
  labels = soft_labels.SoftLabels.load(out, class_names=CLASSES)
  flax_teacher = teacher_load.torch_teacher(
      'resnet18',
      checkpoint,
      10,
      image_size=metadata['image_size'],
      mean=metadata['mean'],
      std=metadata['std'],
  )
  examples = _examples(config, 'validation')[:4]
  images = np.stack([e['image'] for e in examples]).astype(np.float32) / 255
  got = np.asarray(flax_teacher(images))  # [4, 32, 32, 3] in [0, 1]
  np.testing.assert_allclose(
      got, labels.lookup([e['id'] for e in examples]), atol=1e-4, rtol=1e-4
  )
