r"""Jitted evaluation throughput against training, same config and device.

  python -m drpl_jax.bench eval --config=configs/drpl_vit.py:variant=micro \
      [--batch_size 32] [--steps 10] [--repeats 5] [--warmup 2] \
      [--image_size S] [--measure eval,train] [--config.key=value ...]

Prints one JSON object per measurement:
  eval_step:  images/s of the jitted, sharded eval step evaluation uses
              (`state.Setup.eval_step`: normalisation + forward, logits of
              every head) on a synthetic uint8 batch already on the devices;
  train_step: images/s of the jitted train step (`state.build`, as
              training builds it, state donated) on the same kind of batch; a
              distilled config with `distill.kind` hard/soft gets synthetic
              offline teacher logits (an online teacher is not included);
  ratio:      eval images/s over train images/s (target >= 3).
Rates are the median over `--repeats` timed repetitions of `--steps` steps
each, after `--warmup` untimed steps, every repetition closed by
`block_until_ready`. Lowering and compile times are reported separately.
Imports neither TensorFlow, TFDS nor clu.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
import types
from typing import Any

import ml_collections
from absl import flags

from drpl_jax import cli
from drpl_jax.bench import check_batch_divisible, emit, no_arguments
from drpl_jax.bench import parse_flags, synthetic_batch
from drpl_jax.bench import synthetic_train_batch
from drpl_jax.bench import tensorflow_imported, time_steps
from drpl_jax.bench import timing_args, timing_flags, timing_record
from drpl_jax.train import state as state_lib

MEASUREMENTS = ('eval', 'train')
TARGET_RATIO = 3.0


define_flags = timing_flags(
    'eval',
    batch=32,
    steps=10,
    repeats=5,
    warmup=2,
    extra=(
        functools.partial(
            flags.DEFINE_list,
            'measure',
            list(MEASUREMENTS),
            'Comma separated subset of eval,train.',
        ),
    ),
)


def args_from(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """Parsed flags -> args; names an unknown --measure."""
  args = timing_args(flag_values, extra=('measure',))
  args.measure = tuple(filter(None, args.measure))
  unknown = [m for m in args.measure if m not in MEASUREMENTS]
  if unknown or not args.measure:
    raise cli.UserError(
        f'--measure: unknown {unknown}; choose from {list(MEASUREMENTS)}'
    )
  return args


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` (flags only) into args, for tests and programs."""
  return args_from(parse_flags(define_flags, argv, 'eval'))


def _compile(jitted, *args) -> tuple[Any, float, float]:
  """AOT-compiles `jitted`; returns (compiled, lower_s, compile_s)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


class _Bench:
  """The train state, steps and batches of one config on this host's mesh."""

  def __init__(self, config: ml_collections.ConfigDict, batch: int):
    self.config = config
    self.batch = batch
    self.mesh = state_lib.create_mesh(config)
    check_batch_divisible(batch, self.mesh)
    self.setup = state_lib.build(config, self.mesh)
    self.state = self.setup.state
    self.step_cfg = self.setup.step_cfg

  def eval(self, args) -> dict[str, Any]:
    step = self.setup.eval_step()
    batch = synthetic_batch(
        self.config, self.batch, self.mesh, train_batch=False
    )
    params, rest = self.state.params, self.state.rest
    compiled, lower_s, compile_s = _compile(step, params, rest, batch)
    times = time_steps(
        lambda: compiled(params, rest, batch),
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    return dict(
        lower_s=round(lower_s, 3),
        compile_s=round(compile_s, 3),
        **rates(times, self.batch * args.steps, args.steps),
    )

  def train(self, args) -> dict[str, Any]:
    step = self.setup.train_step()
    batch = synthetic_train_batch(
        self.config, self.batch, self.mesh, self.step_cfg
    )
    # The third argument is the online teacher's state (none here).
    compiled, lower_s, compile_s = _compile(step, self.state, batch, None)
    holder = {'state': self.state}

    def run():
      holder['state'], metrics = compiled(holder['state'], batch, None)
      return metrics['loss'], holder['state'].params

    times = time_steps(
        run, steps=args.steps, repeats=args.repeats, warmup=args.warmup
    )
    self.state = holder['state']  # the old buffers were donated
    return dict(
        lower_s=round(lower_s, 3),
        compile_s=round(compile_s, 3),
        distill_kind=self.step_cfg.distill_kind,
        **rates(times, self.batch * args.steps, args.steps),
    )


def rates(times: Sequence[float], images: int, steps: int) -> dict[str, Any]:
  """Median images/s (and per repetition) and median ms per step."""
  per_rep = [images / t for t in times]
  return {
      'images_per_s': round(statistics.median(per_rep), 2),
      'images_per_s_all': [round(r, 2) for r in per_rep],
      'step_ms': round(1000.0 * statistics.median(times) / steps, 2),
  }


def main(argv: Sequence[str]) -> None:
  """Measures eval and train throughput; prints one JSON line for each."""
  no_arguments(argv)
  args = args_from(flags.FLAGS)
  config = args.config
  bench = _Bench(config, args.batch_size)
  common = {
      **timing_record('eval', args),
      'distilled': bool(config.model.distilled),
  }
  results = {}
  for name in args.measure:
    results[name] = getattr(bench, name)(args)
    emit(
        {
            **common,
            'measurement': f'{name}_step',
            **results[name],
            'tensorflow_imported': tensorflow_imported(),
        }
    )
  if len(results) == 2:
    ratio = results['eval']['images_per_s'] / results['train']['images_per_s']
    emit(
        {
            **common,
            'measurement': 'ratio',
            'eval_images_per_s': results['eval']['images_per_s'],
            'train_images_per_s': results['train']['images_per_s'],
            'eval_over_train': round(ratio, 3),
            'target': TARGET_RATIO,
            'meets_target': ratio >= TARGET_RATIO,
            'tensorflow_imported': tensorflow_imported(),
        }
    )
