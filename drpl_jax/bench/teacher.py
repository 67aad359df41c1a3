r"""What an online teacher costs the train step, against what its FLOPs cost.

  python -m drpl_jax.bench teacher --config=configs/drpl_vit.py:variant=micro \
      [--arch resnet50] [--batch_size 8] [--image_size S] [--steps 5] \
      [--repeats 3] [--warmup 1] [--teacher_dtype float32] \
      [--config.key=value ...]

Prints one JSON object per measurement:
  train_step (teacher null): the jitted train step as training builds it
      (`state.build`, `Setup.train_step`, state donated)
      with offline (synthetic) teacher logits in the batch, so the losses
      are the same as with a teacher;
  train_step (teacher ARCH): the same step and batch with an online teacher
      (`state.OnlineTeacher` from `teacher_load.torch_teacher(arch, None, ...)`:
      torchvision-initialised random weights, no checkpoint) running inside
      it on the mixed images;
  teacher_forward: the jitted teacher alone on the same batch;
  teacher_overhead: measured_ratio = teacher step time / student step time
      next to predicted_ratio = (student step FLOPs + teacher forward FLOPs)
      / student step FLOPs (XLA `cost_analysis` of the compiled programs),
      and overhead = measured_ratio / predicted_ratio - 1: the cost beyond
      the teacher's arithmetic (target < 10%). FLOPs are not time when the
      two networks run at different FLOP/s (small ViT matmuls against big
      convolutions), so overhead_vs_standalone also compares the step with
      the student step plus the teacher forward timed on their own.
Times are medians of `--repeats` repetitions of `--steps` calls after
`--warmup` untimed ones, each closed by `block_until_ready`, the three
programs interleaved within every repetition; synthetic batches already on
the devices. Imports neither TensorFlow, TFDS nor clu.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from drpl_jax import cli
from drpl_jax import teacher as teacher_lib
from drpl_jax.bench import check_batch_divisible, emit, no_arguments
from drpl_jax.bench import parse_flags, synthetic_train_batch
from drpl_jax.bench import tensorflow_imported
from drpl_jax.bench import timing_args, timing_flags, timing_record
from drpl_jax.parallel import sharding
from drpl_jax.teacher import load as teacher_load
from drpl_jax.teacher.common import DTYPES as TEACHER_DTYPES
from drpl_jax.train import state as state_lib

TARGET_OVERHEAD = 0.10


define_flags = timing_flags(
    'teacher',
    batch=8,
    steps=5,
    repeats=3,
    warmup=1,
    extra=(
        functools.partial(
            flags.DEFINE_enum,
            'arch',
            'resnet50',
            sorted(teacher_lib.TEACHER_ARCHS),
            'Torchvision teacher (random weights).',
        ),
        functools.partial(
            flags.DEFINE_enum,
            'teacher_dtype',
            'float32',
            list(TEACHER_DTYPES),
            'Teacher compute dtype.',
        ),
    ),
)


def args_from(flag_values: flags.FlagValues) -> types.SimpleNamespace:
  """Parsed flags -> args; the student must use the teacher.

  Raises UserError for a student that is not distilled or has
  distill.kind none (XLA would drop the unused teacher).
  """
  args = timing_args(flag_values, extra=('arch', 'teacher_dtype'))
  config = args.config
  if not config.model.distilled or config.distill.kind == 'none':
    raise cli.UserError(
        f'{args.config_spec}: bench teacher needs a distilled student with '
        f'distill.kind hard or soft (got distilled={config.model.distilled}'
        f', distill.kind={config.distill.kind!r}); otherwise XLA drops the '
        'unused teacher'
    )
  return args


def parse_args(argv: Sequence[str]) -> types.SimpleNamespace:
  """Parses `argv` (flags only) into args, for tests and programs."""
  return args_from(parse_flags(define_flags, argv, 'teacher'))


def flops(compiled: Any) -> float:
  """FLOPs of a compiled executable by XLA's cost analysis (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  if not cost or 'flops' not in cost:
    raise RuntimeError(f'XLA cost analysis reports no flops: {cost!r}')
  return float(cost['flops'])


def online_teacher(
    config: ml_collections.ConfigDict, args, mesh
) -> state_lib.OnlineTeacher:
  """A random-weight converted teacher placed on the mesh, as training."""
  size = int(config.data.image_size)
  module = teacher_load.torch_teacher(
      args.arch,
      None,
      int(config.model.num_classes),
      image_size=size,
      dtype=args.teacher_dtype,
  )
  graphdef, state = nnx.split(module)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state
  )
  shardings = sharding.state_shardings(abstract, mesh)
  return state_lib.OnlineTeacher(
      graphdef,
      jax.device_put(state, shardings),
      shardings,
      f'{args.arch} (random weights)',
  )


def teacher_forward(teacher: state_lib.OnlineTeacher) -> Callable[..., Any]:
  """The jitted teacher alone: (state, [B, H, W, 3] images) -> logits."""
  return jax.jit(lambda state, x: nnx.merge(teacher.graphdef, state)(x))


