"""Preparing data sets and reading them back as random-access sources.

`prepare` builds a data set once (TFDS builder -> ArrayRecord) into
`<data_dir>/<name>/<config>/<version>/`, with `summary.json` and `splits.csv`
beside the shards; later calls reuse it. `get_source` reads a split through
`tfds` data sources (ArrayRecord, numpy decode, no tf.data, no TensorFlow),
as the grain input pipeline wants. TFDS is imported only inside functions, so
`import drpl_jax.data` (e.g. for `decode_image`) needs neither TF nor TFDS.

Data is resolved once per run: the run's setup calls `ensure_prepared`,
which prepares (or finds) the data set, on several processes only on
process 0 behind a barrier; everything after it (`get_source`, the input
pipeline's iterators) only finds prepared data (`find_prepared`) and stops
with the `prepare` command to run when there is none. On several hosts,
prepare once beforehand into a shared `data_dir`.
"""

from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import functools
import json
import os
import sys
from typing import Any

import numpy as np
from absl import logging as absl_logging

from drpl_jax.data import images
from drpl_jax.data.files import DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A prepared data set: what it holds and where."""

  name: str  # 'demo' | 'covid19_radiography' | 'cxr_folder'
  version: str  # builder version, e.g. '1.0.0'
  class_names: tuple[str, ...]
  num_examples: dict[str, int]  # split -> count
  data_dir: str  # where it is prepared
  splits_csv: str  # path of splits.csv


def builders() -> dict[str, type]:
  """The data set builders by name (imports TFDS)."""
  # pylint: disable=g-import-not-at-top
  from drpl_jax.data import covid19_radiography
  from drpl_jax.data import cxr_folder
  from drpl_jax.data import demo
  # pylint: enable=g-import-not-at-top
  return {
      'demo': demo.Demo,
      'covid19_radiography': covid19_radiography.Covid19Radiography,
      'cxr_folder': cxr_folder.CxrFolder,
  }


def _hide_gpus_from_tensorflow() -> None:
  """If TF is loaded (TFDS may import it), keep it off the accelerators."""
  tf = sys.modules.get('tensorflow')
  if tf is not None:
    with contextlib.suppress(RuntimeError, AttributeError):
      tf.config.set_visible_devices([], 'GPU')


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR` or `~/tensorflow_datasets`, as TFDS does."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets'
  )


def _builder_and_config(
    name: str,
    manual_dir: str | None = None,
    classes: Sequence[str] | None = None,
    **settings: Any,
) -> tuple[type, Any]:
  """The builder class of `name` and its config for `prepare`'s arguments;
  `settings` (seed, min_side) go to `make_config`, with its defaults, which
  are `prepare`'s."""
  all_builders = builders()
  if name not in all_builders:
    raise DataError(f'unknown data set {name!r}; known: {list(all_builders)}')
  cls = all_builders[name]
  if not cls.USES_MANUAL_DIR and manual_dir:
    print(
        f'[drpl_jax.data] {name} needs no manual_dir; ignoring '
        f'{manual_dir}',
        file=sys.stderr,
    )
  config = cls.make_config(
      manual_dir=manual_dir or '',
      classes=tuple(classes) if classes else None,
      **settings,
  )
  return cls, config


def _folder(data_dir: str, cls: type, config: Any) -> str:
  """Where `prepare` puts the data set of builder `cls` and `config`."""
  return os.path.join(
      data_dir or default_data_dir(), cls.name, config.name, str(cls.VERSION)
  )


def prepared_dir(name: str, *, data_dir: str, **options: Any) -> str:
  """The folder `prepare(name, data_dir=data_dir, **options)` prepares the
  data set in (or has); `options`: its manual_dir, classes, seed, min_side."""
  return _folder(data_dir, *_builder_and_config(name, **options))


def _read_summary(folder: str) -> dict[str, Any] | None:
  path = os.path.join(folder, 'summary.json')
  if not (
      os.path.isfile(path)
      and os.path.isfile(os.path.join(folder, 'dataset_info.json'))
  ):
    return None
  with open(path) as f:
    return json.load(f)


