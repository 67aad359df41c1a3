"""The training loop: sharded state, jitted steps, periodic eval, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m drpl_jax.main` runs.
The model, optimizer, sharded `TrainState` and jitted steps come from the
one builder, `state.build` (drpl_jax/train/state.py): state created already
sharded, the step jitted once with in/out shardings and the state donated. Around it: validation of the weights and their EMA, asynchronous
checkpoints (latest N + best by `config.best_metric`), resume, a clean stop
on SIGTERM, the non-finite policy (`config.nonfinite`), clu summaries
(TensorBoard + console on process 0), progress with ETA, a parameter table
at start and an optional profiler trace (`config.profile_steps`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from drpl_jax.utils import errors
from drpl_jax.config import base as config_base
from drpl_jax.input import pipeline as input_pipeline
from drpl_jax.models import ModelConfig
from drpl_jax.parallel import sharding
from drpl_jax.teacher import load as teacher_load
from drpl_jax.train import checkpointing
from drpl_jax.train import console
from drpl_jax.train import state as state_lib

# The one builder (drpl_jax/train/state.py), re-exported for callers that
# know these names from here.
TrainState = state_lib.TrainState
OnlineTeacher = state_lib.OnlineTeacher
model_config_from = state_lib.model_config_from
abstract_model = state_lib.abstract_model
create_train_state = state_lib.create_train_state
jit_train_step = state_lib.jit_train_step
jit_eval_step = state_lib.jit_eval_step


def create_online_teacher(
    config: ml_collections.ConfigDict, mesh
) -> OnlineTeacher | None:
  """Converts config.teacher (a PyTorch checkpoint) into a sharded module."""
  t = config.teacher
  if not t.arch:
    return None
  if t.get('soft_labels'):
    raise errors.UserError(
        'config.teacher.arch and config.teacher.soft_labels '
        'are both set; choose online (arch + checkpoint) or '
        'offline (soft_labels) distillation'
    )
  if not t.checkpoint and config.get('distill', {}).get('kind') == 'none':
    # Nothing distils (e.g. configs/small_data.py:preset=deit_conv with
    # --config.distill.kind=none, the no-teacher baseline): an arch with no
    # checkpoint is a teacher nobody needs, not an error.
    logging.info(
        'config.teacher.arch=%r has no checkpoint and distill.kind=none: '
        'no teacher',
        t.arch,
    )
    return None
  if not t.checkpoint:
    raise errors.UserError(
        f'config.teacher.arch={t.arch!r} needs '
        'config.teacher.checkpoint (a .safetensors or .pth '
        'state dict; see python -m drpl_jax.train_teacher)'
    )
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top

  preflight.check_teacher_arch(t.arch, t.checkpoint)
  # The typed teacher's fields are torch_teacher's keywords of the same name.
  typed = config_base.teacher_config(config)
  module = teacher_load.torch_teacher(
      checkpoint=t.checkpoint, **dataclasses.asdict(typed)
  )
  graphdef, state = nnx.split(module)
  shardings = sharding.state_shardings(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      mesh,
  )
  state = jax.device_put(state, shardings)
  return OnlineTeacher(
      graphdef, state, shardings, f'{t.arch} from {t.checkpoint}'
  )


def check_distillation(
    config: ml_collections.ConfigDict, model_cfg, teacher: OnlineTeacher | None
) -> None:
  """A distillation loss needs a teacher; say how to configure one."""
  kind = config.distill.kind
  if kind == 'none' or not model_cfg.distilled:
    return
  if teacher is None and not config.teacher.get('soft_labels'):
    raise ValueError(
        f'config.distill.kind={kind!r} needs a teacher: set '
        'config.teacher.arch and config.teacher.checkpoint (online) or '
        'config.teacher.soft_labels (offline), or config.distill.kind=none'
    )


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the full numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(
    eval_step,
    params,
    rest,
    batches,
    mesh,
    *,
    total: int | None = None,
    name: str = 'eval',
    log_every_s: float = 30.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Runs the eval step over padded batches; drops padding.

  Logs a progress line (batches done/total, images/s) every `log_every_s`
  seconds and at the end. Returns (logits per head [N, C], labels [N],
  source indices [N]), every example exactly once whatever the number of
  processes.
  """
  outs: dict[str, list[np.ndarray]] = {}
  labels, indices = [], []
  t0 = last_log = time.time()
  done = 0
  for done, batch in enumerate(batches, start=1):
    device_batch = input_pipeline.to_global_batch(
        {'image': batch['image']}, mesh
    )
    logits = eval_step(params, rest, device_batch)
    glob = input_pipeline.to_global_batch(
        {
            'label': batch['label'],
            'mask': batch['mask'],
            'index': batch['index'],
        },
        mesh,
    )
    keep = gather(glob['mask']).astype(bool)
    labels.append(gather(glob['label'])[keep])
    indices.append(gather(glob['index'])[keep])
    for head, value in logits.items():
      outs.setdefault(head, []).append(gather(value)[keep])
    if time.time() - last_log >= log_every_s and done != total:
      last_log = time.time()
      _log_progress(name, done, total, labels, t0)
  _log_progress(name, done, total, labels, t0)
  logits = {k: np.concatenate(v) for k, v in outs.items()}
  return logits, np.concatenate(labels), np.concatenate(indices)


