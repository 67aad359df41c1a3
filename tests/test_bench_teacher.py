"""`python -m drpl_jax.bench teacher`: train step with and without a teacher."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drpl_jax.bench import __main__ as bench_main
from drpl_jax.bench import teacher as bench_teacher
from drpl_jax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/drpl_vit.py:variant=micro'


def test_registered_subcommand():
  assert 'teacher' in bench_main.SUBCOMMANDS


def test_flops_counts_a_matmul():
  a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  b = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert bench_teacher.flops(compiled) == pytest.approx(
      2 * 8 * 16 * 32, rel=0.05
  )


def test_overhead_against_flop_prediction():
  results = {
      'student': {'step_ms': 10.0, 'flops': 100.0},
      'teacher': {'step_ms': 36.0, 'flops': 400.0},
      'teacher_forward': {'step_ms': 20.0, 'flops': 200.0},
  }
  out = bench_teacher.overhead(results)
  assert out['predicted_ratio'] == pytest.approx(3.0)
  assert out['measured_ratio'] == pytest.approx(3.6)
  assert out['overhead'] == pytest.approx(0.2)
  assert out['compiled_flops_ratio'] == pytest.approx(4.0)
  assert out['standalone_ratio'] == pytest.approx(3.0)
  assert out['overhead_vs_standalone'] == pytest.approx(0.2)
  assert not out['meets_target']
  results['teacher']['step_ms'] = 31.0
  assert bench_teacher.overhead(results)['meets_target']


def test_interleaved_times_runs_each_in_every_repetition():
  calls = []
  runs = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
  times = bench_teacher.interleaved_times(runs, steps=2, repeats=3, warmup=1)
  assert calls == ['a', 'b'] + ['a', 'a', 'b', 'b'] * 3
  assert {k: len(v) for k, v in times.items()} == {'a': 3, 'b': 3}


def test_rejects_a_student_that_ignores_the_teacher():
  with pytest.raises(ValueError, match='distilled'):
    bench_teacher.parse_args(
        ['--config', 'configs/drpl_vit.py:variant=micro,preset=vit']
    )
  with pytest.raises(ValueError, match="distill.kind='none'"):
    bench_teacher.parse_args(['--config', CONFIG, '--config.distill.kind=none'])
  with pytest.raises(ValueError, match='--steps=0'):
    bench_teacher.parse_args(['--config', CONFIG, '--steps', '0'])


def test_teacher_forward_flops_match_the_architecture():
  """resnet18 at 32 px: the forward's FLOPs scale with the batch."""
  args = bench_teacher.parse_args(
      ['--config', CONFIG, '--arch', 'resnet18', '--image_size', '32']
  )
  config = args.config
  mesh = sharding.create_mesh((-1, 1))
  teacher = bench_teacher.online_teacher(config, args, mesh)
  forward = bench_teacher.teacher_forward(teacher)
  flops = {}
  for b in (1, 2):
    x = jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32)
    flops[b] = bench_teacher.flops(forward.lower(teacher.state, x).compile())
  # torchvision resnet18: 1.82 GFLOPs (multiply-adds x2) at 224 px; convs
  # scale with the pixel count, so about 1.82e9 * (32 / 224)**2 at 32 px.
  assert 0.5 * 3.7e7 < flops[1] < 2.0 * 3.7e7
  assert flops[2] == pytest.approx(2 * flops[1], rel=0.05)
  logits = forward(teacher.state, jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 4) and np.isfinite(logits).all()


@pytest.mark.slow
def test_tiny_run_prints_json():
  """micro student, 32 px, resnet18 teacher, batch 4, 2 steps (1-2 min)."""
  cmd = [
      sys.executable,
      '-m',
      'drpl_jax.bench',
      'teacher',
      f'--config={CONFIG}',
      '--arch',
      'resnet18',
      '--batch_size',
      '4',
      '--image_size',
      '32',
      '--steps',
      '2',
      '--repeats',
      '2',
      '--warmup',
      '1',
  ]
  proc = subprocess.run(
      cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r['measurement'] for r in records] == [
      'train_step',
      'train_step',
      'teacher_forward',
      'teacher_overhead',
  ]
  student, with_teacher, forward, summary = records
  assert forward['step_ms'] > 0 and forward['flops'] > 0
  assert student['teacher'] is None and with_teacher['teacher'] == 'resnet18'
  for r in (student, with_teacher):
    assert {
        'step_ms',
        'step_ms_all',
        'images_per_s',
        'flops',
        'compile_s',
    } <= set(r)
    assert r['step_ms'] > 0 and len(r['step_ms_all']) == 2
    assert r['batch'] == 4 and r['image_size'] == 32
  assert with_teacher['flops'] > student['flops']
  for key in (
      'student_step_ms',
      'teacher_step_ms',
      'measured_ratio',
      'predicted_ratio',
      'overhead',
      'target_overhead',
      'meets_target',
      'teacher_forward_flops',
      'student_step_flops',
      'compiled_flops_ratio',
      'teacher_forward_ms',
      'standalone_ratio',
      'overhead_vs_standalone',
  ):
    assert key in summary, key
  assert summary['predicted_ratio'] > 1.0
  # The compiled step with the teacher costs what the two parts predict.
  assert summary['compiled_flops_ratio'] == pytest.approx(
      summary['predicted_ratio'], rel=0.05
  )
  assert summary['overhead'] == pytest.approx(
      summary['measured_ratio'] / summary['predicted_ratio'] - 1, abs=1e-3
  )
  assert not any(r['tensorflow_imported'] for r in records)


def test_imports_no_tensorflow_tfds_clu_or_torch():
  code = (
      'import sys; import drpl_jax.bench.teacher, drpl_jax.pretrained.mapping, '
      'drpl_jax.pytorch.convert; print(sorted({m.split(".")[0] for m in '
      'sys.modules} & {"tensorflow", "tensorflow_datasets", "clu", '
      '"torch", "timm"}))'
  )
  proc = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  assert proc.stdout.strip().splitlines()[-1] == '[]'
