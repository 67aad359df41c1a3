"""Deterministic, resumable, per-process input pipeline on grain.

Train: an endless grain `MapDataset` over global record positions. Epoch `e`
is a seeded permutation of the source (or a class-balanced draw), each
example repeated `repeated_aug` times in a row (DeiT's RASampler), cut to the
source length and into global batches (remainder dropped). Process `p` reads
slots `[p * b, (p + 1) * b)` of every global batch of `B = b * processes`,
so the global batch is the same whatever the process count. Every random
augmentation of the record at position `i` of epoch `e` draws from
`np.random.default_rng([seed, e, i])`: a pure function of (seed, epoch,
position), never of thread or worker timing, so `get_state()`/`set_state()`
resume bit-identically.

Eval: a finite iterator of `ceil(N / B)` batches on every process; slot `s` of
global batch `k` holds example `k * B + s` or, past the end, a masked pad with
`index` -1. Every example appears exactly once with `mask` True over all
processes, and all processes run the same number of steps.

Nothing here imports TensorFlow. The `create_*` helpers take the typed
`DataConfig` and the `DatasetInfo` the run's setup resolved
(`drpl_jax.data.ensure_prepared`); they never start a build.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from drpl_jax.input import augment
from drpl_jax.input.config import DataConfig

# Threads each assembling a whole batch; PIL and PNG decoding release the
# GIL, so a few threads keep a core busy without worker processes.
DEFAULT_NUM_THREADS = 4


def _per_process_batch(
    batch_size: int, process_count: int, process_index: int
) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} is not in '
        f'[0, process_count={process_count})'
    )
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'batch_size={batch_size} must be a positive multiple '
        f'of process_count={process_count}'
    )
  return batch_size // process_count


def _check_example(example: Any, index: int) -> tuple[np.ndarray, int]:
  """Validates one source record and returns (image, label)."""
  if not isinstance(example, dict) or 'image' not in example:
    raise ValueError(
        f'source[{index}] must be a dict with an "image" and a '
        f'"label"; got {type(example).__name__}'
    )
  if 'label' not in example:
    raise ValueError(
        f'source[{index}] has no "label" key (keys: {sorted(example)})'
    )
  return example['image'], int(example['label'])


class _EpochOrder:
  """The source index at each position of each epoch; cached, thread-safe."""

  def __init__(
      self,
      num_examples: int,
      seed: int,
      repeated_aug: int,
      labels: np.ndarray | None,
  ):
    self._n = num_examples
    self._seed = seed
    self._repeats = repeated_aug
    self._probs = None
    if labels is not None:
      counts = np.bincount(labels)
      weights = 1.0 / counts[labels]
      self._probs = weights / weights.sum()
    self._cache: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict()
    )
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    # Picklable for grain worker processes: no lock, no cache.
    state = dict(self.__dict__)
    del state['_lock'], state['_cache']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._cache = collections.OrderedDict()
    self._lock = threading.Lock()

  def _compute(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    if self._probs is None:
      base = rng.permutation(self._n)
    else:
      base = rng.choice(self._n, size=self._n, replace=True, p=self._probs)
    # Repeats sit next to each other, so they land in the same global batch,
    # as DeiT's RASampler arranges them.
    return np.repeat(base, self._repeats)[: self._n]

  def __call__(self, epoch: int) -> np.ndarray:
    with self._lock:
      order = self._cache.get(epoch)
      if order is None:
        order = self._compute(epoch)
        self._cache[epoch] = order
        while len(self._cache) > 4:
          self._cache.popitem(last=False)
      return order


def _read(source, indices: Sequence[int]) -> list[Any]:
  """Reads examples, with one batched read when the source offers one."""
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None and indices:
    return list(getitems(list(indices)))
  return [source[i] for i in indices]


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


@dataclasses.dataclass
class _Slice:
  """This process's slots of every global batch (picklable for workers)."""

  source: Any
  batch_size: int  # global
  per_process: int
  process_index: int
  image_size: int

  def positions(self, step: int) -> range:
    """Global positions of this process's examples in batch `step`."""
    start = step * self.batch_size + self.process_index * self.per_process
    return range(start, start + self.per_process)


