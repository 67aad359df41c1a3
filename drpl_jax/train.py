"""The training loop: sharded state, jitted steps, periodic eval, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m drpl_jax.main` runs.
State is created already sharded (`jax.eval_shape`, then `jax.jit` with
`out_shardings`); the step is jitted once with in/out shardings and the state
donated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from drpl_jax import checkpointing
from drpl_jax import input_pipeline
from drpl_jax import optim
from drpl_jax import sharding
from drpl_jax import train_step as step_lib
from drpl_jax.models import ModelConfig, create_model

State = dict[str, Any]


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_config(config.model)


def abstract_model(model_cfg: ModelConfig) -> nnx.Module:
  return nnx.eval_shape(lambda: create_model(model_cfg, rngs=nnx.Rngs(0)))


def create_train_state(config: ml_collections.ConfigDict,
                       model_cfg: ModelConfig, tx, mesh
                       ) -> tuple[nnx.GraphDef, State, Any]:
  """Initialises the train state directly into its shardings."""
  graphdef, _, _ = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
  use_ema = config.optim.ema_decay > 0

  def init() -> State:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    model = create_model(model_cfg, rngs=nnx.Rngs(init_rng))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return dict(step=jnp.zeros((), jnp.int32), rng=step_rng, params=params,
                rest=rest, opt_state=tx.init(params),
                ema=params if use_ema else None,
                nonfinite=jnp.zeros((), jnp.int32))

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """A converted teacher placed on the mesh (never trained, never saved)."""

  graphdef: nnx.GraphDef
  state: Any
  shardings: Any
  description: str


def create_online_teacher(config: ml_collections.ConfigDict, mesh
                          ) -> OnlineTeacher | None:
  """Converts config.teacher (a PyTorch checkpoint) into a sharded module."""
  t = config.teacher
  if not t.arch:
    return None
  if t.get('soft_labels'):
    raise ValueError('config.teacher.arch and config.teacher.soft_labels are '
                     'both set; choose online (arch + checkpoint) or offline '
                     '(soft_labels) distillation')
  if not t.checkpoint:
    raise ValueError(f'config.teacher.arch={t.arch!r} needs '
                     'config.teacher.checkpoint (a .safetensors or .pth '
                     'state dict; see python -m drpl_jax.train_teacher)')
  from drpl_jax import convert  # pylint: disable=g-import-not-at-top
  module = convert.torch_teacher(
      t.arch, t.checkpoint, config.model.num_classes,
      image_size=t.image_size, mean=tuple(t.mean), std=tuple(t.std),
      dtype=t.get('dtype', 'float32'))
  graphdef, state = nnx.split(module)
  shardings = sharding.state_shardings(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      mesh)
  state = jax.device_put(state, shardings)
  return OnlineTeacher(graphdef, state, shardings,
                       f'{t.arch} from {t.checkpoint}')


def check_distillation(config: ml_collections.ConfigDict, model_cfg,
                       teacher: OnlineTeacher | None) -> None:
  """A distillation loss needs a teacher; say how to configure one."""
  kind = config.distill.kind
  if kind == 'none' or not model_cfg.distilled:
    return
  if teacher is None and not config.teacher.get('soft_labels'):
    raise ValueError(
        f'config.distill.kind={kind!r} needs a teacher: set '
        'config.teacher.arch and config.teacher.checkpoint (online) or '
        'config.teacher.soft_labels (offline), or config.distill.kind=none')


def jit_train_step(graphdef, tx, step_cfg, schedule, state_shardings, mesh,
                   teacher: OnlineTeacher | None = None):
  """`step(state, batch, teacher_state)` jitted with shardings + donation."""
  step = step_lib.make_train_step(
      graphdef, tx, step_cfg, schedule,
      teacher_graphdef=teacher.graphdef if teacher else None)
  batch_sh = sharding.batch_sharding(mesh)
  teacher_sh = teacher.shardings if teacher else None
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sh, teacher_sh),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


def jit_eval_step(graphdef, step_cfg, state_shardings, mesh):
  step = step_lib.make_eval_step(graphdef, step_cfg)
  return jax.jit(
      step,
      in_shardings=(state_shardings['params'], state_shardings['rest'],
                    sharding.batch_sharding(mesh)),
      out_shardings=sharding.batch_sharding(mesh))


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the full numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(eval_step, params, rest, batches, mesh
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Runs the eval step over padded batches; drops padding.

  Returns (logits per head [N, C], labels [N], source indices [N]), every
  example exactly once whatever the number of processes.
  """
  outs: dict[str, list[np.ndarray]] = {}
  labels, indices = [], []
  for batch in batches:
    device_batch = input_pipeline.to_global_batch(
        {'image': batch['image']}, mesh)
    logits = eval_step(params, rest, device_batch)
    glob = input_pipeline.to_global_batch(
        {'label': batch['label'], 'mask': batch['mask'],
         'index': batch['index']}, mesh)
    keep = gather(glob['mask']).astype(bool)
    labels.append(gather(glob['label'])[keep])
    indices.append(gather(glob['index'])[keep])
    for head, value in logits.items():
      outs.setdefault(head, []).append(gather(value)[keep])
  logits = {k: np.concatenate(v) for k, v in outs.items()}
  return logits, np.concatenate(labels), np.concatenate(indices)