def prepare(
    name: str,
    *,
    data_dir: str,
    manual_dir: str | None = None,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    min_side: int = images.DEFAULT_MIN_SIDE,
) -> dict[str, Any]:
  """Builds a data set if not built yet; returns its JSON summary.

  Args:
    name: a key of `builders()`.
    data_dir: the TFDS data dir ('' = `default_data_dir()`).
    manual_dir: where the raw data is (not used by 'demo').
    classes: a subset / order of the classes (None = all, builder's order).
    seed: the split seed.
    min_side: images with a smaller side are skipped.

  Returns:
    The summary (also in `summary.json` beside the data): examples per split
    and class, patients per split (None when unknown), skipped files with
    path and reason, version, data_dir, splits_csv; plus `reused`: whether
    this call found the data already prepared.

  Raises:
    DataError: bad arguments or input layout, found before any work is done.
  """
  _hide_gpus_from_tensorflow()
  data_dir = data_dir or default_data_dir()
  cls, config = _builder_and_config(
      name, manual_dir, classes, seed=seed, min_side=min_side
  )
  folder = _folder(data_dir, cls, config)
  summary = _read_summary(folder)
  if summary is not None:
    return dict(summary, reused=True)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not absl_logging.level_info():  # quiet console (drpl_jax/cli.py): our
    tfds.disable_progress_bar()  # own per-1000-image lines show progress
  # TFDS prints progress to stdout; keep stdout for the caller (CLI JSON).
  with contextlib.redirect_stdout(sys.stderr):
    builder = cls(config=config, data_dir=data_dir)  # Validates the input.
    _ = builder.listing  # the property validates the input
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if os.path.exists(folder)  # Data without summary: rebuild.
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=config.manual_dir or None,
            try_download_gcs=False,
            download_mode=mode,
        )
    )
  _hide_gpus_from_tensorflow()
  summary = _read_summary(os.fspath(builder.data_dir))
  if summary is None:
    raise RuntimeError(
        f'{builder.data_dir}: build finished without summary.json'
    )
  return dict(summary, reused=False)


