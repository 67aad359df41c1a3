"""Real chest X-rays: the Kaggle sample through the real builder and training.

Reads ../shared/data/covid19_radiography_sample (COVID and Normal, 300 each).
"""

import os

import pytest

from conftest import config_module
from conftest import SHARED_DATA
from drpl_jax import data
from drpl_jax.evaluation import evaluate
from drpl_jax.train import loop as train

drpl_vit = config_module('drpl_vit')

SAMPLE = os.path.join(SHARED_DATA, 'covid19_radiography_sample')
pytestmark = pytest.mark.skipif(
    not os.path.isdir(SAMPLE), reason=f'{SAMPLE} not present'
)


def sample_config(data_dir, steps):
  config = drpl_vit.get_config('variant=micro,preset=drpl,runlocal')
  config.data.name = 'covid19_radiography'
  config.data.manual_dir = SAMPLE
  config.data.classes = 'COVID,Normal'
  config.data.data_dir = data_dir
  config.model.num_classes = 2
  config.distill.kind = 'none'
  config.total_steps = steps
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  return config


@pytest.mark.slow
def test_sample_trains_above_chance(tmp_path):
  config = sample_config(str(tmp_path / 'data'), steps=300)
  info = data.ensure_prepared(config.data)
  assert info.class_names == ('COVID', 'Normal')
  assert sum(info.num_examples.values()) == 600
  assert info.num_examples['test'] == 60
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  report = evaluate.evaluate(config, workdir, n_bootstrap=200)
  assert report['num_examples'] == 60
  # Chance is 0.5; a working pipeline on real X-rays is well above it.
  assert report['accuracy'] >= 0.65, report['accuracy']
  assert report['ci95']['accuracy'][0] > 0.5
