"""Benchmarks: `python -m drpl_jax.bench {input,...} ...`.

Each subcommand lives in `drpl_jax/bench/<name>.py` and exposes
`main(argv) -> None`; it prints one JSON object per measurement on stdout.
This package imports neither TensorFlow nor TFDS.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from drpl_jax.parallel import hostmem


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


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `--config.a.b=value` arguments, parsed like the old value."""
  for arg in overrides:
    _APPLIED_OVERRIDES[arg.partition('=')[0][len('--config.'):]] = (
        arg.partition('=')[2])
    if not arg.startswith('--config.') or '=' not in arg:
      raise ValueError(f'unrecognised argument {arg!r}; overrides look like '
                       '--config.data.manual_dir=/path')
    key, _, text = arg[len('--config.'):].partition('=')
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
  record = {**record, 'host_malloc_tuned': hostmem.applied(),
            'config_overrides': dict(_APPLIED_OVERRIDES)}
  print(json.dumps(record, sort_keys=True), flush=True)


def tensorflow_imported() -> bool:
  """Whether anything in this process has imported TensorFlow."""
  return 'tensorflow' in sys.modules


def time_steps(run: Callable[[], Any], *, steps: int, repeats: int,
               warmup: int) -> list[float]:
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


def config_from_args(args: Any) -> ml_collections.ConfigDict:
  """`args.config` with its `--config.*` overrides and `--image_size`."""
  config = apply_overrides(load_config(args.config), args.overrides)
  if args.image_size is not None:
    config.data.image_size = args.image_size
    config.model.image_size = args.image_size
  return config


def timing_parser(name: str, *, batch: int, steps: int, repeats: int,
                  warmup: int) -> argparse.ArgumentParser:
  """A parser with the options of every timed-step benchmark and defaults."""
  parser = argparse.ArgumentParser(prog=f'python -m drpl_jax.bench {name}')
  parser.add_argument('--config', required=True,
                      help='config file and argument, e.g. '
                           'configs/drpl_vit.py:variant=micro')
  parser.add_argument('--batch_size', type=int, default=batch,
                      help='global batch')
  parser.add_argument('--steps', type=int, default=steps,
                      help='steps per timed repetition')
  parser.add_argument('--repeats', type=int, default=repeats,
                      help='timed repetitions (the median is reported)')
  parser.add_argument('--warmup', type=int, default=warmup,
                      help='untimed steps after compilation')
  parser.add_argument('--image_size', type=int, default=None,
                      help="input resolution (default: the config's)")
  return parser


def parse_timing_args(parser: argparse.ArgumentParser, argv: Sequence[str],
                      positive: Sequence[str] = ()) -> argparse.Namespace:
  """Parses `argv`; unknown arguments become `args.overrides` (--config.*).

  --batch_size, --steps, --repeats and the `positive` options must be >= 1,
  --warmup >= 0; a bad value is an error naming the option.
  """
  args, overrides = parser.parse_known_args(list(argv))
  args.overrides = overrides
  for name in ('batch_size', 'steps', 'repeats', *positive):
    if getattr(args, name) < 1:
      raise ValueError(f'--{name}={getattr(args, name)} must be >= 1')
  if args.warmup < 0:
    raise ValueError(f'--warmup={args.warmup} must be >= 0')
  return args
