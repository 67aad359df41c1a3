"""The validation sweep (drpl_jax/reproduce/sweep.py) and the small-data recipe."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import config_module
from conftest import ROOT
from drpl_jax.reproduce import sweep

small_data = config_module('small_data')


def test_candidates_one_at_a_time_and_grid():
  sweeps = [('a', [1, 2]), ('b', ['x', 'y'])]
  assert sweep.candidates(sweeps, grid=False) == [
      {},
      {'a': 1},
      {'a': 2},
      {'b': 'x'},
      {'b': 'y'},
  ]
  grid = sweep.candidates(sweeps, grid=True)
  assert grid[0] == {} and len(grid) == 5
  assert {'a': 2, 'b': 'y'} in grid


def test_values_keys_and_errors():
  assert sweep.parse_assignment('optim.base_lr=4e-3|8e-3', many=True) == (
      'optim.base_lr',
      [4e-3, 8e-3],
  )
  assert sweep.parse_assignment(
      'data.augment.crop_scale=(0.3, 1.0)', many=False
  )[1] == (0.3, 1.0)
  assert sweep.parse_assignment('distill.kind=soft', many=False)[1] == 'soft'
  config = small_data.get_config()
  sweep.set_key(config, 'distill.alpha', 0.7)
  assert config.distill.alpha == 0.7
  with pytest.raises(ValueError, match='optim.bogus'):
    sweep.set_key(config, 'optim.bogus', 1)
  with pytest.raises(ValueError, match='distill.alpha'):
    sweep.set_key(config, 'distill.alpha', 'high')
  config.data.eval_split = 'test'
  with pytest.raises(ValueError, match='validation only'):
    sweep.check_no_test(config)


def test_a_candidate_keeps_the_base_configs_linked_keys():
  # data.image_size and model.image_size are one FieldReference in the
  # base; a sweep over the resolution must move both (a copy through
  # to_dict() had cut the link: the model stayed at 64 px and a patch of
  # 12 was refused).
  base = small_data.get_config()
  overrides = {'data.image_size': 96, 'model.patch_size': 12}
  config = sweep.candidate_config(base, overrides, steps=10)
  assert config.data.image_size == config.model.image_size == 96
  assert config.model.patch_size == 12 and config.total_steps == 10
  assert config.eval_every_steps == config.checkpoint_every_steps == 10
  assert config.optim.warmup_steps == 1  # a tenth of --steps at most
  assert (base.data.image_size, base.model.image_size) == (64, 64)
  assert base.model.patch_size == 8 and base.total_steps == 4800
  assert config.teacher.image_size == 64  # the teacher keeps its own


def test_small_data_recipe_and_its_teacher_command():
  config = small_data.get_config('classes=COVID+Normal')
  assert config.data.classes == 'COVID,Normal' and config.model.num_classes == 2
  assert config.optim.rpe_weight_decay  # the reference iRPE recipe
  assert config.distill.kind == 'hard'
  assert config.teacher.arch == config.teacher_recipe.arch == 'regnet_y_400mf'
  # The teacher's resolution is its own, not tied to the student's.
  config.data.image_size = 96
  assert config.teacher.image_size == 64 and config.model.image_size == 96
  spec = os.path.join(ROOT, 'configs', 'small_data.py')
  sets = [('data.manual_dir', '/d'), ('teacher_recipe.epochs', 3)]
  config.teacher_recipe.epochs = 3
  argv = sweep.teacher_argv(spec, config, sets, '/t/x.safetensors')
  value = lambda flag: argv[argv.index(flag) + 1]
  assert argv[1:3] == ['-m', 'drpl_jax.train_teacher']
  assert value('--arch') == 'regnet_y_400mf' and value('--epochs') == '3'
  assert value('--image_size') == '64' and value('--out') == '/t/x.safetensors'
  assert value('--crop_min_scale') == '0.5'
  assert '--config.data.manual_dir=/d' in argv
  assert not any(a.startswith('--config.teacher_recipe') for a in argv)
  vit = small_data.get_config('preset=vit')
  assert vit.distill.kind == 'none' and vit.teacher.arch == ''
  with open(os.path.join(ROOT, 'configs', 'small_data.py')) as f:
    lines = f.read().splitlines()
  # Every key the documented validation sweep measured is marked "swept"
  # where the recipe sets it.
  with open(os.path.join(ROOT, 'docs', 'small_data.md')) as f:
    rows = re.findall(r'^\| \d+ \| ([a-z_.]+)=', f.read(), re.M)
  assert {'distill.kind', 'optim.base_lr', 'data.augment.crop_scale'} <= set(
      rows
  )
  for key in rows:
    at = next(
        i
        for i, line in enumerate(lines)
        if re.match(rf'\s*config\.{re.escape(key)} = ', line)
    )
    assert any('# swept' in line for line in lines[at - 3 : at + 1]), key


def test_sweep_trains_candidates_on_validation_only(demo_data_dir, tmp_path):
  spec = tmp_path / 'tiny.py'
  spec.write_text(
      'import importlib.util\n'
      'spec = importlib.util.spec_from_file_location(\n'
      f'    "demo", {os.path.join(ROOT, "configs", "demo.py")!r})\n'
      'demo = importlib.util.module_from_spec(spec)\n'
      'spec.loader.exec_module(demo)\n'
      'def get_config(arg=""):\n'
      '  c = demo.get_config("steps=2")\n'
      '  c.model.depth = 1\n'
      '  c.batch_size = 8\n'
      f'  c.data.data_dir = {demo_data_dir!r}\n'
      '  return c\n'
  )
  workdir = tmp_path / 'sweep'
  args = [
      'run',
      f'--config={spec}',
      '--workdir',
      str(workdir),
      '--steps',
      '2',
      '--sweep',
      'optim.base_lr=0.001',
  ]
  assert _sweep(*args).returncode == 0
  result = json.loads((workdir / 'sweep.json').read_text())
  cands = result['candidates']
  assert [c['overrides'] for c in cands] == [{}, {'optim.base_lr': 0.001}]
  assert result['split'] == 'validation'
  for c in cands:
    run = workdir / 'candidates' / str(c['index']) / 'seed0'
    report = json.loads(
        (run / 'eval' / 'validation' / 'report.json').read_text()
    )
    assert c['seeds'][0]['accuracy'] == report['accuracy']
    assert (
        c['seeds'][0]['lungs_hidden_accuracy']
        == report['probes']['lungs_hidden']['accuracy']
    )
    assert not (run / 'eval' / 'test').exists()  # never the test split
  md = (workdir / 'sweep.md').read_text()
  assert '| 1 | optim.base_lr=0.001 |' in md and '| 0 | base |' in md
  stamp = os.path.getmtime(workdir / 'candidates' / '1' / 'result.json')
  assert _sweep(*args).returncode == 0  # reuses the finished candidates
  assert os.path.getmtime(workdir / 'candidates' / '1' / 'result.json') == stamp
  # The same workdir with another candidate list: candidates/1 holds the
  # runs of lr 0.001, so it is refused, naming it, and nothing is touched
  # (resuming them would label lr 0.001's model as lr 0.002's).
  other = args[:-1] + ['optim.base_lr=0.002']
  _exits_2_naming(_sweep(*other), 'candidates/1', '0.001', '0.002')
  assert os.path.getmtime(workdir / 'candidates' / '1' / 'result.json') == stamp
  other = args + ['--config.optim.weight_decay=0.5']  # another base
  _exits_2_naming(_sweep(*other), 'candidates/0', 'base', '--config')
  # More seeds: each candidate gains seed 1; seed 0 is not retrained.
  ckpt = workdir / 'candidates' / '1' / 'seed0' / 'checkpoints'
  stamps = lambda: {p: p.stat().st_mtime_ns for p in ckpt.rglob('*')}
  before = stamps()
  assert before
  assert _sweep(*args, '--seeds', '2').returncode == 0
  result = json.loads((workdir / 'sweep.json').read_text())
  for c in result['candidates']:
    assert len(c['seeds']) == 2
    assert (
        c['seeds'][0]['accuracy'] == cands[c['index']]['seeds'][0]['accuracy']
    )
    run = workdir / 'candidates' / str(c['index']) / 'seed1'
    report = json.loads(
        (run / 'eval' / 'validation' / 'report.json').read_text()
    )
    assert c['seeds'][1]['accuracy'] == report['accuracy']
  assert stamps() == before


def _sweep(*args: str) -> subprocess.CompletedProcess:
  """`python -m drpl_jax.sweep ARGS` in a subprocess, output captured."""
  return subprocess.run(
      [sys.executable, '-m', 'drpl_jax.sweep', *args],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )


def _exits_2_naming(proc: subprocess.CompletedProcess, *needles: str) -> None:
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and all(n in last for n in needles), last


@pytest.mark.parametrize(
    'args, needles',
    [
        (['--config.data.eval_split=test'], ["'test'", 'validation only']),
        (['--sweep', 'optim.nope=1'], ["'optim.nope'"]),
        (['--sweep', 'optim.base_lr'], ["'optim.base_lr'", 'KEY=VALUE']),
        (['--seeds=0'], ['--seeds=0']),
        (['--config.optim.nope=1'], ['--config.optim.nope']),
    ],
)
def test_bad_sweep_input_exits_2_naming_it(tmp_path, args, needles):
  workdir = tmp_path / 'w'
  proc = _sweep(
      'run', '--config=configs/demo.py', f'--workdir={workdir}', *args
  )
  _exits_2_naming(proc, *needles)
  assert not workdir.exists()


def test_bad_subcommands_exit_2_naming_them(tmp_path):
  _exits_2_naming(_sweep('walk', '--config=configs/demo.py'), 'walk')
  _exits_2_naming(_sweep('run', '--config=configs/demo.py'), '--workdir')
  _exits_2_naming(_sweep('teacher', '--config=configs/demo.py'), '--out')
  _exits_2_naming(
      _sweep('run', f'--config={tmp_path}/none.py', f'--workdir={tmp_path}/w'),
      'none.py',
  )