def _compile(jitted, *args) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def interleaved_times(
    runs: dict[str, Callable[[], Any]], *, steps: int, repeats: int, warmup: int
) -> dict[str, list[float]]:
  """Seconds per repetition of `steps` calls of each run, interleaved.

  Every repetition times each run in turn (closed by block_until_ready),
  so a change in machine load affects all runs alike rather than the one
  that happened to run last.
  """
  for run in runs.values():
    out = None
    for _ in range(warmup):
      out = run()
    jax.block_until_ready(out)
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        out = run()
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - t0)
  return times


def _step_runner(compiled, state, batch, teacher_state) -> Callable[[], Any]:
  """Calls a compiled (donating) train step, carrying its state along."""
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, teacher_state)
    return metrics['loss']

  return run


def _record(
    times: list[float], compile_s: float, step_flops: float, args
) -> dict[str, Any]:
  step_s = statistics.median(times) / args.steps
  return {
      'compile_s': round(compile_s, 3),
      'step_ms': round(1000.0 * step_s, 3),
      'step_ms_all': [round(1000.0 * t / args.steps, 3) for t in times],
      'images_per_s': round(args.batch_size / step_s, 2),
      'flops': step_flops,
  }


def measure(
    config: ml_collections.ConfigDict, args, mesh
) -> dict[str, dict[str, Any]]:
  """Student step, step with the teacher and teacher forward: times, FLOPs."""
  setup = state_lib.build(config, mesh)
  state, state_sh, step_cfg = setup.state, setup.shardings, setup.step_cfg
  teacher = online_teacher(config, args, mesh)
  batch = synthetic_train_batch(config, args.batch_size, mesh, step_cfg)
  # The steps donate their state: the teacher run gets its own copy.
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_sh)
  states = {'student': state, 'teacher': copy(state)}
  runs, compiled = {}, {}
  for name, online in (('student', None), ('teacher', teacher)):
    step = setup.train_step(online)
    t_state = online.state if online else None
    compiled[name] = _compile(step, states[name], batch, t_state)
    runs[name] = _step_runner(compiled[name][0], states[name], batch, t_state)
  size = int(config.data.image_size)
  images = jax.device_put(
      np.random.default_rng(0).random(
          (args.batch_size, size, size, 3), np.float32
      ),
      sharding.batch_sharding(mesh),
  )
  compiled['teacher_forward'] = _compile(
      teacher_forward(teacher), teacher.state, images
  )
  runs['teacher_forward'] = functools.partial(
      compiled['teacher_forward'][0], teacher.state, images
  )
  times = interleaved_times(
      runs, steps=args.steps, repeats=args.repeats, warmup=args.warmup
  )
  return {
      name: _record(
          times[name], compiled[name][1], flops(compiled[name][0]), args
      )
      for name in runs
  }


def main(argv: Sequence[str]) -> None:
  """Times the train step without and with the online teacher."""
  no_arguments(argv)
  args = args_from(flags.FLAGS)
  config = args.config
  mesh = state_lib.create_mesh(config)
  check_batch_divisible(args.batch_size, mesh)
  results = measure(config, args, mesh)
  common = {
      **timing_record('teacher', args),
      'distill_kind': config.distill.kind,
      'teacher_dtype': args.teacher_dtype,
  }
  for name, teacher in (('student', None), ('teacher', args.arch)):
    emit(
        {
            **common,
            'measurement': 'train_step',
            'teacher': teacher,
            **results[name],
            'tensorflow_imported': tensorflow_imported(),
        }
    )
  emit(
      {
          **common,
          'measurement': 'teacher_forward',
          'teacher': args.arch,
          **results['teacher_forward'],
          'tensorflow_imported': tensorflow_imported(),
      }
  )
  emit(
      {
          **common,
          'measurement': 'teacher_overhead',
          'teacher': args.arch,
          **overhead(results),
          'tensorflow_imported': tensorflow_imported(),
      }
  )


def overhead(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Measured vs FLOP-predicted slowdown of the step with the teacher.

  predicted_ratio = (student step FLOPs + teacher forward FLOPs) / student
  step FLOPs; overhead = measured_ratio / predicted_ratio - 1. Also
  standalone_ratio = (student step + teacher forward, timed apart) /
  student step: what running the teacher inside the step costs beyond
  running it on its own.
  """
  student, with_teacher = results['student'], results['teacher']
  forward = results['teacher_forward']
  measured = with_teacher['step_ms'] / student['step_ms']
  predicted = (student['flops'] + forward['flops']) / student['flops']
  standalone = (student['step_ms'] + forward['step_ms']) / student['step_ms']
  extra = measured / predicted - 1.0
  return {
      'student_step_ms': student['step_ms'],
      'teacher_step_ms': with_teacher['step_ms'],
      'teacher_forward_ms': forward['step_ms'],
      'student_step_flops': student['flops'],
      'teacher_step_flops': with_teacher['flops'],
      'teacher_forward_flops': forward['flops'],
      'measured_ratio': round(measured, 4),
      'predicted_ratio': round(predicted, 4),
      'compiled_flops_ratio': round(
          with_teacher['flops'] / student['flops'], 4
      ),
      'standalone_ratio': round(standalone, 4),
      'overhead_vs_standalone': round(measured / standalone - 1.0, 4),
      'overhead': round(extra, 4),
      'target_overhead': TARGET_OVERHEAD,
      'meets_target': extra < TARGET_OVERHEAD,
  }