@dataclasses.dataclass
class _TrainBatch(_Slice):
  """Maps a step number to this process's augmented batch."""

  order: _EpochOrder
  seed: int
  steps_per_epoch: int
  augment_config: augment.AugmentConfig
  teacher_logits: Mapping[str, Any] | None = None

  def __call__(self, step: int, _: Any) -> dict[str, np.ndarray]:
    epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
    positions = self.positions(step_in_epoch)
    order = self.order(epoch)
    indices = [int(order[p]) for p in positions]
    examples = _read(self.source, indices)
    return _stack(
        [
            self._one(ex, index, epoch, position)
            for ex, index, position in zip(examples, indices, positions)
        ]
    )

  def _one(
      self, example: Any, index: int, epoch: int, position: int
  ) -> dict[str, np.ndarray]:
    image, label = _check_example(example, index)
    rng = np.random.default_rng([self.seed, epoch, position])
    out = augment.train_views(
        image, rng, size=self.image_size, config=self.augment_config
    )
    out['label'] = np.int32(label)
    if self.teacher_logits is not None:
      out['teacher_logits'] = self._teacher(example, index)
    return out

  def _teacher(self, example: dict[str, Any], index: int) -> np.ndarray:
    key = example.get('id')
    if isinstance(key, bytes):
      key = key.decode()
    if key is None or key not in self.teacher_logits:
      raise ValueError(
          f'no teacher logits for example id {key!r} (source '
          f'index {index}); the soft labels must cover every '
          'training example'
      )
    if hasattr(self.teacher_logits, 'lookup'):  # soft_labels.SoftLabels
      return self.teacher_logits.lookup([key])[0]
    return np.asarray(self.teacher_logits[key], np.float32)


def _check_labels(
    labels: Sequence[int] | np.ndarray | None, n: int
) -> np.ndarray:
  if labels is None:
    raise ValueError('balanced=True needs `labels` (one per example)')
  label_array = np.asarray(labels, dtype=np.int64)
  if label_array.shape != (n,) or label_array.min(initial=0) < 0:
    raise ValueError(
        f'labels must be {n} non-negative ints (one per '
        f'example), got shape {label_array.shape}'
    )
  return label_array


def train_iterator(
    source,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    augment_config: Any = None,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    balanced: bool = False,
    labels: Sequence[int] | np.ndarray | None = None,
    teacher_logits: Mapping[str, Any] | None = None,
    num_threads: int = DEFAULT_NUM_THREADS,
) -> grain.DatasetIterator:
  """An endless, resumable iterator of augmented per-process train batches.

  Args:
    source: random access (`len`, `source[i] -> {'image': uint8 [H, W, 3],
      'label': int, ...}`).
    batch_size: the GLOBAL batch size over all processes.
    image_size: output side S.
    seed: the pipeline seed; order and augmentations derive from it only.
    augment_config: `config.data.augment` (ConfigDict/dict) or an
      `augment.AugmentConfig`; None = the default DeiT recipe.
    process_index: this process; reads its slice of each global batch.
    process_count: number of processes.
    num_workers: grain worker processes (0 = threads in this process).
    balanced: class-balanced sampling (with replacement); needs `labels`.
    labels: the label of every source example, for `balanced`.
    teacher_logits: offline soft labels, example id -> float [C] (a dict or
      a `drpl_jax.pytorch.soft_labels.SoftLabels`); adds
      `'teacher_logits': float32 [b, C]` to every batch (joined by the
      source's `'id'`). Exact only for views the teacher saw.
    num_threads: reader threads (per worker process when num_workers > 0).

  Returns:
    A grain `DatasetIterator` yielding `{'image': uint8 [b, S, S, 3],
    'label': int32 [b]}` (+ `teacher_logits`; + `teacher_image` uint8
    [b, S, S, 3] with `teacher_view='crop'`, see `augment.train_views`), `b = batch_size //
    process_count`; it has `get_state()` / `set_state()` for checkpointing
    (a state is valid for the same `num_workers` only).
  """
  per_process = _per_process_batch(batch_size, process_count, process_index)
  config = augment.AugmentConfig.from_config(augment_config)
  n = len(source)
  steps_per_epoch = n // batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f'the source has {n} examples, fewer than one global '
        f'batch of {batch_size}'
    )
  label_array = _check_labels(labels, n) if balanced else None
  order = _EpochOrder(n, seed, config.repeated_aug, label_array)
  batch_fn = _TrainBatch(
      source,
      batch_size,
      per_process,
      process_index,
      image_size,
      order=order,
      seed=seed,
      steps_per_epoch=steps_per_epoch,
      augment_config=config,
      teacher_logits=teacher_logits,
  )
  # One element per step (index = steps since the start, endless): grain
  # workers then split the stream by whole batches, so batches do not
  # depend on num_workers.
  ds = grain.MapDataset.range(steps_per_epoch).repeat(None)
  ds = ds.map_with_index(batch_fn)
  it_ds = ds.to_iter_dataset(_read_options(num_threads))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers)
    )
  return iter(it_ds)


