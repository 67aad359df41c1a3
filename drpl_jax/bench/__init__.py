"""Benchmarks: `python -m drpl_jax.bench {input,...} ...`.

Each subcommand lives in `drpl_jax/bench/<name>.py` and exposes
`define_flags(flag_values)` and an absl `main(argv)`; `__main__` runs it
under the exit policy of drpl_jax/cli.py. It prints one JSON object per
measurement on stdout. `--config` is an ml_collections config file with
`--config.KEY=VALUE` overrides, as in every other command. This package
imports neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
import types
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from drpl_jax import cli
from drpl_jax.parallel import hostmem
from drpl_jax.parallel.sharding import batch_sharding


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module = runpy.run_path(path)
  if 'get_config' not in module:
    raise ValueError(f'config file {path!r} defines no get_config()')
  return module['get_config'](arg) if arg else module['get_config']()


def _parse_like(old: Any, text: str, key: str) -> Any:
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'--config.{key}={text!r}: expected true or false')
    return text.lower() in ('true', '1')
  if isinstance(old, (tuple, list)):
    return tuple(type(v)(t) for v, t in zip(old, text.split(',')))
  return type(old)(text) if old is not None else text


# The --config.* overrides this process applied: emit() records them, so
# that records of runs that differ only by an override stay distinguishable.
_APPLIED_OVERRIDES: dict[str, str] = {}


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` arguments, parsed like the old value.

  Only for `bench compare` (drpl_jax/pytorch/compare.py), which still
  parses its own arguments; the JAX benchmarks here use config_flags.
  """
  for arg in overrides:
    _APPLIED_OVERRIDES[arg.partition('=')[0][len('--config.') :]] = (
        arg.partition('=')[2]
    )
    if not arg.startswith('--config.') or '=' not in arg:
      raise ValueError(
          f'unrecognised argument {arg!r}; overrides look like '
          '--config.data.manual_dir=/path'
      )
    key, _, text = arg[len('--config.') :].partition('=')
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise KeyError(f'--config.{key}: no such config key')
    node[leaf] = _parse_like(node[leaf], text, key)
  return config


def emit(record: dict[str, Any]) -> None:
  """Prints one measurement as a single JSON line on stdout.

  Adds whether this process runs with the tuned host allocator
  (drpl_jax.parallel.hostmem), which changed XLA:CPU train steps by 14-17%, and
  the `--config.*` overrides applied (e.g. model.materialize=off).
  """
  record = {
      **record,
      'host_malloc_tuned': hostmem.applied(),
      'config_overrides': dict(_APPLIED_OVERRIDES),
  }
  print(json.dumps(record, sort_keys=True), flush=True)


def synthetic_batch(
    config: ml_collections.ConfigDict,
    batch: int,
    mesh,
    *,
    train_batch: bool,
    distill_kind: str = 'none',
    seed: int = 0,
) -> dict[str, jax.Array]:
  """The benchmarks' one synthetic batch: random uint8 images [B, S, S, 3]
  and, for a train step, labels and (distill_kind hard/soft) offline
  teacher logits, placed on the mesh."""
  rng = np.random.default_rng(seed)
  size = int(config.data.image_size)
  host = {'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8)}
  if train_batch:
    classes = int(config.model.num_classes)
    host['label'] = rng.integers(0, classes, (batch,)).astype(np.int32)
    if distill_kind != 'none':
      host['teacher_logits'] = rng.normal(size=(batch, classes)).astype(
          np.float32
      )
  return jax.device_put(host, batch_sharding(mesh))


def synthetic_train_batch(
    config: ml_collections.ConfigDict, batch: int, mesh, step_cfg: Any
) -> dict[str, jax.Array]:
  """`synthetic_batch` for a train step: offline teacher logits exactly when
  the step's `step_cfg.distill_kind` (train.step.StepConfig) reads them."""
  return synthetic_batch(
      config,
      batch,
      mesh,
      train_batch=True,
      distill_kind=step_cfg.distill_kind,
  )


def tensorflow_imported() -> bool:
  """Whether anything in this process has imported TensorFlow."""
  return 'tensorflow' in sys.modules


def time_steps(
    run: Callable[[], Any], *, steps: int, repeats: int, warmup: int
) -> list[float]:
  """Seconds per repetition of `steps` calls of `run` (after `warmup`).

  `run` returns something to block on; each repetition blocks only at its
  end, so asynchronous dispatch overlaps steps as it does in training.
  """
  out = None
  for _ in range(warmup):
    out = run()
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t0)
  return times


def define_config_flag(
    flag_values: flags.FlagValues, sys_argv: Sequence[str] | None = None
) -> None:
  """Defines the required `--config` (config_flags) on `flag_values`.

  `sys_argv`: the command line whose `--config.KEY=VALUE` overrides
  config_flags should accept (default sys.argv).
  """
  config_flags.DEFINE_config_file(
      'config',
      None,
      'Config file and argument, e.g. '
      'configs/drpl_vit.py:variant=micro; --config.KEY=VALUE overrides.',
      flag_values=flag_values,
      sys_argv=None if sys_argv is None else list(sys_argv),
  )
  flags.mark_flag_as_required('config', flag_values=flag_values)