def _log_progress(
    name: str, done: int, total: int | None, labels: list[np.ndarray], t0: float
) -> None:
  count = sum(len(x) for x in labels)
  logging.info(
      '%s: %d/%s batches, %d examples, %.1f images/s',
      name,
      done,
      total if total is not None else '?',
      count,
      count / max(time.time() - t0, 1e-9),
  )


def evaluate_split(
    config, eval_step, params, rest, mesh, split: str
) -> dict[str, float]:
  """Accuracy and loss per head on a split (quick, for training logs)."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  batches = input_pipeline.create_eval_iterator(
      input_pipeline.DataConfig.from_config(config.data),
      split,
      batch_size=config.eval_batch_size,
  )
  total = input_pipeline.num_eval_batches(
      len(data.get_source(config.data, split)), config.eval_batch_size
  )
  logits, labels, _ = predict_split(
      eval_step, params, rest, batches, mesh, total=total, name=f'eval {split}'
  )
  out = {'num_examples': float(len(labels))}
  for head, value in logits.items():
    logp = jax.nn.log_softmax(jnp.asarray(value))
    out[f'accuracy_{head}'] = float(np.mean(np.argmax(value, -1) == labels))
    out[f'loss_{head}'] = float(
        -np.mean(np.take_along_axis(np.asarray(logp), labels[:, None], -1))
    )
  return out


def val_metric_names(model_cfg: ModelConfig, ema: bool) -> list[str]:
  """The names `train_and_evaluate` logs for validation (best_metric)."""
  heads = ['cls', 'dist', 'mean'] if model_cfg.distilled else ['mean']
  base = ['num_examples'] + [
      f'{m}_{h}' for h in heads for m in ('accuracy', 'loss')
  ]
  names = [f'val_{n}' for n in base]
  if ema:
    names += [f'val_ema_{n}' for n in base]
  return names


def _check_classes(config, info) -> None:
  n = config.model.num_classes
  if n != len(info.class_names):
    raise ValueError(
        f'config.model.num_classes={n} but data set {info.name!r} has '
        f'{len(info.class_names)} classes {list(info.class_names)}; set '
        f'--config.model.num_classes={len(info.class_names)}'
    )


def _writer(workdir: str):
  """clu writers: TensorBoard + console on process 0, logging elsewhere."""
  try:  # TensorBoard summaries need no accelerator: keep TF off the GPU.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], 'GPU')
  except (ImportError, RuntimeError):
    pass
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0
  )


def _write_parameter_table(workdir: str, params: Any, n_params: int) -> None:
  """Writes the parameter table to workdir/params.txt and says where."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  path = epath.Path(workdir) / 'params.txt'
  table = parameter_overview(params)
  path.write_text(table + '\n')
  logging.info('Parameters:\n%s', table)
  console.line(f'{n_params:,} parameters; table in {path}')


def parameter_overview(params: Any) -> str:
  """A table of parameter names, shapes, sizes and the total count."""
  # pylint: disable-next=g-import-not-at-top
  from clu import parameter_overview as overview

  tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  return overview.get_parameter_overview(tree, include_stats=False)


class Profiler:
  """Traces the updates with `start <= step < stop` to `workdir/profile`.

  `config.profile_steps = (start, stop)` in update numbers; (0, 0) = off.
  Open the trace with TensorBoard's profile plugin or Perfetto.
  """

  def __init__(self, steps: Any, workdir: str):
    steps = tuple(steps or (0, 0))
    if len(steps) != 2 or steps[0] < 0 or steps[1] < steps[0]:
      raise ValueError(
          f'config.profile_steps={steps!r}: expected (start, '
          'stop) with 0 <= start <= stop; (0, 0) = off'
      )
    self.start, self.stop = int(steps[0]), int(steps[1])
    self.logdir = os.path.join(workdir, 'profile')
    self.active = False

  def update(self, step: int, state: Any = None) -> None:
    """Call before each update with the number of updates done."""
    if self.start == self.stop:
      return
    if not self.active and self.start <= step < self.stop:
      logging.info(
          'Profiling steps %d..%d to %s', step, self.stop - 1, self.logdir
      )
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step >= self.stop:
      self.close(state)

  def close(self, state: Any = None) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info('Wrote a profile to %s', self.logdir)


