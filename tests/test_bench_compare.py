"""`python -m drpl_jax.bench compare`: JAX vs the PyTorch twin."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
compare = pytest.importorskip('drpl_jax.pytorch.compare')
torch_bench = pytest.importorskip('drpl_jax.pytorch.twin.bench')
flop_counter = pytest.importorskip('torch.utils.flop_counter')

pytestmark = pytest.mark.torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KEYS = {
    'benchmark',
    'framework',
    'mode',
    'images_per_s',
    'step_ms_median',
    'warmup_s',
    'peak_memory_mb',
    'memory_kind',
    'flops_per_image',
    'xla_flops_per_image',
    'achieved_gflops',
    'peak_fraction',
    'peak_source',
    'device',
    'threads',
    'batch',
    'image_size',
    'tensorflow_imported',
}


def run_compare(tmp_path, preset: str, *extra: str):
  """Runs the CLI in a fresh process; returns (JSON records, Markdown)."""
  md = tmp_path / 'compare.md'
  cmd = [
      sys.executable,
      '-m',
      'drpl_jax.bench',
      'compare',
      f'--config=configs/drpl_vit.py:variant=micro,preset={preset}',
      '--batch_size',
      '4',
      '--image_size',
      '32',
      '--steps',
      '2',
      '--warmup',
      '0',
      '--matmul_size',
      '256',
      '--markdown',
      str(md),
      *extra,
  ]
  proc = subprocess.run(
      cmd, cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [t for t in proc.stdout.splitlines() if t.strip()]
  return [json.loads(t) for t in lines], md.read_text()


def check_model_records(recs, frameworks):
  models = [r for r in recs if r.get('measurement') == 'model']
  got = {(r['framework'], r['mode']) for r in models}
  assert got == {(f, m) for f in frameworks for m in ('train', 'inference')}
  for r in models:
    assert MODEL_KEYS <= set(r), MODEL_KEYS - set(r)
    assert r['images_per_s'] > 0 and r['step_ms_median'] > 0
    assert r['tensorflow_imported'] is False
    assert r['memory_kind'] == 'host_rss_delta'
    # The reference here is a 256^3 matmul, not a true peak: a tiny model
    # may beat it, so only the sign and the formula are checked.
    assert r['peak_fraction'] > 0
    np.testing.assert_allclose(
        r['peak_fraction'],
        r['flops_per_image'] * r['images_per_s'] / (r['peak_gflops'] * 1e9),
        rtol=0.05,
        atol=1e-4,
    )
  by = {(r['framework'], r['mode']): r for r in models}
  for mode in ('train', 'inference'):
    # The same model and batch: the same counted FLOPs for every framework.
    assert len({by[(f, mode)]['flops_per_image'] for f in frameworks}) == 1
  # fwd + bwd is about 3x the forward (counted, not assumed).
  ratio = (
      by[('jax', 'train')]['flops_per_image']
      / by[('jax', 'inference')]['flops_per_image']
  )
  assert 2.0 < ratio < 4.0
  assert by[('jax', 'train')]['xla_flops_per_image'] > 0


def test_tiny_run_without_compile(tmp_path):
  recs, md = run_compare(tmp_path, 'deit', '--no_compile')
  matmul = [r for r in recs if r.get('measurement') == 'matmul']
  assert {r['framework'] for r in matmul} == {'jax', 'torch'}
  assert all(r['gflops'] > 0 for r in matmul)
  check_model_records(recs, ('jax', 'torch_eager'))
  rows = [t for t in md.splitlines() if t.startswith('| ')][1:]  # no header
  assert [r.split('|')[1].strip() for r in rows] == ['jax', 'torch_eager']


@pytest.mark.slow
def test_tiny_run_with_torch_compile(tmp_path):
  recs, md = run_compare(tmp_path, 'drpl')
  check_model_records(recs, ('jax', 'torch_eager', 'torch_compile'))
  rows = [t for t in md.splitlines() if t.startswith('| ')][1:]
  assert [r.split('|')[1].strip() for r in rows] == [
      'jax',
      'torch_eager',
      'torch_compile',
  ]


def _runner(framework, mode, median_s, memory=10.0, xla=None):
  return compare.Runner(
      framework,
      mode,
      call=lambda: None,
      sync=lambda x: x,
      xla_flops=xla,
      warmup_s=1.0,
      peak_memory_mb=memory,
      times=[median_s * 0.9, median_s, median_s * 1.5],
  )


def test_records_and_markdown_rows():
  runners = [
      _runner('jax', 'inference', 0.1, xla=8e9),
      _runner('jax', 'train', 0.5, xla=3e10),
      _runner('torch_eager', 'train', 1.0, memory=None),
      _runner('torch_eager', 'inference', 0.2),
  ]
  errors = {'torch_compile': 'BackendCompilerFailed: no compiler'}
  meta = dict(
      benchmark='compare',
      config='c.py',
      image_size=32,
      batch=4,
      dtype='float32',
      device='cpu',
      threads=2,
      matmul_n=256,
      peak_source='measured',
  )
  recs = compare.records(
      runners,
      errors,
      {'train': 4e10, 'inference': 1.2e10},
      meta,
      peak=1e11,
      batch=4,
  )
  by = {(r['framework'], r.get('mode')): r for r in recs}
  jax_train = by[('jax', 'train')]
  assert jax_train['images_per_s'] == pytest.approx(8.0)  # 4 / median
  assert jax_train['step_ms_min'] == pytest.approx(450.0)
  assert jax_train['flops_per_image'] == pytest.approx(1e10)
  assert jax_train['xla_flops_per_image'] == pytest.approx(7.5e9)
  assert jax_train['peak_fraction'] == pytest.approx(0.8)  # 1e10 * 8 / 1e11
  # The XLA count is the JAX program's; it is reported beside torch's too.
  assert by[('torch_eager', 'inference')]['xla_flops_per_image'] == 2e9
  assert by[('torch_compile', None)]['error'].startswith('Backend')
  md = compare.markdown(recs, meta, {'jax': 90.0, 'torch': 80.0})
  rows = [t for t in md.splitlines() if t.startswith('| ')][1:]
  assert [r.split('|')[1].strip() for r in rows] == [
      'jax',
      'torch_eager',
      'torch_compile',
  ]
  assert 'failed: BackendCompilerFailed' in rows[2]
  cells = [c.strip() for c in rows[1].split('|')[2:-1]]
  assert cells[0] == '4.0' and cells[1] == '20.0'  # train, infer img/s
  assert cells[5] == 'n/a'  # train peak memory unknown
  assert '80.0' in md.splitlines()[0]


def test_start_and_round_robin_timing():
  order = []
  runners = [
      compare.Runner(
          name,
          'train',
          call=lambda n=name: order.append(n),
          sync=lambda x: x,
          setup_s=2.0,
      )
      for name in ('a', 'b')
  ]
  for r in runners:
    compare.start(r, 'cpu', warmup=2)
  assert order == ['a'] * 3 + ['b'] * 3  # first call + 2 warm-up each
  assert all(r.warmup_s >= 2.0 for r in runners)  # setup time included
  del order[:]
  compare.time_rounds(runners, steps=5, rounds=3)
  assert order == list('aabbaabbab')  # 2 + 2 + 1 steps per round
  assert [len(r.times) for r in runners] == [5, 5]


@pytest.mark.skipif(
    not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc'
)
def test_memory_meter_sees_a_host_allocation():
  with compare.MemoryMeter('cpu', 'jax') as mem:
    block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    del block
  assert 60 < mem.peak_mb < 200
  with compare.MemoryMeter('cpu', 'jax') as small:
    pass
  assert small.peak_mb < 30


def test_conv_backward_flops_respect_groups():
  """A depthwise conv's backward costs twice its forward (grad input and
  grad weight), not a dense conv's (torch's own formula ignores groups)."""
  FlopCounterMode = flop_counter.FlopCounterMode  # pylint: disable=invalid-name
  conv = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
  x = torch.randn(2, 32, 8, 8, requires_grad=True)
  forward = 2 * (2 * 32 * 8 * 8) * 9
  fixed = {torch.ops.aten.convolution_backward: torch_bench.conv_backward_flops}
  with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
    conv(x).sum().backward()
  assert counter.get_total_flops() == 3 * forward
  x = torch.randn(2, 32, 8, 8)  # no input gradient: grad_weight only
  with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
    conv(x).sum().backward()
  assert counter.get_total_flops() == 2 * forward


def test_compare_imports_without_tensorflow_tfds_or_clu():
  """The GPU box has jax, flax, optax, torch, timm: nothing else needed."""
  code = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from drpl_jax.bench import tensorflow_imported
from drpl_jax.pytorch import compare
compare._define_flags()  # pylint: disable=protected-access
from absl import flags
flags.FLAGS(['compare', '--config=configs/drpl_vit.py:variant=micro'])
args = compare.parse_flags()
assert args.config_spec == 'configs/drpl_vit.py:variant=micro'
assert compare.bench_config(args).batch_size == 16
assert not tensorflow_imported()
bad = [m for m in ('tensorflow_datasets', 'clu') if m in sys.modules]
assert not bad, bad
"""
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


@pytest.mark.parametrize(
    'args, needle',
    [
        (['--steps=0'], '--steps=0'),
        (['--batch_size=0'], '--batch_size=0'),
        (['--config.model.no_such_key=1'], 'no_such_key'),
        (['extra'], "'extra'"),
    ],
)
def test_bad_compare_input_exits_2_naming_it(args, needle):
  cmd = [
      sys.executable,
      '-m',
      'drpl_jax.bench',
      'compare',
      '--config=configs/drpl_vit.py:variant=micro',
      *args,
  ]
  proc = subprocess.run(
      cmd,
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=dict(os.environ, PYTHONPATH=ROOT),
      check=False,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and needle in last, last