def define_timing_flags(
    flag_values: flags.FlagValues,
    *,
    batch: int,
    steps: int,
    repeats: int,
    warmup: int,
    sys_argv: Sequence[str] | None = None,
) -> None:
  """Defines the flags of every timed-step benchmark on `flag_values`.

  `--config` is an ml_collections config file (`path.py[:arg]`) with its
  `--config.KEY=VALUE` overrides, as in every other command; `--batch_size`
  keeps the name and help text of drpl_jax/cli.py. `--image_size` sets
  the resolution of the data and the model together.
  """
  define_config_flag(flag_values, sys_argv)
  flags.DEFINE_integer(
      'batch_size',
      batch,
      f'{cli.BATCH_SIZE_HELP} Global.',
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'steps', steps, 'Steps per timed repetition.', flag_values=flag_values
  )
  flags.DEFINE_integer(
      'repeats',
      repeats,
      'Timed repetitions (the median is reported).',
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'warmup',
      warmup,
      'Untimed steps after compilation.',
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      'image_size',
      None,
      "Input resolution (default: the config's).",
      flag_values=flag_values,
  )


def timing_flags(
    name: str,
    *,
    batch: int,
    steps: int,
    repeats: int,
    warmup: int,
    extra: Sequence[Callable[..., Any]] = (),
) -> Callable[..., None]:
  """The `define_flags` of the timed-step benchmark `bench NAME`.

  It defines the timing flags (`define_timing_flags`) with these defaults,
  then calls each of `extra`, a `functools.partial` of a `flags.DEFINE_*`
  that lacks only `flag_values`, for the benchmark's own flags.
  """

  def define_flags(
      flag_values: flags.FlagValues = flags.FLAGS,
      sys_argv: Sequence[str] | None = None,
  ) -> None:
    define_timing_flags(
        flag_values,
        batch=batch,
        steps=steps,
        repeats=repeats,
        warmup=warmup,
        sys_argv=sys_argv,
    )
    for define in extra:
      define(flag_values=flag_values)

  define_flags.__doc__ = f'The flags of `bench {name}`.'
  return define_flags


TIMING_FLAGS = ('batch_size', 'steps', 'repeats', 'warmup', 'image_size')


def timing_args(
    flag_values: flags.FlagValues,
    extra: Sequence[str] = (),
    positive: Sequence[str] = (),
) -> types.SimpleNamespace:
  """The parsed flags as attributes; `config` with --image_size applied.

  `config_spec` is the --config argument as given, `overrides` the
  `--config.KEY=VALUE` values (recorded by `emit`). --batch_size, --steps,
  --repeats and the `positive` flags must be >= 1, --warmup >= 0; a bad
  value is a UserError naming the flag.
  """
  args = types.SimpleNamespace(
      **{name: flag_values[name].value for name in (*TIMING_FLAGS, *extra)}
  )
  for name in ('batch_size', 'steps', 'repeats', *positive):
    if getattr(args, name) < 1:
      raise cli.UserError(f'--{name}={getattr(args, name)} must be >= 1')
  if args.warmup < 0:
    raise cli.UserError(f'--warmup={args.warmup} must be >= 0')
  config = flag_values.config
  if args.image_size is not None:
    config.data.image_size = args.image_size
    config.model.image_size = args.image_size
  args.config = config
  args.config_spec = config_flags.get_config_filename(flag_values['config'])
  args.overrides = {
      k: str(v)
      for k, v in config_flags.get_override_values(
          flag_values['config']
      ).items()
  }
  _APPLIED_OVERRIDES.clear()
  _APPLIED_OVERRIDES.update(args.overrides)
  return args


def device_info() -> dict[str, Any]:
  """The accelerator this process measures on."""
  device = jax.devices()[0]
  return {
      'device': device.device_kind,
      'platform': device.platform,
      'num_devices': jax.device_count(),
  }


def timing_record(
    benchmark: str, args: types.SimpleNamespace
) -> dict[str, Any]:
  """The fields every record of a timed-step benchmark starts with: the
  config (`timing_args`), the timing flags and the devices."""
  config = args.config
  return {
      'benchmark': benchmark,
      'config': args.config_spec,
      'variant': config.model.get('variant', ''),
      'image_size': int(config.data.image_size),
      'batch': args.batch_size,
      'steps': args.steps,
      'repeats': args.repeats,
      'warmup': args.warmup,
      'dtype': str(config.model.get('dtype', 'float32')),
      **device_info(),
  }


def check_batch_divisible(batch: int, mesh: Any) -> None:
  """Raises ValueError unless --batch_size splits evenly over the mesh."""
  if batch % mesh.size:
    raise ValueError(
        f'--batch_size={batch} is not divisible by the '
        f'{mesh.size} devices of the mesh'
    )


def parse_flags(
    define: Callable[..., None], argv: Sequence[str], name: str
) -> flags.FlagValues:
  """Defines a benchmark's flags on a fresh FlagValues and parses `argv`
  (for tests and programs; the command line uses absl's global flags)."""
  full = [f'drpl-bench {name}', *argv]
  flag_values = flags.FlagValues()
  define(flag_values, sys_argv=full)
  flag_values(full)
  return flag_values


def no_arguments(argv: Sequence[str]) -> None:
  """A benchmark takes flags only: a positional argument is an error."""
  if len(argv) > 1:
    raise cli.UserError(
        f'unexpected arguments {list(argv[1:])}: flags '
        'look like --steps=5 or --config.seed=1'
    )
