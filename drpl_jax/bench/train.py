r"""Training-step throughput, compile time, memory, FLOPs and MFU.

  python -m drpl_jax.bench train --config=configs/drpl_vit.py:variant=micro \
      [--batch_size 32] [--steps 5] [--repeats 3] [--warmup 2] \
      [--image_size S] [--config.key=value ...]

Prints one JSON object per measurement (one per run of this command):
  images_per_s       global batch / median step time.
  step_ms            median over `--repeats` timed repetitions of `--steps`
                     steps each (after `--warmup` untimed steps), every
                     repetition closed by `block_until_ready`.
  compile_s          lowering + XLA compilation of the jitted, sharded step
                     (`state.build(config).train_step()`, state donated).
  peak_memory_bytes  `device.memory_stats()['peak_bytes_in_use']` where the
                     backend has it (GPU, TPU), else the host's peak RSS
                     (`memory_source` says which).
  flops_per_step     XLA's `cost_analysis()` of the compiled step: the SPMD
                     program of one device (forward, backward, optimizer).
  mfu                flops_per_step / step time / peak FLOP/s of one device.
                     The peak is measured on CPU (a large fp32 matmul in this
                     run, `peak_source` 'measured_fp32_matmul'); on GPU/TPU
                     it is the datasheet bf16 dense peak (H100/H200 989
                     TFLOP/s, A100 312, TPU v4 275, v5e 197, v5p 459).
The batch is synthetic and already on the devices, so the input pipeline is
not measured (see `bench input`). A distilled config with `distill.kind`
hard/soft gets synthetic offline teacher logits. Imports neither
TensorFlow, TFDS nor clu.
"""

from __future__ import annotations

import functools
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from drpl_jax.bench import check_batch_divisible, emit, no_arguments
from drpl_jax.bench import parse_flags, synthetic_train_batch
from drpl_jax.bench import tensorflow_imported, time_steps
from drpl_jax.bench import timing_args, timing_flags, timing_record
from drpl_jax.train import state as state_lib

# Dense bf16 peak FLOP/s per device (datasheets), matched against
# `device.device_kind` (lower case); the first match wins.
DATASHEET_PEAK_FLOPS = (
    ('h200', 989e12),
    ('h100', 989e12),
    ('a100', 312e12),
    ('v5p', 459e12),
    ('v5 lite', 197e12),
    ('v5e', 197e12),
    ('v4', 275e12),
)


# 5 warm-up steps: with asynchronous dispatch the tuned host allocator's
# heap (drpl_jax.parallel.hostmem) settles within about 5 steps.
define_flags = timing_flags(
    'train',
    batch=32,
    steps=5,
    repeats=3,
    warmup=5,
    extra=(
        functools.partial(
            flags.DEFINE_integer,
            'matmul_size',
            2048,
            'Side of the fp32 matmul measuring the CPU peak.',
        ),
    ),
)


def args_from(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """Parsed flags -> args; `args.config` has --batch_size applied."""
  args = timing_args(
      flag_values, extra=('matmul_size',), positive=('matmul_size',)
  )
  args.config.batch_size = args.batch_size
  return args


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` (flags only) into args, for tests and programs."""
  return args_from(parse_flags(define_flags, argv, 'train'))


def time_repeats(
    run: Callable[[], Any], *, steps: int, repeats: int, warmup: int
) -> list[float]:
  """Seconds per step of each repetition (`steps` calls, then a block)."""
  return [
      t / steps
      for t in time_steps(run, steps=steps, repeats=repeats, warmup=warmup)
  ]


def compiled_flops(compiled) -> float | None:
  """FLOPs of a compiled executable from XLA's cost analysis (or None)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def measured_matmul_flops(size: int, repeats: int = 5) -> float:
  """FLOP/s of a jitted fp32 [size, size] @ [size, size] (median)."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (size, size), jnp.float32)
  b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t0)
  return 2.0 * size**3 / statistics.median(times)


def peak_flops(
    device: jax.Device, matmul_size: int
) -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  if device.platform == 'cpu':
    return measured_matmul_flops(matmul_size), 'measured_fp32_matmul'
  kind = device.device_kind.lower()
  for name, flops in DATASHEET_PEAK_FLOPS:
    if name in kind:
      return flops, f'datasheet_bf16:{name}'
  return None, f'unknown device {device.device_kind!r}'


def peak_memory(device: jax.Device) -> tuple[int, str]:
  """(peak bytes, 'device' or 'host_rss')."""
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss_kb) * 1024, 'host_rss'


def measure(
    config: ml_collections.ConfigDict, args: types.SimpleNamespace
) -> dict[str, Any]:
  """Compiles and times the train step of `config`; returns the figures."""
  mesh = state_lib.create_mesh(config)
  check_batch_divisible(args.batch_size, mesh)
  setup = state_lib.build(config, mesh)
  state, step_cfg = setup.state, setup.step_cfg
  step = setup.train_step()
  batch = synthetic_train_batch(config, args.batch_size, mesh, step_cfg)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, None).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, None)
    return metrics['loss']

  per_step = time_repeats(
      run, steps=args.steps, repeats=args.repeats, warmup=args.warmup
  )
  step_s = statistics.median(per_step)
  n_params = sum(x.size for x in jax.tree.leaves(holder['state'].params))
  return {
      'num_params': int(n_params),
      'compile_s': round(compile_s, 3),
      'step_ms': round(1000 * step_s, 3),
      'step_ms_all': [round(1000 * t, 3) for t in per_step],
      'images_per_s': round(args.batch_size / step_s, 3),
      'flops_per_step': compiled_flops(compiled),
      'distill_kind': step_cfg.distill_kind,
      'grad_accum_steps': step_cfg.grad_accum_steps,
  }


def main(argv: Sequence[str]) -> None:
  """Measures one config's train step; prints one JSON line."""
  no_arguments(argv)
  args = args_from(flags.FLAGS)
  config = args.config
  result = measure(config, args)
  device = jax.devices()[0]
  memory, memory_source = peak_memory(device)
  peak, peak_source = peak_flops(device, args.matmul_size)
  flops = result['flops_per_step']
  step_s = result['step_ms'] / 1000
  mfu = (flops / step_s / peak) if (flops and peak) else None
  emit(
      {
          **timing_record('train', args),
          **result,
          'peak_memory_bytes': memory,
          'memory_source': memory_source,
          'peak_flops_per_s': peak,
          'peak_source': peak_source,
          'achieved_flops_per_s': (flops / step_s) if flops else None,
          'mfu': round(mfu, 5) if mfu is not None else None,
          'tensorflow_imported': tensorflow_imported(),
      }
  )


if __name__ == '__main__':
  from drpl_jax.bench import __main__ as bench_main  # pylint: disable=g-import-not-at-top

  sys.exit(bench_main.main(['train', *sys.argv[1:]]))