def _config_get(config: Any, key: str, default: Any) -> Any:
  if isinstance(config, Mapping) or hasattr(config, 'get'):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def parse_classes(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """'' or None -> None (all); 'A,B' or ['A', 'B'] -> ('A', 'B')."""
  if not value:
    return None
  if isinstance(value, str):
    value = value.split(',')
  return tuple(v.strip() for v in value)


def _info(summary: Mapping[str, Any]) -> DatasetInfo:
  return DatasetInfo(
      name=summary['name'],
      version=summary['version'],
      class_names=tuple(summary['class_names']),
      num_examples=dict(summary['num_examples']),
      data_dir=summary['data_dir'],
      splits_csv=summary['splits_csv'],
  )


def _arguments(data_config: Any) -> dict[str, Any]:
  """`prepare`'s arguments from `config.data` (or a DataConfig, a dict)."""
  return dict(
      name=_config_get(data_config, 'name', ''),
      data_dir=_config_get(data_config, 'data_dir', ''),
      manual_dir=_config_get(data_config, 'manual_dir', ''),
      classes=parse_classes(_config_get(data_config, 'classes', '')),
      seed=int(_config_get(data_config, 'split_seed', 0)),
      min_side=int(
          _config_get(data_config, 'min_side', images.DEFAULT_MIN_SIDE)
      ),
  )


def prepare_command(data_config: Any) -> str:
  """The `python -m drpl_jax.data prepare ...` line for `config.data`."""
  args = _arguments(data_config)
  words = [
      'python -m drpl_jax.data prepare',
      f'--name={args["name"]}',
      f'--data_dir={args["data_dir"] or default_data_dir()}',
  ]
  if args['manual_dir']:
    words.append(f'--manual_dir={args["manual_dir"]}')
  if args['classes']:
    words.append(f'--classes={",".join(args["classes"])}')
  if args['seed']:
    words.append(f'--seed={args["seed"]}')
  if args['min_side'] != images.DEFAULT_MIN_SIDE:
    words.append(f'--min_side={args["min_side"]}')
  return ' '.join(words)


def find_prepared(data_config: Any) -> DatasetInfo:
  """The `DatasetInfo` of `config.data` if it is prepared; never builds.

  Raises:
    DataError: not prepared; the message names the `prepare` command.
  """
  args = _arguments(data_config)
  name = args.pop('name')
  folder = prepared_dir(name, **args)
  summary = _read_summary(folder)
  if summary is None:
    raise DataError(
        f'data set {name} is not prepared in {folder}; prepare '
        f'it first: {prepare_command(data_config)}'
    )
  return _info(summary)


def ensure_prepared(data_config: Any) -> DatasetInfo:
  """Prepares (or finds) `config.data` once, in a run's setup.

  Keys: `name`, `manual_dir`, `data_dir` ('' = default), `classes` ('' or a
  comma separated string), and optionally `split_seed` (0) and `min_side`.
  With several JAX processes only process 0 prepares; the others wait at a
  barrier and then find its result (a shared `data_dir`), or stop with the
  `prepare` command to run.
  """
  index = _process_index()
  if index is None:  # one process
    args = _arguments(data_config)
    return _info(prepare(args.pop('name'), **args))
  error = None
  if index == 0:
    args = _arguments(data_config)
    try:
      prepare(args.pop('name'), **args)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised after the barrier, which the others wait at
  _barrier('drpl_jax.data.ensure_prepared')
  if error is not None:
    raise error
  return find_prepared(data_config)


def _process_index() -> int | None:
  """This JAX process in a multi-process run, else None.

  Asks JAX only when `jax.distributed` was initialised, so that a single
  process (e.g. the PyTorch teacher's training) starts no JAX backend.
  """
  jax = sys.modules.get('jax')
  if jax is None or not jax.distributed.is_initialized():
    return None
  return jax.process_index() if jax.process_count() > 1 else None


def _barrier(name: str) -> None:
  """All JAX processes meet here (a no-op with one process)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  multihost_utils.sync_global_devices(name)


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Source:
  """Random access to one split of a prepared data set.

  `source[i]` -> {'image': uint8 [H, W, 3], 'label': int, 'id': str,
  'patient_id': str}. Pickles as (folder, split) and reopens lazily, so grain
  worker processes get it cheaply.
  """

  def __init__(self, data_dir: str, split: str, class_names: Sequence[str]):
    self.data_dir = data_dir
    self.split = split
    self.class_names = tuple(class_names)
    self._source = None
    self._length = None

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      reader = tfds.builder_from_directory(self.data_dir)
      if self.split not in reader.info.splits:
        raise DataError(
            f'{self.data_dir}: no split {self.split!r}; '
            f'splits: {list(reader.info.splits)}'
        )
      # Image bytes come back undecoded; `_decode` reads the stored PNG.
      self._source = reader.as_data_source(
          self.split, decoders={'image': tfds.decode.SkipDecoding()}
      )
      _hide_gpus_from_tensorflow()
    return self._source

  def __len__(self) -> int:
    if self._length is None:
      self._length = len(self._open())
    return self._length

  @staticmethod
  def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        'image': images.decode_png_rgb(record['image']),
        'label': int(record['label']),
        'id': _text(record['id']),
        'patient_id': _text(record['patient_id']),
    }

  def __getitem__(self, index: int) -> dict[str, Any]:
    length = len(self)
    index = int(index)
    if not -length <= index < length:
      raise IndexError(f'index {index} out of range for {length} examples')
    return self._decode(self._open()[index % length])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read (fewer file reads); same items as `[self[i] for i ...]`."""
    length = len(self)
    for index in indices:
      if not -length <= int(index) < length:
        raise IndexError(f'index {index} out of range for {length} examples')
    records = self._open().__getitems__([int(i) % length for i in indices])
    return [self._decode(r) for r in records]

  def _column(self, key: str) -> list[Any]:
    """One field of every record in source order; images are not decoded."""
    source, out = self._open(), []
    for start in range(0, len(self), 1024):
      records = source.__getitems__(
          list(range(start, min(start + 1024, len(self))))
      )
      out += [r[key] for r in records]
    return out

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """All labels in source order (int32 [N]); read once."""
    return np.asarray(self._column('label'), dtype=np.int32)

  @functools.cached_property
  def ids(self) -> list[str]:
    """All example ids in source order; read once."""
    return [_text(v) for v in self._column('id')]

  @functools.cached_property
  def patient_ids(self) -> list[str]:
    """All patient ids in source order ('' = unknown); read once."""
    return [_text(v) for v in self._column('patient_id')]

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state['_source'] = None
    return state

  def __repr__(self) -> str:
    return f'Source({self.data_dir!r}, split={self.split!r})'


def get_source(data: Any, split: str) -> Source:
  """The random-access source of `split`; never builds.

  `data` is the `DatasetInfo` the run's setup resolved (no file is read),
  or `config.data` (found with `find_prepared`).
  """
  info = data if isinstance(data, DatasetInfo) else find_prepared(data)
  if split not in info.num_examples or not info.num_examples[split]:
    raise DataError(
        f'{info.name} ({info.data_dir}) has no examples in split '
        f'{split!r}; splits: {info.num_examples}'
    )
  return Source(info.data_dir, split, info.class_names)