@dataclasses.dataclass
class _Run:
  """Everything the training loop needs, built once by `_setup`."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  state: state_lib.TrainState
  train_step: Any
  eval_step: Any
  teacher_state: Any
  train_iter: Any
  ckpt: checkpointing.Checkpointer
  writer: Any = None
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)


def _setup(config: ml_collections.ConfigDict, workdir: str, info) -> _Run:
  """Model, optimizer, sharded state, jitted steps, data, restored state."""
  setup = state_lib.build(config)
  model_cfg, mesh, state = setup.model_cfg, setup.mesh, setup.state
  best_metric = config.get('best_metric', '')
  names = val_metric_names(model_cfg, state.ema is not None)
  if best_metric and best_metric not in names:
    raise ValueError(
        f'config.best_metric={best_metric!r} is not a '
        f'validation metric of this run; choose from {names}'
    )
  teacher = create_online_teacher(config, mesh)
  check_distillation(config, model_cfg, teacher)
  train_step = setup.train_step(teacher)
  eval_step = setup.eval_step()
  train_iter = input_pipeline.create_train_iterator(
      input_pipeline.DataConfig.from_config(config.data),
      batch_size=config.batch_size,
      seed=config.seed,
      info=info,
      soft_labels=config.teacher.soft_labels,
  )
  ckpt = checkpointing.Checkpointer(
      workdir,
      keep=config.keep_checkpoints,
      save_every=config.checkpoint_every_steps,
      best_metric=best_metric,
      cleanup_incomplete=True,
  )
  try:
    restored = ckpt.restore_latest(state, setup.shardings)
    ckpt.write_meta(config, model_cfg, info)
  except Exception:
    ckpt.close()
    raise
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
    logging.info('Resumed from step %d in %s', int(state.step), workdir)
  elif config.get('init_from'):
    from drpl_jax.train import student_init  # pylint: disable=g-import-not-at-top

    state, _ = student_init.init_train_state(config, state)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
      'Model %s: %d parameters, %d devices, mesh %s',
      model_cfg,
      n_params,
      jax.device_count(),
      dict(mesh.shape),
  )
  if jax.process_index() == 0:
    _write_parameter_table(workdir, state.params, n_params)
  return _Run(
      config,
      workdir,
      mesh,
      state,
      train_step,
      eval_step,
      teacher.state if teacher else None,
      train_iter,
      ckpt,
  )


class _Monitor:
  """Collects step metrics; checks finiteness; writes train summaries."""

  def __init__(self, config: ml_collections.ConfigDict, writer, step: int):
    self.stop_on_nonfinite = config.get('nonfinite', 'skip') == 'stop'
    self.writer = writer
    self.batch_size = config.batch_size
    self.total_steps = config.total_steps
    self.pending: list[dict[str, jax.Array]] = []
    self.unchecked: list[tuple[int, dict[str, jax.Array]]] = []
    self.t0, self.step0 = time.time(), step
    self.nonfinite_logged = 0

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append(metrics)
    self.unchecked.append((step, metrics))

  def check_finite(self) -> None:
    """With config.nonfinite='stop': raises naming the first bad step."""
    if self.stop_on_nonfinite and self.unchecked:
      flags = jax.device_get([m['finite'] for _, m in self.unchecked])
      for (step, metrics), ok in zip(self.unchecked, flags):
        if not ok:
          raise FloatingPointError(
              f'non-finite loss or gradient at step {step} (loss='
              f'{float(metrics["loss"])}, grad_norm='
              f'{float(metrics["grad_norm"])}); set config.nonfinite=skip '
              'to skip such updates instead'
          )
    self.unchecked = []

  def write(self, step: int) -> dict[str, float]:
    """Writes the mean train metrics since the last write."""
    if not self.pending:
      return {}
    summary = _summarise(self.pending)
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = (step - self.step0) / elapsed
    summary.update(
        steps_per_sec=rate,
        examples_per_sec=rate * self.batch_size,
        examples_per_sec_per_device=(
            rate * self.batch_size / jax.device_count()
        ),
    )
    self.writer.write_scalars(step, summary)
    eta_s = (self.total_steps - step) / max(rate, 1e-9)
    console.progress(
        step, self.total_steps, rate * self.batch_size, summary['loss'], eta_s
    )
    count = int(summary['nonfinite'])
    if count > self.nonfinite_logged:
      logging.warning(
          'Skipped %d updates with a non-finite loss or '
          'gradient so far (step %d)',
          count,
          step,
      )
      self.nonfinite_logged = count
    self.pending, self.t0, self.step0 = [], time.time(), step
    return summary


def _evaluate(run: _Run, step: int) -> dict[str, float]:
  """Validation metrics of the weights and, with EMA, of the EMA weights."""
  out = {}
  for key, prefix in (('params', 'val_'), ('ema', 'val_ema_')):
    if getattr(run.state, key) is None:
      continue
    metrics = evaluate_split(
        run.config,
        run.eval_step,
        getattr(run.state, key),
        run.state.rest,
        run.mesh,
        run.config.data.eval_split,
    )
    out.update({prefix + k: v for k, v in metrics.items()})
  run.writer.write_scalars(step, out)
  shown = ', '.join(
      f'{k} {v:.4f}' for k, v in sorted(out.items()) if '_accuracy_' in k
  )
  console.line(f'eval at step {step} ({run.config.data.eval_split}): {shown}')
  return out


def _after_step(
    run: _Run, monitor: _Monitor, step: int, preempted: bool
) -> None:
  """Logging, evaluation and checkpointing due after update `step`."""
  config, ckpt = run.config, run.ckpt
  last = step == config.total_steps
  do_log = step % config.log_every_steps == 0 or last
  do_eval = step % config.eval_every_steps == 0 or last
  do_save = (
      step % config.checkpoint_every_steps == 0
      or last
      or preempted
      or (do_eval and bool(ckpt.best_metric))
  )
  if do_log or do_eval or do_save:
    monitor.check_finite()  # never evaluate or save a diverged state
  if do_log:
    monitor.write(step)
  metrics = None
  if do_eval:
    metrics = run.last_eval = _evaluate(run, step)
  if do_save:
    ckpt.maybe_save(
        step, run.state, run.train_iter.get_state(), force=True, metrics=metrics
    )


def _train_loop(run: _Run) -> bool:
  """Runs updates to config.total_steps; True when stopped by preemption."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  config = run.config
  step = int(run.state.step)
  progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps,
      writer=run.writer,
      every_secs=config.get('progress_every_secs', 60.0),
  )
  profiler = Profiler(config.get('profile_steps', (0, 0)), run.workdir)
  preemption = checkpointing.PreemptionWatcher()
  monitor = _Monitor(config, run.writer, step)
  try:
    while step < config.total_steps:
      profiler.update(step, run.state)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = input_pipeline.to_global_batch(next(run.train_iter), run.mesh)
        run.state, metrics = run.train_step(run.state, batch, run.teacher_state)
      step += 1
      monitor.add(step, metrics)
      progress(step)
      preempted = preemption.reached(step)
      _after_step(run, monitor, step, preempted)
      if preempted:
        run.ckpt.wait()
        logging.warning(
            'Preempted: saved checkpoint at step %d in %s; stopping',
            step,
            run.ckpt.directory,
        )
        return True
    return False
  finally:
    profiler.close(run.state)
    preemption.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in workdir) and evaluates.

  Returns {'step', 'validation' (last metrics of the weights),
  'validation_ema' (of the EMA weights, if any), 'nonfinite' (skipped
  updates), 'preempted', 'best_step' (by config.best_metric)}.
  A SIGTERM saves a checkpoint at the current step and returns with
  'preempted' True.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  info = data.ensure_prepared(config.data)
  _check_classes(config, info)
  run = _setup(config, workdir, info)
  try:
    run.writer = _writer(workdir)
    run.writer.write_hparams(
        {
            'num_params': sum(
                x.size for x in jax.tree.leaves(run.state.params)
            ),
            'batch_size': config.batch_size,
            'total_steps': config.total_steps,
        }
    )
    preempted = _train_loop(run)
    run.ckpt.wait()
    run.writer.flush()
  finally:
    run.ckpt.close()
  val = run.last_eval
  best = run.ckpt.best_step()
  if best is not None:
    logging.info('Best checkpoint by %s: step %d', run.ckpt.best_metric, best)
  return {
      'step': int(run.state.step),
      'validation': {
          k[4:]: v
          for k, v in val.items()
          if k.startswith('val_') and not k.startswith('val_ema_')
      },
      'validation_ema': {
          k[8:]: v for k, v in val.items() if k.startswith('val_ema_')
      },
      'nonfinite': int(run.state.nonfinite),
      'preempted': preempted,
      'best_step': best,
  }


def _summarise(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Means over steps (non-finite values left out); counts as of the last."""
  stacked = jax.device_get(metrics)
  out = {}
  for key in stacked[0]:
    if key == 'finite':
      continue
    values = np.asarray([m[key] for m in stacked], np.float64)
    finite = values[np.isfinite(values)]
    out[key] = float(finite.mean()) if finite.size else float('nan')
  out['nonfinite'] = float(stacked[-1]['nonfinite'])
  out['learning_rate'] = float(stacked[-1]['learning_rate'])
  return out
