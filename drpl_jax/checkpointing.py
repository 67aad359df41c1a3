"""Orbax checkpoints of the train state and the data iterator position.

Layout under `workdir/checkpoints/<step>/`: `state` (the train-state pytree,
restored straight into its shardings) and `data` (the grain iterator state as
JSON), so a resumed run continues the same example sequence. `workdir/
meta.json` records the model config the checkpoints belong to; a checkpoint
of a different model is refused with the shapes that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

State = dict[str, Any]


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short, stable hash of the whole config (recorded in reports)."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, restores latest."""

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / 'checkpoints'
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'))

  def write_meta(self, config: ml_collections.ConfigDict, model_cfg,
                 info=None) -> None:
    """Writes workdir/meta.json (process 0); refuses a different model."""
    meta = {
        'model': dataclasses.asdict(model_cfg),
        'config_hash': config_hash(config),
        'config': json.loads(config.to_json_best_effort()),
        'data': {'name': getattr(info, 'name', None),
                 'version': getattr(info, 'version', None),
                 'class_names': list(getattr(info, 'class_names', ()))},
    }
    path = self.workdir / 'meta.json'
    if path.exists():
      old = json.loads(path.read_text())
      if old.get('model') != meta['model'] and self.latest_step() is not None:
        diff = {k: (old['model'].get(k), v) for k, v in meta['model'].items()
                if old['model'].get(k) != v}
        raise ValueError(
            f'{self.workdir} holds checkpoints of a different model; '
            f'differences (checkpoint, config): {diff}. Use another workdir.')
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      tmp = self.workdir / 'meta.json.tmp'
      tmp.write_text(json.dumps(meta, indent=2, default=str))
      os.replace(tmp, path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def maybe_save(self, step: int, state: State, data_state: Any, *,
                 force: bool = False) -> bool:
    """Saves when step is on the interval (or force); returns whether."""
    if not force and step % self.save_every:
      return False
    if step in self.manager.all_steps():
      return False
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_jsonable(data_state))))
    return True

  def restore(self, step: int, state: State, shardings: Any
              ) -> tuple[State, Any]:
    """Restores `step` into the structure/shardings of `state`."""
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f'checkpoint {self.directory / str(step)} does not match the '
          f'configured model: {e}') from e
    return out['state'], _from_jsonable(out['data'])

  def restore_latest(self, state: State, shardings: Any
                     ) -> tuple[State, Any] | None:
    step = self.latest_step()
    if step is None:
      return None
    logging.info('Restoring checkpoint %s', self.directory / str(step))
    return self.restore(step, state, shardings)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


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
