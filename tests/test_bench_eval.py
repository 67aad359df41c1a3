"""`python -m drpl_jax.bench eval`: eval vs train throughput, no TF."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from drpl_jax.bench import __main__ as bench_main
from drpl_jax.bench import eval as eval_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A micro model on a 4x4 token grid: compiles in seconds.
TINY = [
    '--config=configs/drpl_vit.py:variant=micro',
    '--image_size',
    '32',
    '--config.model.patch_size=8',
    '--batch_size',
    '2',
    '--steps',
    '2',
    '--repeats',
    '3',
    '--warmup',
    '1',
]


def _run_bench(args, timeout=600):
  out = subprocess.run(
      [sys.executable, '-m', 'drpl_jax.bench', 'eval', *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return [
      json.loads(line)
      for line in out.stdout.splitlines()
      if line.startswith('{')
  ]


def test_registered_as_a_subcommand():
  assert 'eval' in bench_main.SUBCOMMANDS


def test_parse_args_validates():
  args = eval_bench.parse_args(TINY + ['--config.seed=3'])
  assert args.overrides == {'model.patch_size': '8', 'seed': '3'}
  assert args.config.seed == 3 and args.config.model.patch_size == 8
  assert args.config_spec == 'configs/drpl_vit.py:variant=micro'
  assert args.measure == ('eval', 'train')
  with pytest.raises(ValueError, match='--batch_size=0'):
    eval_bench.parse_args(TINY + ['--batch_size', '0'])
  with pytest.raises(ValueError, match='predict'):
    eval_bench.parse_args(TINY + ['--measure', 'eval,predict'])
  with pytest.raises(ValueError, match='--warmup'):
    eval_bench.parse_args(TINY + ['--warmup', '-1'])


def test_image_size_sets_the_resolution_everywhere():
  args = eval_bench.parse_args(TINY + ['--config.model.num_classes=3'])
  config = args.config
  assert config.data.image_size == 32 and config.model.image_size == 32
  assert config.model.patch_size == 8 and config.model.num_classes == 3
  with pytest.raises((KeyError, AttributeError), match='no_such_key'):
    eval_bench.parse_args(TINY + ['--config.model.no_such_key=1'])


def test_bad_flags_exit_2_with_one_line(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          '-m',
          'drpl_jax.bench',
          'eval',
          *TINY,
          '--config.model.no_such_key=1',
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'error: --config.model.no_such_key: the config has no key '
      "'no_such_key' (see the config file for the keys it has)"
  ]


def test_time_steps_counts_and_blocks():
  calls = []

  def run():
    calls.append(1)
    return jax.numpy.ones(3) * len(calls)

  times = eval_bench.time_steps(run, steps=4, repeats=3, warmup=2)
  assert len(times) == 3 and all(t > 0 for t in times)
  assert len(calls) == 2 + 4 * 3


def test_rates_are_medians():
  out = eval_bench.rates([1.0, 4.0, 2.0], images=8, steps=2)
  assert out['images_per_s_all'] == [8.0, 2.0, 4.0]
  assert out['images_per_s'] == 4.0  # median rate
  assert out['step_ms'] == 1000.0  # median 2 s over 2 steps


def test_synthetic_batches():
  config = eval_bench.parse_args(TINY).config
  mesh = jax.sharding.Mesh(
      np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')
  )
  batch = eval_bench.synthetic_batch(
      config, 2, mesh, train_batch=True, distill_kind='hard'
  )
  assert batch['image'].shape == (2, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (2,) and int(batch['label'].max()) < 4
  assert batch['teacher_logits'].shape == (2, 4)
  plain = eval_bench.synthetic_batch(config, 2, mesh, train_batch=False)
  assert set(plain) == {'image'}


def test_eval_step_benchmark_imports_no_tensorflow():
  (record,) = _run_bench(TINY + ['--measure', 'eval'])
  assert record['benchmark'] == 'eval'
  assert record['measurement'] == 'eval_step'
  assert record['tensorflow_imported'] is False
  assert record['images_per_s'] > 0 and len(record['images_per_s_all']) == 3
  assert record['compile_s'] > 0 and record['lower_s'] > 0
  assert record['image_size'] == 32 and record['batch'] == 2
  assert record['platform'] == jax.devices()[0].platform
  assert record['device'] and record['num_devices'] >= 1


@pytest.mark.slow
def test_eval_and_train_and_their_ratio():
  records = _run_bench(TINY)
  by_name = {r['measurement']: r for r in records}
  assert list(by_name) == ['eval_step', 'train_step', 'ratio']
  ratio = by_name['ratio']
  assert ratio['eval_images_per_s'] == by_name['eval_step']['images_per_s']
  assert ratio['train_images_per_s'] == by_name['train_step']['images_per_s']
  assert ratio['eval_over_train'] == pytest.approx(
      ratio['eval_images_per_s'] / ratio['train_images_per_s'], rel=1e-3
  )
  assert ratio['meets_target'] == (ratio['eval_over_train'] >= 3.0)
  assert by_name['train_step']['distill_kind'] == 'hard'
  assert all(r['tensorflow_imported'] is False for r in records)
