"""The one builder (drpl_jax/train/state.py): the typed train state, the
checkpoint tree it keeps compatible, and inference without an optimizer."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import config_module
from conftest import set_config
from drpl_jax.evaluation import evaluate
from drpl_jax.evaluation import export
from drpl_jax.evaluation import predict
from drpl_jax.train import checkpointing
from drpl_jax.train import optim
from drpl_jax.train import state as state_lib

FIELDS = ['ema', 'nonfinite', 'opt_state', 'params', 'rest', 'rng', 'step']


def tiny_config(**overrides):
  """A depth-1 micro model at 32 px with an EMA (compiles in seconds)."""
  config = config_module('demo').get_config('steps=2')
  config.model.depth = 1
  config.optim.ema_decay = 0.9
  return set_config(config, overrides)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def changed(state: state_lib.TrainState) -> state_lib.TrainState:
  """The state with distinct, recognisable values in every part."""
  bump = lambda tree, by: jax.tree.map(lambda x: x + by, tree)
  return state.replace(
      step=state.step + 7,
      params=bump(state.params, 1.0),
      ema=bump(state.ema, 2.0),
      opt_state=bump(state.opt_state, 3),
  )


def write_old_checkpoint(workdir, step, tree):
  """What the code before TrainState wrote: a plain dict of the fields
  under 'state', the iterator position under 'data' (orbax directly)."""
  manager = ocp.CheckpointManager(
      f'{workdir}/checkpoints',
      options=ocp.CheckpointManagerOptions(
          create=True, enable_async_checkpointing=False
      ),
      item_handlers={
          'state': ocp.StandardCheckpointHandler(),
          'data': ocp.JsonCheckpointHandler(),
      },
  )
  manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          data=ocp.args.JsonSave({'position': 5}),
      ),
  )
  manager.wait_until_finished()
  manager.close()


def test_train_state_is_a_pytree_saved_as_the_old_dict(tmp_path):
  setup = state_lib.build(tiny_config())
  state = setup.state
  assert isinstance(state, state_lib.TrainState)
  assert sorted(state.to_dict()) == FIELDS
  again = state_lib.TrainState.from_dict(state.to_dict())
  assert jax.tree.structure(again) == jax.tree.structure(state)
  with pytest.raises(ValueError, match=r"missing \['ema'\]"):
    state_lib.TrainState.from_dict(
        {k: v for k, v in state.to_dict().items() if k != 'ema'}
    )
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.maybe_save(1, state, {'position': 1}, force=True)
  stored = ckpt.manager.item_metadata(1)['state']
  ckpt.close()
  assert sorted(getattr(stored, 'tree', stored)) == FIELDS  # a dict on disk


def test_a_checkpoint_of_the_old_dict_tree_still_restores(tmp_path):
  config = tiny_config()
  setup = state_lib.build(config)
  old = changed(setup.state)
  # Literally the dict the old create_train_state built.
  tree = dict(
      step=old.step,
      rng=old.rng,
      params=old.params,
      rest=old.rest,
      opt_state=old.opt_state,
      ema=old.ema,
      nonfinite=old.nonfinite,
  )
  write_old_checkpoint(tmp_path, 3, tree)
  # Resuming training: the whole typed state, iterator position included.
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  restored, data = ckpt.restore_latest(setup.state, setup.shardings)
  ckpt.close()
  assert isinstance(restored, state_lib.TrainState) and data == {'position': 5}
  assert int(restored.step) == int(old.step)
  for name in ('params', 'ema', 'opt_state', 'rest', 'rng'):
    for a, b in zip(
        leaves(getattr(restored, name)), leaves(getattr(old, name))
    ):
      np.testing.assert_array_equal(a, b, err_msg=name)
  # Inference: only the weights, model state and EMA.
  step, weights = state_lib.build_inference(config).restore(str(tmp_path))
  assert step == 3 and isinstance(weights, state_lib.InferenceState)
  for name in ('params', 'ema'):
    for a, b in zip(leaves(getattr(weights, name)), leaves(getattr(old, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)


def test_inference_of_a_run_without_ema_has_none(tmp_path):
  setup = state_lib.build(tiny_config(**{'optim.ema_decay': 0.0}))
  write_old_checkpoint(tmp_path, 1, setup.state.to_dict())
  # The config asks for an EMA the checkpoint does not have: restored None.
  _, weights = state_lib.build_inference(tiny_config()).restore(str(tmp_path))
  assert weights.ema is None
  with pytest.raises(ValueError, match='no ema weights'):
    weights.weights('ema')


def test_inference_builds_no_optimizer_and_predicts_as_before(
    tiny_run, tmp_path, monkeypatch
):
  workdir, _ = tiny_run
  config = evaluate.config_from_workdir(workdir)
  # Before: the whole train state (optimizer included) restored.
  setup = state_lib.build(config)
  ckpt = checkpointing.Checkpointer(workdir)
  full, _ = ckpt.restore(ckpt.latest_step(), setup.state, setup.shardings)
  ckpt.close()
  images = np.random.default_rng(0).integers(
      0, 256, (4, config.data.image_size, config.data.image_size, 3), np.uint8
  )
  expected = jax.device_get(
      setup.eval_step()(full.params, full.rest, {'image': images})
  )

  def no_optimizer(*args, **kwargs):
    raise AssertionError('inference built an optimizer')

  monkeypatch.setattr(optim, 'create_optimizer', no_optimizer)
  with pytest.raises(AssertionError, match='built an optimizer'):
    state_lib.build(config)  # the patch is live
  evaluator = evaluate.Evaluator(config, workdir)
  got = jax.device_get(
      evaluator.eval_step(
          evaluator.state.params, evaluator.state.rest, {'image': images}
      )
  )
  assert set(got) == set(expected)
  for head in expected:
    np.testing.assert_array_equal(got[head], expected[head])
  restored = predict.restore_model(workdir)
  probs, _ = predict.Predictor(restored)(images)
  np.testing.assert_allclose(
      probs['mean'], jax.nn.softmax(expected['mean'], axis=-1), atol=1e-5
  )
  meta = export.export_model(
      workdir, str(tmp_path / 'export'), platforms=('cpu',)
  )
  served = export.load_stablehlo(str(tmp_path / 'export'))(images)
  np.testing.assert_allclose(np.asarray(served), probs['mean'], atol=1e-5)
  assert meta['checkpoint_step'] == restored.step == evaluator.step
  assert (
      json.loads((tmp_path / 'export' / 'metadata.json').read_text())['weights']
      == 'params'
  )
