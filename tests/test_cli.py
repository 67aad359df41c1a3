"""The commands' shared flags and exit policy (drpl_jax/cli.py, issue 14):
bad input is one `error:` line on stderr and exit status 2, a bug keeps its
traceback, and one idea has one flag name in every command."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drpl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def _run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(
      [PYTHON, *args],
      cwd=ROOT,
      env=env,
      text=True,
      capture_output=True,
      timeout=timeout,
      check=False,
  )


def _user_error(proc, *needles):
  """Exit 2, no traceback, stderr's last line `error: ...` naming needles."""
  assert proc.returncode == cli.EXIT_USER_ERROR, (
      proc.returncode,
      proc.stderr[-2000:],
  )
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for needle in needles:
    assert needle in last, last
  return last


def test_a_config_key_that_does_not_exist_exits_2(tmp_path):
  workdir = tmp_path / 'w'
  proc = _run(
      '-m',
      'drpl_jax.main',
      '--config=configs/demo.py',
      '--config.optim.no_such_key=1',
      f'--workdir={workdir}',
  )
  _user_error(proc, '--config.optim.no_such_key', "'no_such_key'")
  assert not workdir.exists()


def test_a_config_value_of_the_wrong_type_exits_2(tmp_path):
  proc = _run(
      '-m',
      'drpl_jax.main',
      '--config=configs/demo.py',
      '--config.optim.base_lr=fast',
      f'--workdir={tmp_path}/w',
  )
  _user_error(proc, '--config.optim.base_lr', 'fast')


def test_a_missing_teacher_file_exits_2_before_any_work(tmp_path):
  workdir, teacher = tmp_path / 'w', tmp_path / 'nope.safetensors'
  proc = _run(
      '-m',
      'drpl_jax.main',
      f'--config=configs/demo.py:teacher={teacher}',
      f'--workdir={workdir}',
  )
  _user_error(proc, 'config.teacher.checkpoint', str(teacher))
  assert not workdir.exists()


def test_evaluate_of_a_missing_run_exits_2(tmp_path):
  proc = _run('-m', 'drpl_jax.evaluate', f'--workdir={tmp_path}/none')
  _user_error(proc, str(tmp_path / 'none'))


_PROGRAM = textwrap.dedent("""
    import sys
    from drpl_jax import cli
    cli.define_workdir()
    def main(argv):
      if sys.argv[-1] == '--workdir=bug':
        raise RuntimeError('a bug')
      raise cli.UserError('--workdir=' + sys.argv[-1] + ' is not a run')
    cli.run(main)
""")


def test_run_turns_user_errors_into_one_line_and_keeps_bugs_loud():
  _user_error(_run('-c', _PROGRAM, '--workdir=x'), 'is not a run')
  missing = _run('-c', _PROGRAM)  # a required flag left out
  _user_error(missing, '--workdir')
  bug = _run('-c', _PROGRAM, '--workdir=bug')
  assert bug.returncode == 1 and 'Traceback' in bug.stderr
  assert 'RuntimeError: a bug' in bug.stderr


def test_user_error_is_a_value_error_and_preflight_raises_it():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
      {
          'distill': {'kind': 'hard'},
          'model': {'distilled': True},
          'teacher': {'arch': None, 'soft_labels': None, 'checkpoint': None},
      }
  )
  with pytest.raises(cli.UserError, match='needs a teacher'):
    preflight.check_teacher(config)
  assert issubclass(cli.UserError, ValueError)  # callers catching ValueError


def test_one_idea_has_one_flag_name_in_every_command():
  """predict, export and every benchmark are absl commands: --workdir,
  --step, --ema and --batch_size mean the same everywhere (cli.py)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from drpl_jax.bench import eval as bench_eval  # pylint: disable=g-import-not-at-top
  from drpl_jax.bench import input as bench_input  # pylint: disable=g-import-not-at-top
  from drpl_jax.bench import teacher as bench_teacher  # pylint: disable=g-import-not-at-top
  from drpl_jax.bench import train as bench_train  # pylint: disable=g-import-not-at-top

  for module in (bench_eval, bench_input, bench_teacher, bench_train):
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    assert 'batch_size' in flag_values and 'batch' not in flag_values
    assert flag_values['batch_size'].help.startswith(cli.BATCH_SIZE_HELP)
  args = bench_train.parse_args(
      ['--config=configs/drpl_vit.py:variant=micro', '--batch_size', '4']
  )
  assert args.batch_size == 4 and args.config.batch_size == 4
  for command in ('predict', 'export'):
    text = _run('-m', f'drpl_jax.{command}', '--helpfull').stdout
    for flag, help_text in (
        ('workdir', cli.WORKDIR_HELP),
        ('step', cli.STEP_HELP),
    ):
      assert f'--{flag}: {help_text}' in text, (command, flag)
    assert '--[no]ema:' in text, command


def test_the_demo_console_is_short_unless_verbose(demo_data_dir, tmp_path):
  workdir = tmp_path / 'w'
  command = [
      '-m',
      'drpl_jax.main',
      '--config=configs/demo.py:steps=4',
      f'--workdir={workdir}',
      f'--config.data.data_dir={demo_data_dir}',
      '--config.batch_size=8',
      '--config.eval_batch_size=64',
      '--config.log_every_steps=2',
      '--config.eval_every_steps=4',
      '--config.optim.warmup_steps=1',
  ]
  quiet = _run(*command)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  lines = (quiet.stdout + quiet.stderr).splitlines()
  assert len(lines) < 40, '\n'.join(lines)
  assert not [t for t in lines if t.startswith('I1') or 'oneDNN' in t], lines
  assert json.loads(quiet.stdout.splitlines()[-1])['step'] == 4
  assert (
      sum(
          t.startswith('step ') and 'images/s' in t and 'ETA' in t
          for t in lines
      )
      == 2
  )  # plain lines: stdout is not a terminal
  (evals,) = [t for t in lines if t.startswith('eval at step 4')]
  assert 'val_accuracy_' in evals, evals
  table = workdir / 'params.txt'
  assert str(table) in quiet.stdout and 'Total' in table.read_text()
  verbose = _run(*command, '--verbosity=0')  # resumes at step 4: evaluates
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert any(t.startswith('I1') for t in verbose.stderr.splitlines())


def test_a_config_file_that_does_not_exist_exits_2_naming_it(tmp_path):
  missing = tmp_path / 'none.py'
  proc = _run(
      '-m', 'drpl_jax.main', f'--config={missing}', f'--workdir={tmp_path}/w'
  )
  _user_error(proc, f'--config={missing}', 'No such file')
  assert not (tmp_path / 'w').exists()
