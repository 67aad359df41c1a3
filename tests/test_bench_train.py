"""`python -m drpl_jax.bench train`: figures, FLOPs, MFU, no TensorFlow."""

import json
import os
import subprocess
import sys
import types

import pytest

from drpl_jax.bench import train as bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_train_reports_a_consistent_measurement():
  batch = 4
  cmd = [
      sys.executable,
      '-m',
      'drpl_jax.bench',
      'train',
      '--config=configs/drpl_vit.py:variant=micro,preset=deit',
      '--batch_size',
      str(batch),
      '--steps',
      '2',
      '--repeats',
      '2',
      '--warmup',
      '1',
      '--image_size',
      '32',
      '--matmul_size',
      '512',
      '--config.model.patch_size=8',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      cmd,
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()]
  assert len(records) == 1
  r = records[0]
  assert r['benchmark'] == 'train' and r['variant'] == 'micro'
  assert r['tensorflow_imported'] is False
  assert r['batch'] == batch and r['image_size'] == 32
  assert len(r['step_ms_all']) == 2 and r['compile_s'] > 0
  assert r['images_per_s'] == pytest.approx(
      batch / (r['step_ms'] / 1000), rel=1e-2
  )
  # A forward pass costs at least 2 FLOPs per weight per token (matmuls);
  # training about 3 forwards. 16 patches + 2 prefix tokens.
  tokens = batch * (16 + 2)
  assert (
      2 * tokens * r['num_params']
      < r['flops_per_step']
      < (30 * tokens * r['num_params'])
  )
  assert r['peak_source'] == 'measured_fp32_matmul'
  assert r['peak_flops_per_s'] > 1e8
  # The reference is a 512^3 matmul timed under whatever load the host has,
  # not a true peak, so no upper bound; the formula is what is checked.
  assert r['mfu'] > 0
  assert r['mfu'] == pytest.approx(
      r['flops_per_step'] / (r['step_ms'] / 1000) / r['peak_flops_per_s'],
      rel=1e-2,
  )
  assert r['memory_source'] == 'host_rss' and r['peak_memory_bytes'] > 2**20


@pytest.mark.parametrize(
    'kind,platform,peak',
    [
        ('NVIDIA H100 80GB HBM3', 'gpu', 989e12),
        ('NVIDIA H200', 'gpu', 989e12),
        ('NVIDIA A100-SXM4-40GB', 'gpu', 312e12),
        ('TPU v4', 'tpu', 275e12),
        ('TPU v5 lite', 'tpu', 197e12),
        ('TPU v5p', 'tpu', 459e12),
        ('Some Future Chip', 'gpu', None),
    ],
)
def test_datasheet_peaks(kind, platform, peak):
  device = types.SimpleNamespace(device_kind=kind, platform=platform)
  value, source = bench_train.peak_flops(device, matmul_size=16)
  assert value == peak
  assert ('datasheet_bf16' in source) == (peak is not None)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='--steps=0'):
    bench_train.parse_args(
        ['--config=configs/drpl_vit.py:variant=micro', '--steps', '0']
    )