def evaluate_split(config, eval_step, params, rest, mesh, split: str
                   ) -> dict[str, float]:
  """Accuracy and loss per head on a split (quick, for training logs)."""
  batches = input_pipeline.create_eval_iterator(config, split)
  logits, labels, _ = predict_split(eval_step, params, rest, batches, mesh)
  out = {'num_examples': float(len(labels))}
  for head, value in logits.items():
    logp = jax.nn.log_softmax(jnp.asarray(value))
    out[f'accuracy_{head}'] = float(np.mean(np.argmax(value, -1) == labels))
    out[f'loss_{head}'] = float(-np.mean(
        np.take_along_axis(np.asarray(logp), labels[:, None], -1)))
  return out


def _check_classes(config, info) -> None:
  n = config.model.num_classes
  if n != len(info.class_names):
    raise ValueError(
        f'config.model.num_classes={n} but data set {info.name!r} has '
        f'{len(info.class_names)} classes {list(info.class_names)}; set '
        f'--config.model.num_classes={len(info.class_names)}')


def _writer(workdir: str):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates.

  Returns the last validation metrics and the final step.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top
  info = data.ensure_prepared(config.data)
  _check_classes(config, info)
  model_cfg = model_config_from(config)
  mesh = sharding.create_mesh(tuple(config.get('mesh_shape', (-1, 1))))
  tx, schedule = optim.create_optimizer(config)
  graphdef, state, state_sh = create_train_state(config, model_cfg, tx, mesh)
  step_cfg = step_lib.StepConfig.from_config(config, model_cfg)
  teacher = create_online_teacher(config, mesh)
  check_distillation(config, model_cfg, teacher)
  train_step = jit_train_step(graphdef, tx, step_cfg, schedule, state_sh,
                              mesh, teacher)
  teacher_state = teacher.state if teacher else None
  eval_step = jit_eval_step(graphdef, step_cfg, state_sh, mesh)
  train_iter = input_pipeline.create_train_iterator(config)

  ckpt = checkpointing.Checkpointer(
      workdir, keep=config.keep_checkpoints,
      save_every=config.checkpoint_every_steps)
  ckpt.write_meta(config, model_cfg, info)
  restored = ckpt.restore_latest(state, state_sh)
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
    logging.info('Resumed from step %d in %s', int(state['step']), workdir)

  writer = _writer(workdir)
  n_params = sum(x.size for x in jax.tree.leaves(state['params']))
  logging.info('Model %s: %d parameters, %d devices, mesh %s',
               model_cfg, n_params, jax.device_count(), dict(mesh.shape))
  writer.write_hparams({'num_params': n_params})
  step = int(state['step'])
  last_eval: dict[str, Any] = {}
  train_metrics: list[dict[str, jax.Array]] = []
  t0, t0_step = time.time(), step
  while step < config.total_steps:
    batch = next(train_iter)
    state, metrics = train_step(
        state, input_pipeline.to_global_batch(batch, mesh), teacher_state)
    step += 1
    train_metrics.append(metrics)
    if config.get('nonfinite', 'skip') == 'stop' and not bool(
        metrics['finite']):
      ckpt.wait()
      raise FloatingPointError(
          f'non-finite loss or gradient at step {step} (loss='
          f'{float(metrics["loss"])}); set config.nonfinite=skip to skip '
          'such updates instead')
    if step % config.log_every_steps == 0 or step == config.total_steps:
      summary = _summarise(train_metrics)
      summary['steps_per_sec'] = (step - t0_step) / (time.time() - t0)
      writer.write_scalars(step, summary)
      train_metrics, t0, t0_step = [], time.time(), step
    if step % config.eval_every_steps == 0 or step == config.total_steps:
      last_eval = evaluate_split(config, eval_step, state['params'],
                                 state['rest'], mesh, config.data.eval_split)
      writer.write_scalars(step, {f'val_{k}': v for k, v in last_eval.items()})
    ckpt.maybe_save(step, state, train_iter.get_state(),
                    force=step == config.total_steps)
  ckpt.wait()
  writer.flush()
  return {'step': step, 'validation': last_eval}


def _summarise(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(metrics)
  keys = stacked[0].keys()
  out = {k: float(np.mean([m[k] for m in stacked])) for k in keys}
  out['nonfinite'] = float(stacked[-1]['nonfinite'])
  out['learning_rate'] = float(stacked[-1]['learning_rate'])
  return out
