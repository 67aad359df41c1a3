"""Shortcut probes and the attention-rollout summary (drpl_jax/evaluation/probes.py)."""

import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import config_module
from drpl_jax.evaluation import probes
from drpl_jax.models import create_model
from drpl_jax.train import loop as train
from drpl_jax.train import step as step_lib

demo_config_lib = config_module('demo')

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_box_geometry_and_mask_value():
  inside = probes.box_mask(10, 20, (0.1, 0.9, 0.25, 0.75))
  assert inside.sum() == 8 * 10
  assert inside[1, 5] and not inside[0, 5] and not inside[1, 4]
  grid = probes.grid_box_mask(4, 4, probes.DEFAULT_LUNG_BOX)
  assert grid.sum() == 16  # every patch centre (1/8 .. 7/8) is inside
  assert probes.grid_box_mask(10, 10, probes.DEFAULT_LUNG_BOX).sum() == 64
  images = np.random.default_rng(0).integers(0, 256, (2, 10, 20, 3), np.uint8)
  masked = probes.mask_images(images, inside, MEAN)
  normed = np.asarray(step_lib.normalize(masked, MEAN, STD))
  np.testing.assert_allclose(normed[:, ~inside], 0.0, atol=1e-6)
  np.testing.assert_allclose(
      masked[:, inside], images[:, inside] / 255.0, atol=1e-7
  )


def test_bad_box_is_named():
  config = ml_collections.ConfigDict(
      {'probes': {'lung_box': (0.5, 0.2, 0.1, 0.9)}}
  )
  with pytest.raises(ValueError, match='lung_box'):
    probes.probe_settings(config)
  # Older configs without a `probes` section get the documented defaults.
  defaults = probes.probe_settings(ml_collections.ConfigDict({}))
  assert defaults['lung_box'] == probes.DEFAULT_LUNG_BOX
  assert defaults['enabled']


def test_flag_rule():
  assert probes.shortcut_flag(0.95, 0.90, 0.5, 0.1, 0.15)
  assert not probes.shortcut_flag(0.95, 0.80, 0.5, 0.1, 0.15)  # drops
  assert not probes.shortcut_flag(0.70, 0.62, 0.5, 0.1, 0.15)  # near chance


class RegionModel:
  """An 'evaluator' that reads the class from one region's brightness."""

  def __init__(self, region: np.ndarray):
    self.region = region

  def predict(self, batches, params_key='params'):
    del params_key
    logits, labels = [], []
    for b in batches:
      x = np.asarray(b['image'], np.float32)
      x = x / 255.0 if b['image'].dtype == np.uint8 else x
      bright = x[:, self.region].mean(axis=(1, 2)) - 0.6  # [B]
      logits.append(np.stack([-bright, bright], axis=1) * 10)
      labels.append(b['label'])
    return {'mean': np.concatenate(logits)}, np.concatenate(labels), None


def _batches(size=20, n=16):
  """Class 1 images are bright both in the box and on the border."""
  rng = np.random.default_rng(0)
  labels = np.arange(n) % 2
  images = np.where(labels[:, None, None, None] == 1, 230, 60).astype(
      np.uint8
  ) * np.ones((n, size, size, 3), np.uint8)
  images = np.clip(
      images.astype(int) + rng.integers(-10, 10, images.shape), 0, 255
  ).astype(np.uint8)
  return [
      {'image': images[:8], 'label': labels[:8]},
      {'image': images[8:], 'label': labels[8:]},
  ]


@pytest.mark.parametrize('reads_border', [True, False])
def test_probes_flag_a_border_reader_only(reads_border):
  config = ml_collections.ConfigDict({'data': {'mean': MEAN}})
  inside = probes.box_mask(20, 20, probes.DEFAULT_LUNG_BOX)
  model = RegionModel(~inside if reads_border else inside)
  batches = _batches()
  logits, labels, _ = model.predict(batches)
  assert np.mean(logits['mean'].argmax(1) == labels) == 1.0
  report = {'accuracy': 1.0, 'balanced_accuracy': 1.0, 'macro': {'auc': 1.0}}
  out = probes.shortcut_probes(
      config,
      model,
      report,
      ['a', 'b'],
      labels,
      lambda ev: ev.predict(batches)[:2],
  )
  assert out['chance'] == 0.5
  hidden, only = out['lungs_hidden'], out['lungs_only']
  if reads_border:
    assert hidden['accuracy'] == 1.0 and only['accuracy'] == 0.5
    assert out['shortcut_flag']
  else:
    assert hidden['accuracy'] == 0.5 and only['accuracy'] == 1.0
    assert not out['shortcut_flag']
  md = '\n'.join(probes.markdown({'probes': out}))
  assert ('FLAG: possible shortcut learning' in md) == reads_border
  assert 'lungs hidden' in md and 'lungs only' in md


def test_rollout_summary_on_a_model():
  config = demo_config_lib.get_config('steps=1')
  config.model.depth = 1
  model_cfg = train.model_config_from(config)
  graphdef, params, rest = nnx.split(
      create_model(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...
  )
  rng = np.random.default_rng(0)
  batches = [
      {
          'image': rng.integers(0, 256, (4, 32, 32, 3), np.uint8),
          'label': np.zeros(4, np.int32),
          'mask': np.array([1, 1, 1, 0]),
      }
  ]
  out = probes.rollout_summary(config, graphdef, params, rest, batches)
  assert out['num_images'] == 3  # padding left out
  assert out['box_patch_fraction'] == 36 / 64  # 8x8 grid, central 6x6
  assert 0 < out['lung_share_mean'] < 1
  config.probes.lung_box = (0.0, 1.0, 0.0, 1.0)  # the whole image
  full = probes.rollout_summary(config, graphdef, params, rest, batches)
  np.testing.assert_allclose(full['lung_share_mean'], 1.0, rtol=1e-9)
  assert full['box_patch_fraction'] == 1.0
