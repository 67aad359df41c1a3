"""`python -m drpl_jax.data`: JSON on stdout, exit 2 with one line on errors."""

import json
import os
import subprocess
import sys


def _run(*args):
  return subprocess.run(
      [sys.executable, '-m', 'drpl_jax.data', *args],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


def test_prepare_prints_json_and_writes_splits_csv(tmp_path):
  result = _run('prepare', '--name', 'demo', '--data_dir', str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)  # stdout is only the JSON summary
  assert sum(summary['num_examples'].values()) == 1797
  assert os.path.isfile(summary['splits_csv'])
  assert summary['splits_csv'].startswith(str(tmp_path))
  info = _run('info', '--name', 'demo', '--data_dir', str(tmp_path))
  assert info.returncode == 0, info.stderr[-2000:]
  listed = json.loads(info.stdout)['prepared']
  assert [s['data_dir'] for s in listed] == [summary['data_dir']]


def test_missing_manual_dir_exits_2_with_one_line(tmp_path):
  missing = tmp_path / 'no_such_folder'
  result = _run(
      'prepare',
      '--name',
      'covid19_radiography',
      '--manual_dir',
      str(missing),
      '--data_dir',
      str(tmp_path / 'd'),
  )
  assert result.returncode == 2
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: ') and str(missing) in lines[-1]
  assert 'Traceback' not in result.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
  for args, message in [
      (
          ['prepare', '--name', 'mnist', '--data_dir', str(tmp_path)],
          "unknown data set 'mnist'",
      ),
      (
          ['info', '--name=demo', f'--data_dir={tmp_path}', '--seed=3'],
          'is not prepared',
      ),
      (['prepare'], '--name'),  # required
      (['--name=demo'], 'expected one command'),
      (['build', '--name=demo'], "got ['build']"),
  ]:
    result = _run(*args)
    assert result.returncode == 2, (args, result.stderr[-2000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and message in last, (args, last)
    assert 'Traceback' not in result.stderr
