r"""Input pipeline throughput: images/s, total and per host CPU core used.

  python -m drpl_jax.bench input --config=configs/drpl_vit.py:variant=micro \
      [--batch_size 64] [--steps 20] [--workers 0] [--threads 4] [--synthetic] \
      [--config.data.manual_dir=PATH ...]

Prints one JSON object per measured pipeline:
  decode: source reads only (PNG decode of a 299x299 image to uint8 RGB);
  train:  decode -> the configured DeiT recipe (RRC, flip, RandAugment,
          random erasing) -> batch at `config.data.image_size`;
  eval:   decode -> resize + centre crop -> padded, masked batch.
`images_per_s_per_core` divides by the CPU time this process and its live
worker processes used (user + system), i.e. by the cores actually busy, not
by the cores present. Without prepared data (or with `--synthetic`) the
source is in-memory PNG-encoded 299x299 grayscale X-ray-like images, so the
benchmark runs anywhere and imports no TensorFlow.
"""

from __future__ import annotations

import io
import os
import sys
import time
import types
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import flags
from PIL import Image

from drpl_jax import cli
from drpl_jax.bench import define_config_flag, emit, no_arguments
from drpl_jax.bench import parse_flags
from drpl_jax.bench import tensorflow_imported
from drpl_jax.input import augment
from drpl_jax.input import pipeline as input_pipeline


def synthetic_xray(rng: np.random.Generator, size: int = 299) -> np.ndarray:
  """A grayscale uint8 [size, size] image with a chest X-ray's texture.

  A bright body ellipse, two darker lungs, rib stripes, film noise: enough
  structure that PNG compresses it like a real radiograph (about 70 KB).
  """
  yy, xx = np.mgrid[0:size, 0:size] / size  # [S, S] each, in [0, 1)
  body = ((xx - 0.5) / 0.45) ** 2 + ((yy - 0.55) / 0.5) ** 2 < 1.0
  img = np.where(body, 150.0, 30.0)
  for cx in (0.32, 0.68):
    lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1.0
    img = np.where(lung, img - 70.0, img)
  phase = rng.uniform(0, 2 * np.pi)
  img += 18.0 * np.sin(yy * 60.0 + phase + 4.0 * np.abs(xx - 0.5)) * body
  img += rng.normal(0.0, 10.0, (size, size))
  return np.clip(img, 0, 255).astype(np.uint8)


class SyntheticPngSource:
  """A random-access source of PNG-encoded synthetic X-rays, decoded on read.

  `source[i]` decodes a 299x299 grayscale PNG to uint8 RGB [H, W, 3], as a
  TFDS data source of the Kaggle set does. `num_distinct` images are
  generated and reused cyclically so that construction stays fast.
  """

  def __init__(
      self,
      num_examples: int,
      *,
      size: int = 299,
      num_distinct: int = 64,
      num_classes: int = 4,
      seed: int = 0,
  ):
    rng = np.random.default_rng(seed)
    self._pngs = []
    for _ in range(min(num_distinct, num_examples)):
      buf = io.BytesIO()
      Image.fromarray(synthetic_xray(rng, size), 'L').save(buf, 'PNG')
      self._pngs.append(buf.getvalue())
    self._n = num_examples
    self.labels = rng.integers(0, num_classes, size=num_examples)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._n:
      raise IndexError(f'index {index} out of range [0, {self._n})')
    png = self._pngs[index % len(self._pngs)]
    with Image.open(io.BytesIO(png)) as img:
      image = np.asarray(img.convert('RGB'))
    return {
        'image': image,
        'label': int(self.labels[index]),
        'id': f'synthetic-{index}',
        'patient_id': '',
    }


def _child_pids() -> list[int]:
  pids = []
  task_dir = '/proc/self/task'
  if not os.path.isdir(task_dir):
    return pids
  for task in os.listdir(task_dir):
    try:
      with open(os.path.join(task_dir, task, 'children')) as f:
        pids.extend(int(p) for p in f.read().split())
    except OSError:
      continue
  return pids


def _proc_cpu_seconds(pid: int) -> float:
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return 0.0
  # After the command: state is field 3; utime, stime are fields 14, 15.
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def cpu_seconds() -> float:
  """User + system CPU time of this process and its live children."""
  times = os.times()
  own = times.user + times.system
  return own + sum(_proc_cpu_seconds(pid) for pid in _child_pids())


def measure(
    make_iter: Callable[[], Iterator[dict[str, np.ndarray]]],
    *,
    steps: int,
    warmup: int,
) -> dict[str, float]:
  """Times `steps` batches after `warmup` batches; returns the rates."""
  it = make_iter()
  for _ in range(warmup):
    next(it)
  cpu0, t0 = cpu_seconds(), time.perf_counter()
  images = 0
  for _ in range(steps):
    try:
      batch = next(it)
    except StopIteration:
      break
    images += len(batch['image'])
  wall = max(time.perf_counter() - t0, 1e-9)
  cpu = cpu_seconds() - cpu0
  return {
      'images': images,
      'wall_s': round(wall, 3),
      'cpu_s': round(cpu, 3),
      'cores_used': round(cpu / wall, 2),
      'images_per_s': round(images / wall, 1),
      'images_per_s_per_core': per_core_rate(images, cpu),
  }


