"""External validation: a trained model evaluated on another site's folder."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import config_module
from drpl_jax import data
from drpl_jax.evaluation import evaluate
from drpl_jax.train import loop as train

demo_config_lib = config_module('demo')


@pytest.fixture(scope='module')
def trained(demo_data_dir, tmp_path_factory):
  config = demo_config_lib.get_config('steps=2')
  config.data.data_dir = demo_data_dir
  config.model.depth = 1
  config.batch_size = 8
  config.eval_every_steps = 100
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def write_folder(config, root, classes, per_class=4):
  """Writes demo test images of `classes` as PNG folders (another 'site')."""
  source = data.get_source(config.data, 'test')
  counts = {c: 0 for c in classes}
  for i in range(len(source)):
    ex = source[i]
    name = str(ex['label'])
    if name in counts and counts[name] < per_class:
      folder = os.path.join(root, name)
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(ex['image']).save(os.path.join(folder, f'{i}.png'))
      counts[name] += 1
  return sum(counts.values())


def test_external_folder_with_a_subset_of_classes(trained, tmp_path):
  config, workdir = trained
  site = tmp_path / 'hospital_b'
  n = write_folder(config, str(site), ['3', '7'])
  report = evaluate.evaluate(
      config, workdir, data=f'cxr_folder:{site}', n_bootstrap=20
  )
  path = os.path.join(workdir, 'eval', 'hospital_b', 'report.json')
  with open(path) as f:
    on_disk = json.load(f)
  assert on_disk['num_examples'] == report['num_examples'] == n == 8
  # Labels are mapped onto the training classes: only rows 3 and 7 filled.
  cm = np.asarray(on_disk['confusion_matrix'])
  assert cm.shape == (10, 10)
  assert cm[3].sum() == 4 and cm[7].sum() == 4 and cm.sum() == 8
  assert on_disk['class_names'] == [str(i) for i in range(10)]


def test_unknown_class_folder_is_named(trained, tmp_path):
  config, workdir = trained
  site = tmp_path / 'site_c'
  write_folder(config, str(site), ['1'])
  os.makedirs(site / 'Pneumothorax')
  with pytest.raises(ValueError, match='Pneumothorax'):
    evaluate.evaluate(config, workdir, data=f'cxr_folder:{site}')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    evaluate.evaluate(config, workdir, data=f'cxr_folder:{tmp_path}/nope')


def test_probes_and_attention_in_the_report(trained):
  config, workdir = trained
  report = evaluate.evaluate(config, workdir, n_bootstrap=0)
  out = os.path.join(workdir, 'eval', config.data.test_split)
  with open(os.path.join(out, 'report.json')) as f:
    on_disk = json.load(f)
  for name in ('lungs_hidden', 'lungs_only'):
    assert 0 <= on_disk['probes'][name]['accuracy'] <= 1
  assert on_disk['probes']['normal']['accuracy'] == report['accuracy']
  assert isinstance(on_disk['probes']['shortcut_flag'], bool)
  assert on_disk['attention']['num_images'] == report['num_examples']
  with open(os.path.join(out, 'report.md')) as f:
    md = f.read()
  assert '## Shortcut probes' in md and '## Attention rollout' in md


def test_external_folder_reports_the_teacher(trained, tmp_path):
  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import torch_io
  from drpl_jax.teacher import TeacherConfig, abstract_teacher
  from drpl_jax.teacher import random_state_dict
  # pylint: enable=g-import-not-at-top
  config, workdir = trained
  state = random_state_dict(
      abstract_teacher(
          TeacherConfig(arch='resnet18', num_classes=10, image_size=32)
      ),
      0,
  )
  path = str(tmp_path / 'resnet18.safetensors')
  torch_io.save_safetensors(state, path)
  config = config.copy_and_resolve_references()
  config.teacher.arch, config.teacher.checkpoint = 'resnet18', path
  config.teacher.image_size = 32
  config.probes.enabled = False
  site = tmp_path / 'hospital_t'
  write_folder(config, str(site), ['3', '7'])
  report = evaluate.evaluate(
      config, workdir, data=f'cxr_folder:{site}', n_bootstrap=0
  )
  assert report['teacher']['num_examples'] == 8
  assert 0 <= report['teacher']['accuracy'] <= 1
  assert 'probes' not in report