def _read_options(num_threads: int) -> grain.ReadOptions:
  # The buffer counts batches: one in flight per thread, plus one ready.
  return grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=num_threads + 1
  )


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside `absl.app.run` (a
  # notebook, pytest, the benchmark) nothing has parsed them: use defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """How many (global) eval batches cover `num_examples`: ceil(N / B)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive')
  return -(-num_examples // batch_size)


@dataclasses.dataclass
class _EvalBatch(_Slice):
  """Maps a step number to this process's eval batch, padded and masked."""

  crop_ratio: float = 0.875

  def __call__(self, step: int, _: Any) -> dict[str, np.ndarray]:
    real = [i for i in self.positions(step) if i < len(self.source)]
    out = [
        self._one(example, index)
        for index, example in zip(real, _read(self.source, real))
    ]
    pad = {
        'image': np.zeros((self.image_size,) * 2 + (3,), np.uint8),
        'label': np.int32(0),
        'mask': np.bool_(False),
        'index': np.int64(-1),
        'id': np.str_(''),
        'patient_id': np.str_(''),
    }
    return _stack(out + [pad] * (self.per_process - len(out)))

  def _one(self, example: Any, index: int) -> dict[str, np.ndarray]:
    image, label = _check_example(example, index)
    image = augment.eval_transform(
        image, size=self.image_size, crop_ratio=self.crop_ratio
    )
    return {
        'image': image,
        'label': np.int32(label),
        'mask': np.bool_(True),
        'index': np.int64(index),
        'id': _text(example.get('id', '')),
        'patient_id': _text(example.get('patient_id', '')),
    }


def _text(value: Any) -> np.str_:
  return np.str_(value.decode('utf-8') if isinstance(value, bytes) else value)


def eval_batches(
    source,
    *,
    batch_size: int,
    image_size: int,
    crop_ratio: float = 0.875,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = DEFAULT_NUM_THREADS,
) -> Iterator[dict[str, np.ndarray]]:
  """A finite iterator of padded, masked eval batches for this process.

  `batch_size` is global. Yields `num_eval_batches(len(source), batch_size)`
  batches of `{'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask':
  bool [b], 'index': int64 [b], 'id': str [b], 'patient_id': str [b]}` on
  every process (`b = batch_size // process_count`); pads have `mask`
  False, `index` -1 and empty ids. The ids come with the image, so a
  report needs no second read of the source.
  """
  per_process = _per_process_batch(batch_size, process_count, process_index)
  steps = num_eval_batches(len(source), batch_size)
  batch_fn = _EvalBatch(
      source,
      batch_size,
      per_process,
      process_index,
      image_size,
      crop_ratio=crop_ratio,
  )
  ds = grain.MapDataset.range(steps).map_with_index(batch_fn)
  return iter(ds.to_iter_dataset(_read_options(num_threads)))


# ----------------------------------------------------------------------------
# Config wrappers and device placement.


def _process(
    process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def source_labels(source) -> np.ndarray:
  """The labels of a source: its `labels` attribute, else read one by one."""
  labels = getattr(source, 'labels', None)
  if labels is None:
    labels = [_check_example(source[i], i)[1] for i in range(len(source))]
  return np.asarray(labels, dtype=np.int64)


def _info(cfg: DataConfig, info: Any) -> Any:
  """The setup's `DatasetInfo`, else the prepared one found (never built)."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  return info if info is not None else data.find_prepared(cfg)


def create_train_iterator(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    info: Any = None,
    soft_labels: str = '',
    teacher_logits: Mapping[str, Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """The train iterator of `cfg.train_split`; never prepares data.

  `info` is the `DatasetInfo` the run's setup resolved
  (`drpl_jax.data.ensure_prepared`); without it the prepared data set is
  found, or a `DataError` names the `prepare` command. Offline soft labels
  are joined when `teacher_logits` (example id -> logits) is given, else
  read from the file `soft_labels` if set. `batch_size` is global.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  process_index, process_count = _process(process_index, process_count)
  info = _info(cfg, info)
  source = data.get_source(info, cfg.train_split)
  if teacher_logits is None and soft_labels:
    from drpl_jax.pytorch import soft_labels as soft_lib  # pylint: disable=g-import-not-at-top

    teacher_logits = soft_lib.SoftLabels.load(
        soft_labels,
        class_names=info.class_names,
        expected_ids=source.ids,
        dataset=(info.name, info.version),
    )
  return train_iterator(
      source,
      batch_size=batch_size,
      image_size=cfg.image_size,
      seed=seed,
      augment_config=cfg.augment,
      process_index=process_index,
      process_count=process_count,
      num_workers=cfg.num_workers,
      balanced=cfg.balanced_sampler,
      labels=source_labels(source) if cfg.balanced_sampler else None,
      teacher_logits=teacher_logits,
  )


def create_eval_iterator(
    cfg: DataConfig,
    split: str | None = None,
    *,
    batch_size: int,
    info: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Eval batches of `split` (default `cfg.eval_split`); never prepares.

  As `eval_batches` (`batch_size` global); `info` as for
  `create_train_iterator`. The iterator is finite: iterate it to the end.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  process_index, process_count = _process(process_index, process_count)
  source = data.get_source(_info(cfg, info), split or cfg.eval_split)
  return eval_batches(
      source,
      batch_size=batch_size,
      image_size=cfg.image_size,
      crop_ratio=cfg.eval_crop_ratio,
      process_index=process_index,
      process_count=process_count,
  )


def to_global_batch(
    batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    data_axes: Sequence[str] = ('data', 'fsdp'),
) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global jax.Arrays split along the batch.

  The leading (batch) dimension is sharded over the mesh axes in
  `data_axes` that the mesh has; the global batch is the concatenation of
  all processes' batches in process order. Text entries (the eval batches'
  `id` and `patient_id`) stay on the host and are left out.
  """
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(
        f'none of data_axes={tuple(data_axes)} is an axis of '
        f'the mesh {mesh.axis_names}'
    )
  spec = jax.sharding.PartitionSpec(axes[0] if len(axes) == 1 else axes)
  sharding = jax.sharding.NamedSharding(mesh, spec)

  def put(name: str, x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f'batch[{name!r}] is a scalar; expected a batch axis')
    return jax.make_array_from_process_local_data(sharding, x)

  return {
      name: put(name, x)
      for name, x in batch.items()
      if np.asarray(x).dtype.kind not in 'USO'
  }
