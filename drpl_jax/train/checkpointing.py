"""Orbax checkpoints of the train state and the data iterator position.

Layout under `workdir/checkpoints/<step>/`: `state` (the train-state pytree,
restored straight into its shardings), `data` (the grain iterator state as
JSON), so a resumed run continues the same example sequence, and `metrics`
(the validation metrics of that step, when it was evaluated). `workdir/
meta.json` records the config the checkpoints belong to.

Saves are asynchronous at an explicit interval; the last `keep` checkpoints
are kept, and with `best_metric` also the best one by that validation
metric. A checkpoint a crash left incomplete (orbax's `*.orbax-checkpoint-
tmp*` folder, or a step folder with missing or corrupt files) is skipped
with a warning naming it, moved to `workdir/checkpoints_incomplete/`, and
the previous one restored. A checkpoint of a different model is refused
with the parameter paths and shapes that differ.

`PreemptionWatcher` turns a preemption notice (SIGTERM) into "save now and
stop", in agreement over all processes of a multi-host job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from etils import epath

from drpl_jax.utils import files

# The train state as saved: a dict of its fields (TrainState.to_dict()).
# A typed state (drpl_jax/train/state.py) is converted here, at the
# boundary, so the on-disk tree is the same dict earlier versions wrote.
State = Any
INCOMPLETE_DIR = 'checkpoints_incomplete'
_TMP_MARK = '.orbax-checkpoint-tmp'


class IncompleteCheckpointError(RuntimeError):
  """A checkpoint folder exists but cannot be read (crash during save)."""


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short, stable hash of the whole config (recorded in reports)."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def best_mode(metric: str) -> str:
  """'min' for losses and calibration errors, 'max' for everything else."""
  return 'min' if ('loss' in metric or 'ece' in metric) else 'max'


def _manager_options(
    keep: int, best_metric: str, async_save: bool, cleanup: bool
) -> ocp.CheckpointManagerOptions:
  """Keep the latest `keep`, and the best by `best_metric` if set."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  best_fn = None
  if best_metric:
    worst = float('inf') if best_mode(best_metric) == 'min' else float('-inf')
    # A checkpoint saved with other metrics ranks last.
    best_fn = lambda m: float(m.get(best_metric, worst))
    policies.append(
        ocp.checkpoint_managers.BestN(
            get_metric_fn=best_fn,
            reverse=best_mode(best_metric) == 'min',
            n=1,
            keep_checkpoints_without_metrics=False,
        )
    )
  # best_fn (besides BestN) makes orbax write the metrics to disk, so the
  # best checkpoint is still known after a restart.
  return ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=async_save,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
          policies
      ),
      best_fn=best_fn,
      best_mode=best_mode(best_metric or 'accuracy'),
      cleanup_tmp_directories=cleanup,
  )


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep` (+ the best).

  The training run passes `cleanup_incomplete=True`: folders of unfinished
  saves are then removed and unreadable checkpoints set aside by
  `restore_latest`; readers (evaluation, prediction) leave them alone.
  """

  def __init__(
      self,
      workdir: str,
      *,
      keep: int = 3,
      save_every: int = 1000,
      async_save: bool = True,
      best_metric: str = '',
      cleanup_incomplete: bool = False,
  ):
    if keep < 1:
      raise ValueError(f'keep_checkpoints={keep} must be >= 1')
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / 'checkpoints'
    self.save_every = save_every
    self.best_metric = best_metric
    # Only the training run may clean up: a concurrent evaluator must not
    # delete the folder of a save in progress.
    self.cleanup_incomplete = cleanup_incomplete
    if cleanup_incomplete:
      self._warn_tmp_dirs()
    options = _manager_options(
        keep, best_metric, async_save, cleanup_incomplete
    )
    # Handlers registered up front, so that metadata can be read before
    # the first save or restore of this process.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'data': ocp.JsonCheckpointHandler(),
        },
    )

  def _warn_tmp_dirs(self) -> None:
    if not self.directory.exists():
      return
    for path in sorted(self.directory.iterdir()):
      if _TMP_MARK in path.name:
        logging.warning(
            'Skipping incomplete checkpoint %s (a save that did '
            'not finish; orbax removes it)',
            path,
        )

  def write_meta(
      self, config: ml_collections.ConfigDict, model_cfg, info=None
  ) -> None:
    """Writes workdir/meta.json (process 0), noting a changed model config.

    A model whose parameter shapes differ is refused by `restore`; other
    differences (dtype, drop path) are logged and the new config recorded.
    """
    meta = {
        'model': dataclasses.asdict(model_cfg),
        'config_hash': config_hash(config),
        'config': json.loads(config.to_json_best_effort()),
        'data': {
            'name': getattr(info, 'name', None),
            'version': getattr(info, 'version', None),
            'class_names': list(getattr(info, 'class_names', ())),
        },
    }
    path = self.workdir / 'meta.json'
    if path.exists():
      old = json.loads(path.read_text()).get('model', {})
      diff = {
          k: (old.get(k), v)
          for k, v in meta['model'].items()
          if old.get(k) != v
      }
      if diff and self.latest_step() is not None:
        logging.warning(
            '%s: the model config differs from the one of its '
            'checkpoints (checkpoint, config): %s',
            self.workdir,
            diff,
        )
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      files.atomic_write(path, json.dumps(meta, indent=2, default=str))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The validation metrics saved with `step` (None if not evaluated)."""
    try:
      return self.manager.metrics(step)
    except (FileNotFoundError, ValueError, OSError):
      return None

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without one)."""
    if not self.best_metric:
      return None
    scored = [
        (m[self.best_metric], s)
        for s in self.all_steps()
        if (m := self.metrics(s)) and self.best_metric in m
    ]
    if not scored:
      return None
    pick = min if best_mode(self.best_metric) == 'min' else max
    return pick(scored)[1]

  def maybe_save(
      self,
      step: int,
      state: State,
      data_state: Any,
      *,
      force: bool = False,
      metrics: dict[str, float] | None = None,
  ) -> bool:
    """Saves when step is on the interval (or force); returns whether.

    `metrics` (validation metrics of this step) rank it for `best_metric`.
    """
    if not force and step % self.save_every:
      return False
    if step in self.manager.all_steps():
      return False
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_tree(state)),
            data=ocp.args.JsonSave(_jsonable(data_state)),
        ),
        metrics=metrics,
    )
    return True

  def check_shapes(
      self, step: int, state: State, *, partial: bool = False
  ) -> None:
    """Refuses a checkpoint whose tree or shapes differ from `state`.

    `partial`: `state` holds some of the checkpoint's fields (inference);
    what only the checkpoint has is then expected, not an error.
    """
    theirs = _flat_shapes(self._stored_metadata(step))
    ours = _flat_shapes(_to_tree(state))
    lines = [
        f'{name}: checkpoint {theirs[name]}, config {shape}'
        for name, shape in ours.items()
        if name in theirs and theirs[name] != shape
    ]
    only_ckpt = sorted(set(theirs) - set(ours))
    only_cfg = sorted(set(ours) - set(theirs))
    if only_ckpt and not partial:
      lines.append(f'only in the checkpoint: {only_ckpt[:20]}')
    if only_cfg:
      lines.append(f'only in the configured model: {only_cfg[:20]}')
    if lines:
      raise ValueError(
          f'checkpoint {self.directory / str(step)} does not match the '
          'configured model (shapes differ; use another workdir or the '
          'same model config):\n  ' + '\n  '.join(lines)
      )

  def restore(
      self, step: int, state: State, shardings: Any
  ) -> tuple[State, Any]:
    """Restores `step` into the structure/shardings of `state`.

    Raises ValueError (naming paths and shapes) for a different model and
    IncompleteCheckpointError for unreadable or missing files.
    """
    self.check_shapes(step, state)
    typed = type(state) if hasattr(state, 'from_dict') else None
    abstract = _abstract(_to_tree(state), _to_tree(shardings))
    try:
      out = self.manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract),
              data=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise IncompleteCheckpointError(
          f'{self.directory / str(step)}: cannot be restored '
          f'({type(e).__name__}: {str(e)[:300]})'
      ) from e
    if out['data'] is None:
      raise IncompleteCheckpointError(
          f'{self.directory / str(step)}: the data iterator state is missing'
      )
    restored = typed.from_dict(out['state']) if typed else out['state']
    return restored, _from_jsonable(out['data'])

  def restore_subset(
      self, step: int, tree: dict[str, Any], shardings: dict[str, Any]
  ) -> dict[str, Any]:
    """Restores only the top-level fields in `tree` (e.g. params, rest,
    ema) of checkpoint `step`; the others (optimizer state) are not read.

    A field the checkpoint saved as None (a run without EMA) comes back as
    None. Raises as `restore`.
    """
    stored = self._stored_fields(step)
    tree = {k: (None if stored.get(k) is None else v) for k, v in tree.items()}
    self.check_shapes(step, tree, partial=True)
    abstract = _abstract(
        tree, {k: None if v is None else shardings[k] for k, v in tree.items()}
    )
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract
    )
    # The pytree handler restores a subset; the standard one cannot.
    reader = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={'state': ocp.PyTreeCheckpointHandler()},
    )
    try:
      out = reader.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(
                  item=abstract, restore_args=restore_args, partial_restore=True
              )
          ),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise IncompleteCheckpointError(
          f'{self.directory / str(step)}: cannot be restored '
          f'({type(e).__name__}: {str(e)[:300]})'
      ) from e
    finally:
      reader.close()
    return {k: out['state'].get(k) for k in tree}

  def _stored_fields(self, step: int) -> dict[str, Any]:
    """The top-level fields of checkpoint `step`'s state tree."""
    stored = self._stored_metadata(step)
    return dict(getattr(stored, 'tree', stored))

  def _stored_metadata(self, step: int) -> Any:
    """Orbax's metadata of checkpoint `step`'s state tree."""
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-except
      raise IncompleteCheckpointError(
          f'{self.directory / str(step)}: cannot read its metadata '
          f'({type(e).__name__}: {str(e)[:300]})'
      ) from e
    if stored is None:
      raise IncompleteCheckpointError(
          f'{self.directory / str(step)}: no state metadata'
      )
    return stored

  def restore_latest(
      self, state: State, shardings: Any
  ) -> tuple[State, Any] | None:
    """Restores the newest readable checkpoint; None when there is none.

    Unreadable ones are skipped with a warning and, with
    `cleanup_incomplete`, moved to workdir/checkpoints_incomplete so that
    the run saves a fresh checkpoint for that step later.
    """
    for step in reversed(self.all_steps()):
      path = self.directory / str(step)
      logging.info('Restoring checkpoint %s', path)
      try:
        return self.restore(step, state, shardings)
      except IncompleteCheckpointError as e:
        logging.warning(
            'Skipping incomplete checkpoint %s: %s; trying the previous one',
            path,
            e,
        )
        if self.cleanup_incomplete:
          self._set_aside(step)
    return None

  def restore_for_inference(
      self, step: int | None, tree: dict[str, Any], shardings: dict[str, Any]
  ) -> tuple[int, dict[str, Any]]:
    """(step, fields) for evaluate/predict/export: the top-level fields of
    `tree` (params, rest, ema) of checkpoint `step`, or of the latest
    complete one (incomplete newer ones skipped with a warning). The
    optimizer state is not read.

    Raises:
      FileNotFoundError: no checkpoint, or none for `step`.
      IncompleteCheckpointError: `step` names an incomplete checkpoint
        (one line naming the complete ones).
    """
    steps = sorted(self.all_steps())
    where = self.directory
    if not steps:
      raise FileNotFoundError(
          f'no checkpoint in {where}; train first (python -m drpl_jax.main)'
      )
    if step is not None and step not in steps:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {where}; have {steps}'
      )
    bad = []
    for s in ([step] if step is not None else reversed(steps)):
      try:
        return s, self.restore_subset(s, tree, shardings)
      except IncompleteCheckpointError as e:
        if step is not None:
          raise IncompleteCheckpointError(
              f'checkpoint {where / str(s)} is incomplete (an interrupted '
              f'save?): {str(e).splitlines()[0]}; leave out --step for the '
              'latest complete one'
          ) from None
        logging.warning(
            'Skipping incomplete checkpoint %s: %s; using the previous one',
            where / str(s),
            e,
        )
        bad.append(s)
    raise IncompleteCheckpointError(
        f'every checkpoint in {where} is incomplete: {bad}'
    )

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step folder out of the manager's directory."""
    if jax.process_index() == 0:
      target = self.workdir / INCOMPLETE_DIR
      target.mkdir(parents=True, exist_ok=True)
      dest = target / str(step)
      if dest.exists():
        dest.rmtree()
      (self.directory / str(step)).rename(dest)
      logging.warning('Moved %s to %s', self.directory / str(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'drpl_set_aside_{step}')
    self.manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _to_tree(state: Any) -> Any:
  """A typed state (with `to_dict`) -> the dict tree saved on disk."""
  return state.to_dict() if hasattr(state, 'to_dict') else state


def _abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings, for orbax's restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree,
      shardings,
  )


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'params.blocks.0.attn.q.kernel' -> shape, for arrays and metadata."""
  is_leaf = lambda x: hasattr(x, 'shape') and not isinstance(x, dict)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  out = {}
  for path, leaf in flat:
    names = [_key_name(k) for k in path]
    names = [n for n in names if n != 'value']  # nnx Variable payloads
    if hasattr(leaf, 'shape'):
      out['.'.join(names)] = tuple(leaf.shape)
  return out


class PreemptionWatcher:
  """Tells the training loop when to save and stop for a preemption.

  Single process: SIGTERM (the usual notice from Kubernetes, SLURM,
  preemptible VMs) sets a flag; the loop saves at the next step and exits
  cleanly. Multi-process (jax.distributed initialised): JAX's preemption
  service receives the signal, and `reached_preemption_sync_point` makes
  every process stop at the same step.
  """

  def __init__(self):
    self._multihost = jax.distributed.is_initialized()
    self._flag = threading.Event()
    self._previous = None
    if (
        not self._multihost
        and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning(
        'Received signal %d: saving a checkpoint and stopping', signum
    )
    self._flag.set()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call it at every step)."""
    if self._multihost:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._flag.is_set()

  def close(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _jsonable(x: Any) -> Any:
  """Iterator states may hold bytes; JSON holds them as latin-1 strings."""
  if isinstance(x, bytes):
    return {'__bytes__': x.decode('latin-1')}
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if hasattr(x, 'item') and callable(x.item):
    return x.item()
  return x


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {'__bytes__'}:
      return x['__bytes__'].encode('latin-1')
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x
