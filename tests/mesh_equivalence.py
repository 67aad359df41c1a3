"""Runs 3 train steps of a depth-1 micro drpl model on several meshes.

Run as a script with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set
by tests/test_sharding.py before JAX starts): `python mesh_equivalence.py OUT`.
"""

import sys

import jax
import numpy as np
import optax

from drpl_jax.config import base as config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from drpl_jax.input import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from drpl_jax.parallel import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from drpl_jax.train import loop as train  # pylint: disable=g-import-not-at-top,wrong-import-position
from drpl_jax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from drpl_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_optimizer(config):
  """AdamW as in optim.create_optimizer, but with eps=1e-3.

  Biases right before a BatchNorm (LeFF's expand/project biases, norm2's
  bias) have an exactly zero gradient; Adam with eps=1e-8 turns the
  rounding noise of that zero into lr-sized steps that differ by mesh.
  A larger eps leaves them still and keeps every real update comparable
  at fp32 tolerance.
  """
  schedule = optim.learning_rate_schedule(
      optim.OptimConfig.from_config(config.optim),
      batch_size=config.batch_size,
      total_steps=config.total_steps,
  )
  tx = optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip),
      optax.adamw(
          schedule,
          eps=1e-3,
          weight_decay=config.optim.weight_decay,
          mask=optim.decay_mask,
      ),
  )
  return tx, schedule


def run(mesh_shape, devices, batches):
  config = config_base.drpl_vit('variant=micro,preset=drpl')
  config.model.depth = 1
  config.model.image_size = 32
  config.model.patch_size = 8
  config.model.num_classes = 4
  config.model.drop_path_rate = 0.1
  config.batch_size = 16
  config.total_steps = 10
  config.optim.warmup_steps = 1
  config.optim.base_lr = 0.05  # lr 1.6e-3: updates well above tolerance
  config.optim.ema_decay = 0.9
  mesh = sharding.create_mesh(mesh_shape, devices)
  model_cfg = train.model_config_from(config)
  tx, schedule = make_optimizer(config)
  graphdef, state, shardings = train.create_train_state(
      config, model_cfg, tx, mesh
  )
  step = train.jit_train_step(
      graphdef,
      tx,
      step_lib.StepConfig.from_config(config, model_cfg),
      schedule,
      shardings,
      mesh,
  )
  initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  for batch in batches:
    state, _ = step(state, input_pipeline.to_global_batch(batch, mesh), None)
  # Parameters really are split over 'fsdp' when that axis is > 1 (the
  # threshold is lowered so the micro model's matrices qualify).
  fsdp = sum(
      'fsdp' in str(x.sharding.spec) for x in jax.tree.leaves(state.params)
  )
  return {
      'params': [np.asarray(x) for x in jax.tree.leaves(state.params)],
      'initial': initial,
      'ema': [np.asarray(x) for x in jax.tree.leaves(state.ema)],
      'batch_stats': [np.asarray(x) for x in jax.tree.leaves(state.rest)],
      'fsdp_sharded': [np.asarray(fsdp)],
  }


def main(out):
  sharding.DEFAULT_MIN_FSDP_SIZE = 1024
  rng = np.random.default_rng(0)
  # Offline teacher logits feed the 'hard' distillation of the preset.
  batches = [
      {
          'image': rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
          'label': rng.integers(0, 4, (16,), np.int32),
          'teacher_logits': rng.normal(size=(16, 4)).astype(np.float32),
      }
      for _ in range(3)
  ]
  results = {}
  devices = jax.devices()
  assert len(devices) == 8, devices
  for name, shape, devs in [
      ('1', (1, 1), devices[:1]),
      ('8x1', (8, 1), devices),
      ('4x2', (4, 2), devices),
      ('2x4', (2, 4), devices),
  ]:
    r = run(shape, devs, batches)
    for key, leaves in r.items():
      for i, leaf in enumerate(leaves):
        results[f'{name}/{key}/{i}'] = leaf
  np.savez(out, **results)


if __name__ == '__main__':
  main(sys.argv[1])
