"""Materialisation fences (drpl_jax/models/fence.py) in the model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drpl_jax.models import ConvConfig, ModelConfig, create_model, fence


def config(materialize: str, **changes) -> ModelConfig:
  """A 3-block distilled LeFF model (layer norms) on 16x16 images."""
  base = ModelConfig(
      num_classes=3,
      image_size=16,
      patch_size=4,
      width=32,
      depth=3,
      num_heads=2,
      conv=ConvConfig(kind='leff', norm='layer'),
      materialize=materialize,
  )
  return base.replace(**changes)


def loss_fn(graphdef, params, rest, images, labels):
  model = nnx.merge(graphdef, params, rest)
  cls, dist = model(images, train=True)
  logp = jax.nn.log_softmax(cls) + jax.nn.log_softmax(dist)
  return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()


def split(materialize: str, **changes):
  model = create_model(config(materialize, **changes), rngs=nnx.Rngs(0))
  return nnx.split(model, nnx.Param, ...)


def batch():
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  return images, jnp.array([0, 1, 2, 1])


def compiled_grad_text(materialize: str) -> str:
  graphdef, params, rest = split(materialize)
  grad = jax.jit(jax.grad(loss_fn, argnums=1), static_argnums=0)
  return grad.lower(graphdef, params, rest, *batch()).compile().as_text()


def test_gradients_do_not_change():
  images, labels = batch()
  grads = {}
  for mode in ('on', 'off'):
    graphdef, params, rest = split(mode)
    grad = jax.jit(jax.value_and_grad(loss_fn, argnums=1), static_argnums=0)
    grads[mode] = grad(graphdef, params, rest, images, labels)
  (loss_on, g_on), (loss_off, g_off) = grads['on'], grads['off']
  np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
  flat_on = nnx.to_flat_state(g_on)
  flat_off = dict(nnx.to_flat_state(g_off))
  assert len(flat_on) == len(flat_off)
  # Equal up to float rounding: XLA fuses (and so rounds) differently.
  for path, value in flat_on:
    np.testing.assert_allclose(
        value[...], flat_off[path][...], rtol=1e-4, atol=1e-6, err_msg=str(path)
    )


def test_fences_survive_xla_cpu_optimisation():
  # One cond per block boundary (depth + 1, backward) and two per LeFF
  # (forward and backward): if XLA ever folds them away, the speed-up in
  # docs/performance.md is gone and this test says so.
  depth = config('on').depth
  on = len(re.findall(r' conditional\(', compiled_grad_text('on')))
  off = len(re.findall(r' conditional\(', compiled_grad_text('off')))
  assert off == 0
  assert on == (depth + 1) + 2 * depth


def eval_text(graphdef, params, rest, fences: bool = True) -> str:
  def forward(params, rest, images):
    return nnx.merge(graphdef, params, rest)(images, train=False)

  lowered = jax.jit(forward).lower
  if fences:
    return lowered(params, rest, batch()[0]).compile().as_text()
  with fence.off():
    return lowered(params, rest, batch()[0]).compile().as_text()


def test_evaluation_fences_only_the_leff_and_off_removes_all():
  graphdef, params, rest = split('on')
  text = eval_text(graphdef, params, rest)
  assert len(re.findall(r' conditional\(', text)) == config('on').depth
  assert ' conditional(' not in eval_text(graphdef, params, rest, False)
  # Exported programs are traced inside fence.off().
  from drpl_jax.evaluation import export

  fn = export.probabilities_fn(graphdef, (0.5,) * 3, (0.5,) * 3)
  text = jax.jit(fn).lower(params, rest, batch()[0]).as_text()
  assert 'stablehlo.case' not in text and 'stablehlo.if' not in text


def test_auto_follows_the_backend_and_bad_mode_is_named():
  assert fence.enabled('auto') == (jax.default_backend() == 'cpu')
  assert fence.enabled('on') and not fence.enabled('off')
  with pytest.raises(ValueError, match='materialize'):
    ModelConfig(materialize='always')
  with pytest.raises(ValueError, match="model.materialize='sometimes'"):
    fence.enabled('sometimes')


def test_config_key_reaches_the_model():
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  from drpl_jax.train import loop as train

  cfg = drpl_vit.get_config('variant=micro')
  assert cfg.model.materialize == 'auto'
  cfg.model.materialize = 'off'
  assert train.model_config_from(cfg).materialize == 'off'
