r"""Jitted, sharded evaluation of a checkpoint with a clinical report.

  python -m drpl_jax.evaluate --config=configs/demo.py --workdir=/tmp/demo \
      [--step N] [--split test] [--data=cxr_folder:/path/to/folder]

writes `workdir/eval/<name>/report.json`, `report.md` and PNG plots, where
<name> is the split (configured data set) or the folder name (external data).
Each head (cls, dist) and their mean are reported; the top-level metrics are
those of the mean (what `model(x, train=False)` predicts). A temperature
fitted on the validation split is applied to the test predictions and the
ECE before and after is reported. The online teacher (when configured) is
evaluated on the same images, external folders included; the shortcut
probes and the attention-rollout share in the lung box are added as
`probes` and `attention` (drpl_jax/evaluation/probes.py; off with
`--config.probes.enabled=False`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx

from drpl_jax import cli
from drpl_jax.evaluation import metrics as metrics_lib
from drpl_jax.evaluation import probes as probes_lib
from drpl_jax.evaluation import report as report_lib
from drpl_jax.input import pipeline as input_pipeline
from drpl_jax.models.config import ModelConfig
from drpl_jax.parallel import sharding
from drpl_jax.train import checkpointing
from drpl_jax.train import loop as train
from drpl_jax.train import state as state_lib
from drpl_jax.utils import files

# What restoring a run and reading its data raise on bad input (no
# meta.json or checkpoint, a half-written step, a bad --data or --config):
# evaluate, predict and export report it as one line (cli.user_errors).
BAD_INPUT_ERRORS = (
    FileNotFoundError,
    ValueError,
    checkpointing.IncompleteCheckpointError,
)


@dataclasses.dataclass(frozen=True)
class _Images:
  """The images a report is on.

  `splits` of config.data updated with `data_config` ({} for the configured
  data set; an external folder's otherwise), their labels mapped to the
  training classes through `label_map` (None: as they are); `name` names
  the report's folder.
  """

  name: str
  splits: tuple[str, ...]
  data_config: dict[str, Any]
  label_map: np.ndarray | None


class Evaluator:
  """A restored checkpoint (weights only) plus a jitted eval step on a mesh.

  Built by `state.build_inference`: no optimizer, and only params, model
  state and EMA are read from the checkpoint.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      workdir: str,
      step: int | None = None,
  ):
    self.config = config
    setup = state_lib.build_inference(config)
    self.mesh = setup.mesh
    self.graphdef = setup.graphdef
    self.step, self.state = setup.restore(workdir, step)
    self.step_cfg = setup.step_cfg
    self.eval_step = setup.eval_step()

  def predict(
      self, batches, params_key: str = 'params'
  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    return train.predict_split(
        self.eval_step,
        self.state.weights(params_key),
        self.state.rest,
        batches,
        self.mesh,
    )


def _batches(config, data_config, split):
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.data.update(data_config)
  return input_pipeline.create_eval_iterator(
      input_pipeline.DataConfig.from_config(cfg.data),
      split,
      batch_size=cfg.eval_batch_size,
  )


def head_reports(
    logits: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    groups,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
  """Metrics for every head; the report of the 'mean' head at the top."""
  heads = {}
  for head, value in logits.items():
    probs = metrics_lib.softmax(value)
    heads[head] = metrics_lib.classification_metrics(
        probs,
        labels,
        class_names,
        groups=groups,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
  report = dict(heads['mean'])
  if len(heads) > 1:
    report['heads'] = heads
  return report


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    split: str | None = None,
    data: str | None = None,
    n_bootstrap: int = 1000,
    use_ema: bool | None = None,
) -> dict[str, Any]:
  """Evaluates a checkpoint and writes the report; returns report.json."""
  from drpl_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  evaluator = Evaluator(config, workdir, step)
  train_info = data_lib.ensure_prepared(config.data)
  class_names = list(train_info.class_names)
  images = _images(config, data, split, class_names)
  params_keys = ['params']
  if (use_ema is None or use_ema) and evaluator.state.ema is not None:
    params_keys.append('ema')
  out_dir = os.path.join(workdir, 'eval', images.name)
  result = None
  for params_key in params_keys:
    logits, labels, groups = _predict_splits(
        evaluator, config, images, params_key
    )
    report = head_reports(
        logits, labels, class_names, groups, n_bootstrap, config.seed
    )
    if not data:
      report['temperature'] = _temperature(
          evaluator, config, logits['mean'], labels, params_key
      )
    if config.teacher.get('arch') and params_key == 'params':
      teacher = teacher_report(
          config,
          evaluator.mesh,
          images.splits,
          class_names,
          images.data_config,
          images.label_map,
          n_bootstrap,
          config.seed,
      )
      if teacher is not None:
        report['teacher'] = teacher
    if probes_lib.probe_settings(config)['enabled']:
      _add_probes(
          report, evaluator, config, images, params_key, class_names, labels
      )
    report.update(
        checkpoint_step=evaluator.step,
        weights=params_key,
        config_hash=checkpointing.config_hash(config),
        data={
            'name': config.data.name if not data else data,
            'version': train_info.version,
            'split': images.name,
        },
        bootstrap={'n': n_bootstrap, 'seed': config.seed},
    )
    target = out_dir if params_key == 'params' else os.path.join(out_dir, 'ema')
    paper = tuple(class_names) == report_lib.PAPER_CLASSES and not data
    if jax.process_index() == 0:  # every process holds the same report
      report_lib.write_report(
          target,
          report,
          metrics_lib.softmax(logits['mean']),
          labels,
          class_names,
          title=f'{data or config.data.name} / {images.name} / step '
          f'{evaluator.step} ({params_key})',
          paper_reference=paper,
      )
      logging.info(
          'Wrote %s/report.json: accuracy %.4f', target, report['accuracy']
      )
    result = result or report
  return result


def _images(
    config: ml_collections.ConfigDict,
    data: str | None,
    split: str | None,
    class_names: Sequence[str],
) -> _Images:
  """The images of `--data` (every split of an external folder) or of
  `split` of the configured data set (default its test split)."""
  from drpl_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  if not data:
    split = split or config.data.test_split
    return _Images(split, (split,), {}, None)
  data_config, name, label_map = external_data(data, class_names)
  ext = ml_collections.ConfigDict(config.data.to_dict())
  ext.update(data_config)
  # Another site's images were never trained on: evaluate all of them.
  counts = data_lib.ensure_prepared(ext).num_examples
  splits = tuple(
      s for s in ('train', 'validation', 'test') if counts.get(s, 0) > 0
  )
  return _Images(name, splits, data_config, label_map)


def _predict_splits(evaluator, config, images: _Images, params_key):
  """(logits per head, labels, patient groups or None) of all `images`."""
  from drpl_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  all_logits: dict[str, list[np.ndarray]] = {}
  all_labels, all_groups = [], []
  for split in images.splits:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.update(images.data_config)
    logits, labels, indices = evaluator.predict(
        input_pipeline.create_eval_iterator(
            input_pipeline.DataConfig.from_config(cfg.data),
            split,
            batch_size=cfg.eval_batch_size,
        ),
        params_key,
    )
    source = data_lib.get_source(cfg.data, split)
    patients = [source.patient_ids[int(i)] for i in indices]
    if images.label_map is not None:
      labels = images.label_map[labels]
    for k, v in logits.items():
      all_logits.setdefault(k, []).append(v)
    all_labels.append(labels)
    all_groups.extend(patients)
  # Images without a patient id are their own resampling unit.
  groups = (
      [g or f'__image_{i}' for i, g in enumerate(all_groups)]
      if any(all_groups)
      else None
  )
  return (
      {k: np.concatenate(v) for k, v in all_logits.items()},
      np.concatenate(all_labels),
      groups,
  )


def _add_probes(
    report: dict[str, Any],
    evaluator: Evaluator,
    config: ml_collections.ConfigDict,
    images: _Images,
    params_key: str,
    class_names: Sequence[str],
    labels: np.ndarray,
) -> None:
  """report['probes'] and report['attention'] (see evaluation.probes)."""
  report['probes'] = probes_lib.shortcut_probes(
      config,
      evaluator,
      report,
      class_names,
      labels,
      lambda ev: _predict_splits(ev, config, images, params_key)[:2],
  )
  report['attention'] = probes_lib.rollout_summary(
      config,
      evaluator.graphdef,
      evaluator.state.weights(params_key),
      evaluator.state.rest,
      (
          b
          for s in images.splits
          for b in _batches(config, images.data_config, s)
      ),
  )


def teacher_report(
    config,
    mesh,
    splits: str | Sequence[str],
    class_names: Sequence[str],
    data_config: dict[str, Any] | None = None,
    label_map: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any] | None:
  """The converted online teacher's metrics on the same images and views.

  `splits`, `data_config` and `label_map` as for the student: the
  configured data set's split, or every split of an external folder with
  its class folders mapped to the training classes. Holds the keys of a
  student report that the reproduction table reads (per_class, macro,
  confusion_matrix, ci95 with image-bootstrap intervals).
  """
  teacher = train.create_online_teacher(config, mesh)
  if teacher is None:  # an arch with no checkpoint where nothing distils
    return None
  forward = jax.jit(
      lambda state, images: nnx.merge(teacher.graphdef, state)(
          images.astype(jnp.float32) / 255.0
      ),
      in_shardings=(teacher.shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.batch_sharding(mesh),
  )
  logits, labels = [], []
  splits = (splits,) if isinstance(splits, str) else tuple(splits)
  for split in splits:
    for batch in _batches(config, data_config or {}, split):
      glob = input_pipeline.to_global_batch(batch, mesh)
      keep = train.gather(glob['mask']).astype(bool)
      out = forward(teacher.state, glob['image'])
      logits.append(train.gather(out)[keep])
      labels.append(train.gather(glob['label'])[keep])
  labels = np.concatenate(labels)
  if label_map is not None:
    labels = label_map[labels]
  m = metrics_lib.classification_metrics(
      metrics_lib.softmax(np.concatenate(logits)),
      labels,
      class_names,
      n_bootstrap=n_bootstrap,
      seed=seed,
  )
  return dict(
      {k: m[k] for k in report_lib.CLASSIFICATION_KEYS},
      description=teacher.description,
      auc=m['macro'].get('auc'),
      sensitivity={c: v['sensitivity'] for c, v in m['per_class'].items()},
  )


def _temperature(evaluator, config, test_logits, test_labels, params_key):
  val_logits, val_labels, _ = evaluator.predict(
      input_pipeline.create_eval_iterator(
          input_pipeline.DataConfig.from_config(config.data),
          batch_size=config.eval_batch_size,
      ),
      params_key,
  )
  t = metrics_lib.fit_temperature(val_logits['mean'], val_labels)
  ece = metrics_lib.expected_calibration_error
  return {
      'value': t,
      'fitted_on': config.data.eval_split,
      'ece_before': ece(metrics_lib.softmax(test_logits), test_labels),
      'ece_after': ece(metrics_lib.softmax(test_logits, t), test_labels),
  }


def external_data(
    spec: str, class_names: Sequence[str]
) -> tuple[dict[str, Any], str, np.ndarray]:
  """'cxr_folder:PATH' -> (data config, report name, label map).

  PATH holds class folders or a manifest.csv (path,label[,patient_id]
  [,split]; its patient ids then drive the bootstrap). Classes are matched
  to the training classes case-insensitively; a subset is allowed, an
  unknown one is an error naming it.
  """
  kind, _, path = spec.partition(':')
  if kind != 'cxr_folder' or not path:
    raise ValueError(f'--data={spec!r}: expected cxr_folder:PATH')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--data folder {path} does not exist')
  lower = {c.lower(): i for i, c in enumerate(class_names)}
  folders = _external_classes(path)
  unknown = [d for d in folders if d.lower() not in lower]
  if unknown:
    raise ValueError(
        f'{path}: classes {unknown} are not training '
        f'classes {list(class_names)} (matched ignoring case)'
    )
  if not folders:
    raise ValueError(f'{path}: no class folders and no manifest.csv')
  label_map = np.asarray([lower[d.lower()] for d in folders])
  data_config = {
      'name': 'cxr_folder',
      'manual_dir': path,
      'classes': ','.join(folders),
  }
  return data_config, os.path.basename(path.rstrip('/')), label_map


def _external_classes(path: str) -> list[str]:
  """The class names of an external cxr_folder: manifest labels or folders."""
  from drpl_jax.data import cxr_folder  # pylint: disable=g-import-not-at-top

  manifest = os.path.join(path, cxr_folder.MANIFEST)
  if os.path.isfile(manifest):
    return sorted(
        {
            row['label']
            for row in cxr_folder._read_manifest(manifest)  # pylint: disable=protected-access
            if row['label']
        }
    )
  return sorted(
      d
      for d in os.listdir(path)
      if os.path.isdir(os.path.join(path, d)) and not d.startswith('.')
  )


def config_from_workdir(
    workdir: str, *, config_flag: bool = False
) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its meta.json).

  `config_flag`: the command has a --config flag to suggest instead.
  """
  try:
    meta = files.read_meta(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{e}: point --workdir at a training run's workdir "
        '(it holds meta.json and checkpoints/)'
        + (', or pass --config' if config_flag else '')
    ) from None
  return ml_collections.ConfigDict(meta['config'])


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """'model.depth' -> value, JSON-normalised (tuples become lists)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v

  walk(json.loads(json.dumps(config.to_dict(), default=str)), '')
  return out


def _model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """'model.depth' -> value of the ModelConfig `config.model` builds."""
  typed = ModelConfig.from_config(config.model)
  return _flat(ml_collections.ConfigDict({'model': dataclasses.asdict(typed)}))


def run_config(
    workdir: str,
    given: ml_collections.ConfigDict | None,
    argv: Sequence[str] = (),
) -> ml_collections.ConfigDict:
  """The config to evaluate `workdir` with.

  Default: the run's own (meta.json). With an explicit --config, its model
  keys must match the run's (else a one-line error naming the keys that
  differ); everything else still comes from the run, and the explicit
  `--config.KEY=VALUE` flags in `argv` are merged over it.
  """
  if given is None:
    return config_from_workdir(workdir)
  if not (epath.Path(workdir) / 'meta.json').exists():
    return given
  run = config_from_workdir(workdir)
  # The typed models are compared: a key the run's meta.json predates
  # reads as its ModelConfig default.
  ran, new = _model_fields(run), _model_fields(given)
  explicit = {
      a[len('--config.') :].partition('=')[0]
      for a in argv
      if a.startswith('--config.')
  }
  differ = sorted(k for k in set(ran) | set(new) if ran.get(k) != new.get(k))
  if differ:
    shown = ', '.join(
        f'{k} (run: {ran.get(k)!r}, --config: {new.get(k)!r})'
        for k in differ[:4]
    )
    more = f' and {len(differ) - 4} more' if len(differ) > 4 else ''
    raise ValueError(
        f"--config differs from the run's own config "
        f'({workdir}/meta.json) in {shown}{more}; leave out '
        "--config to evaluate with the run's own"
    )
  for key in sorted(explicit & set(_flat(given))):
    *parents, leaf = key.split('.')
    node, src = run, given
    for name in parents:
      node, src = node[name], src[name]
    node[leaf] = src[leaf]
  return run


_CONFIG = None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from drpl_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from drpl_jax.parallel import hostmem  # pylint: disable=g-import-not-at-top

  hostmem.configure()  # before JAX starts its CPU client
  distributed.initialize()
  with cli.user_errors(BAD_INPUT_ERRORS):
    config = run_config(flags.FLAGS.workdir, _CONFIG.value, sys.argv[1:])
    report = evaluate(
        config,
        flags.FLAGS.workdir,
        step=flags.FLAGS.step,
        split=flags.FLAGS.split,
        data=flags.FLAGS.data,
        n_bootstrap=flags.FLAGS.n_bootstrap,
    )
  print(
      json.dumps(
          {
              'accuracy': report['accuracy'],
              'balanced_accuracy': report['balanced_accuracy'],
              'num_examples': report['num_examples'],
              'report': os.path.join(
                  flags.FLAGS.workdir,
                  'eval',
                  report['data']['split'],
                  'report.json',
              ),
          }
      )
  )


def run() -> None:
  """The command line: defines the flags, then runs `main` under the exit
  policy of drpl_jax/cli.py."""
  global _CONFIG
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file(
      'config',
      None,
      'Config file (default: the one saved in workdir/meta.json).',
  )
  cli.define_workdir()
  cli.define_step()
  flags.DEFINE_string('split', None, 'Split (default config.data.test_split).')
  flags.DEFINE_string('data', None, 'External data: cxr_folder:PATH.')
  flags.DEFINE_integer('n_bootstrap', 1000, 'Bootstrap resamples.')
  cli.run(main)