# CPU time comes in clock ticks (10 ms on Linux): below this many seconds
# the per-core rate is off by more than a few percent, or infinite at 0.
MIN_CPU_SECONDS = 0.5


def per_core_rate(images: int, cpu: float) -> float | None:
  """Images per CPU second; None (with a warning) when too little CPU time
  was measured for a stable figure."""
  if cpu < MIN_CPU_SECONDS:
    print(
        f'warning: only {cpu:.2f} s of CPU time measured (< '
        f'{MIN_CPU_SECONDS} s): images_per_s_per_core is null; raise '
        '--steps for a stable figure',
        file=sys.stderr,
    )
    return None
  return round(images / cpu, 1)


def _decode_iter(source, batch: int) -> Iterator[dict[str, np.ndarray]]:
  i = 0
  while True:
    images = []
    for _ in range(batch):
      images.append(source[i % len(source)]['image'])
      i += 1
    yield {'image': np.stack(images)}


def _real_source(config) -> Any | None:
  """The configured train source if it is already prepared, else None.

  Never prepares (builds) a data set: a benchmark must not start a build.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  cfg = config.data
  try:
    folder = data.prepared_dir(
        cfg.name,
        data_dir=cfg.data_dir,
        manual_dir=cfg.manual_dir,
        classes=data.parse_classes(cfg.get('classes', '')),
        seed=int(cfg.get('split_seed', 0)),
    )
    if not os.path.isfile(os.path.join(folder, 'summary.json')):
      raise FileNotFoundError(f'{folder} is not prepared')
    return data.get_source(cfg, cfg.train_split)
  except Exception as e:  # pylint: disable=broad-except
    print(
        f'bench input: no prepared data ({type(e).__name__}: {e}); using '
        'the synthetic source',
        file=sys.stderr,
    )
    return None


def define_flags(
    flag_values: flags.FlagValues = flags.FLAGS,
    sys_argv: Sequence[str] | None = None,
) -> None:
  """The flags of `bench input`."""
  define_config_flag(flag_values, sys_argv)
  flags.DEFINE_integer(
      'batch_size',
      64,
      f'{cli.BATCH_SIZE_HELP} Global.',
      flag_values=flag_values,
  )
  flags.DEFINE_integer('steps', 20, 'Timed batches.', flag_values=flag_values)
  flags.DEFINE_integer(
      'warmup', 2, 'Untimed batches first.', flag_values=flag_values
  )
  flags.DEFINE_integer(
      'workers',
      0,
      'grain worker processes (train pipeline).',
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'threads',
      input_pipeline.DEFAULT_NUM_THREADS,
      'Decoding threads.',
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      'synthetic',
      False,
      'Use in-memory synthetic PNGs.',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'pipelines',
      ['decode', 'train', 'eval'],
      'Comma separated subset of decode,train,eval.',
      flag_values=flag_values,
  )


def args_from(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """Parsed flags -> args (`args.config` is the config with overrides)."""
  names = (
      'batch_size',
      'steps',
      'warmup',
      'workers',
      'threads',
      'synthetic',
      'pipelines',
  )
  args = types.SimpleNamespace(**{n: flag_values[n].value for n in names})
  for name in ('batch_size', 'steps'):
    if getattr(args, name) < 1:
      raise cli.UserError(f'--{name}={getattr(args, name)} must be >= 1')
  args.config = flag_values.config
  return args


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` (flags only) into args, for tests and programs."""
  return args_from(parse_flags(define_flags, argv, 'input'))


def main(argv: Sequence[str]) -> None:
  """Measures the decode, train and eval pipelines; prints JSON lines."""
  no_arguments(argv)
  args = args_from(flags.FLAGS)
  config = args.config
  source = None if args.synthetic else _real_source(config)
  kind = 'prepared' if source is not None else 'synthetic_png_299'
  if source is None:
    n = max(args.batch_size * (args.steps + args.warmup + 1), 256)
    source = SyntheticPngSource(n, num_classes=config.model.num_classes)
  size = config.data.image_size
  recipe = augment.AugmentConfig.from_config(config.data.augment)
  pipelines = {
      'decode': lambda: _decode_iter(source, args.batch_size),
      'train': lambda: input_pipeline.train_iterator(
          source,
          batch_size=args.batch_size,
          image_size=size,
          seed=config.seed,
          augment_config=recipe,
          num_workers=args.workers,
          num_threads=args.threads,
      ),
      'eval': lambda: input_pipeline.eval_batches(
          source,
          batch_size=args.batch_size,
          image_size=size,
          crop_ratio=config.data.eval_crop_ratio,
          num_threads=args.threads,
      ),
  }
  for name in filter(None, args.pipelines):
    if name not in pipelines:
      raise cli.UserError(
          f'--pipelines: unknown {name!r}; known: {list(pipelines)}'
      )
    result = measure(pipelines[name], steps=args.steps, warmup=args.warmup)
    emit(
        {
            'benchmark': 'input',
            'pipeline': name,
            'source': kind,
            'image_size': size,
            'batch': args.batch_size,
            'workers': args.workers if name == 'train' else 0,
            'threads': args.threads if name != 'decode' else 1,
            'host_cpus': os.cpu_count(),
            'recipe': recipe.__dict__ if name == 'train' else None,
            'tensorflow_imported': tensorflow_imported(),
            **result,
        }
    )
