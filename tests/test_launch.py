"""Tests of the launch/ scripts: syntax, usage errors, the commands they
build (dry runs), and real runs against stand-ins for python, srun, sbatch
and a TPU worker's shell (gcloud itself is not installed here)."""

import glob
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = sorted(
    glob.glob(os.path.join(LAUNCH, '*.sh'))
    + glob.glob(os.path.join(LAUNCH, '*.sbatch'))
)
DEMO = os.path.join(ROOT, 'configs', 'demo.py')

# Prints its arguments and the variables the launchers set, one per line.
FAKE_PROGRAM = """#!/usr/bin/env bash
printf 'ARG %s\\n' "$@"
echo "ENV DRPL_DISTRIBUTED=${DRPL_DISTRIBUTED-unset}"
echo "ENV CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
echo "PWD $PWD"
if [[ -n "${FAKE_SLEEP:-}" ]]; then exec sleep "${FAKE_SLEEP}"; fi
"""


def fake_program(path) -> str:
  path = str(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(FAKE_PROGRAM)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


def run(args, env=None, cwd=None, timeout=60):
  full_env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(
          (
              'DRPL_',
              'SLURM_',
              'CUDA_VISIBLE',
              'LOCAL_GPU',
              'PYTHON',
              'TPU_NAME',
              'ZONE',
              'PROJECT',
              'SPOT',
              'SBATCH_EXTRA',
          )
      )
  }
  full_env.update(env or {})
  return subprocess.run(
      ['bash', *args],
      env=full_env,
      cwd=cwd or ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def parsed(stdout: str) -> dict[str, list]:
  """Recorded ARG/ENV lines of the fake program."""
  out = {'args': [], 'env': {}, 'pwd': None}
  for line in stdout.splitlines():
    if line.startswith('ARG '):
      out['args'].append(line[4:])
    elif line.startswith('ENV '):
      key, value = line[4:].split('=', 1)
      out['env'][key] = value
    elif line.startswith('PWD '):
      out['pwd'] = line[4:]
  return out


def test_there_are_launchers():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {
      'local.sh',
      'gpu_node.sh',
      'slurm.sh',
      'slurm.sbatch',
      'tpu_pod.sh',
      'common.sh',
  } <= names


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  proc = subprocess.run(
      ['bash', '-n', script], capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    'args',
    [
        ['launch/local.sh'],
        ['launch/local.sh', 'configs/demo.py'],
        ['launch/local.sh', 'configs/missing.py', '/tmp/w'],
        ['launch/local.sh', 'configs/demo.py', '/tmp/w', 'notanoverride'],
        ['launch/local.sh', 'configs/demo.py', ''],
        ['launch/local.sh', 'configs/demo.py', 'gs://'],
        ['launch/gpu_node.sh', 'configs/demo.py'],
        ['launch/gpu_node.sh', ':variant=s', '/tmp/w'],
        ['launch/slurm.sbatch', 'configs/demo.py'],
        ['launch/slurm.sbatch', 'nope.py', '/tmp/w'],
        ['launch/slurm.sh', '-N', 'two', 'configs/demo.py', '/tmp/w'],
        ['launch/slurm.sh', '-x', 'configs/demo.py', '/tmp/w'],
        ['launch/slurm.sh', 'configs/demo.py'],
        ['launch/tpu_pod.sh'],
        ['launch/tpu_pod.sh', 'frobnicate'],
        ['launch/tpu_pod.sh', '--colour=red', 'create'],
        ['launch/tpu_pod.sh', '--zone'],
        ['launch/tpu_pod.sh', 'create', 'extra'],
        ['launch/tpu_pod.sh', 'run', 'configs/demo.py'],
        ['launch/tpu_pod.sh', 'run', DEMO, 'gs://b/w'],
        ['launch/tpu_pod.sh', 'run', 'configs/demo.py', 'gs://b/w', 'x'],
        ['launch/tpu_pod.sh', 'logs', 'worker7'],
        ['launch/tpu_pod.sh', 'exec'],
    ],
)
def test_usage_errors_exit_2(args):
  proc = run(args, env={'DRPL_DRY_RUN': '1'})
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert 'usage:' in proc.stderr
  assert 'gcloud compute' not in proc.stdout


def test_local_dry_run_prints_the_command(tmp_path):
  proc = run(
      [
          os.path.join(LAUNCH, 'local.sh'),
          'configs/drpl_vit.py:variant=micro,preset=drpl',
          'rel/workdir',
          'total_steps=5',
          '--config.model.name=a b',
          '--alsologtostderr',
      ],
      env={'DRPL_DRY_RUN': '1', 'PYTHON': '/opt/py/bin/python'},
      cwd=tmp_path,
  )  # config found via the repo root
  assert proc.returncode == 0, proc.stderr
  assert shlex.split(proc.stdout) == [
      'env',
      'DRPL_DISTRIBUTED=0',
      'CUDA_VISIBLE_DEVICES=0',
      '/opt/py/bin/python',
      '-m',
      'drpl_jax.main',
      f'--config={ROOT}/configs/drpl_vit.py:variant=micro,preset=drpl',
      '--workdir=rel/workdir',
      '--config.total_steps=5',
      '--config.model.name=a b',
      '--alsologtostderr',
  ]
  assert not (tmp_path / 'rel').exists()


def test_local_runs_one_process_on_one_gpu(tmp_path):
  python = fake_program(tmp_path / 'bin' / 'python')
  proc = run(
      [
          'launch/local.sh',
          'configs/demo.py',
          str(tmp_path / 'w'),
          'data.data_dir=/d d',
      ],
      env={
          'PYTHON': python,
          'CUDA_VISIBLE_DEVICES': '3,1',
          'DRPL_DISTRIBUTED': '1',
      },
  )
  assert proc.returncode == 0, proc.stderr
  got = parsed(proc.stdout)
  assert got['args'] == [
      '-m',
      'drpl_jax.main',
      f'--config={DEMO}',
      f'--workdir={tmp_path / "w"}',
      '--config.data.data_dir=/d d',
  ]
  assert got['env'] == {'DRPL_DISTRIBUTED': '0', 'CUDA_VISIBLE_DEVICES': '3'}
  proc = run(
      ['launch/local.sh', 'configs/demo.py', 'w'],
      env={'PYTHON': python, 'LOCAL_GPU': '2'},
  )
  assert parsed(proc.stdout)['env']['CUDA_VISIBLE_DEVICES'] == '2'


def test_gpu_node_keeps_all_gpus_in_one_process(tmp_path):
  python = fake_program(tmp_path / 'bin' / 'python')
  env = {'PYTHON': python, 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  proc = run(
      [
          'launch/gpu_node.sh',
          'configs/demo.py',
          'gs://bucket/run',
          'mesh_shape=(2,2)',
      ],
      env=env,
  )
  assert proc.returncode == 0, proc.stderr
  got = parsed(proc.stdout)
  assert got['args'] == [
      '-m',
      'drpl_jax.main',
      f'--config={DEMO}',
      '--workdir=gs://bucket/run',
      '--config.mesh_shape=(2,2)',
  ]
  assert got['env'] == {
      'DRPL_DISTRIBUTED': '0',
      'CUDA_VISIBLE_DEVICES': '0,1,2,3',
  }
  dry = run(
      ['launch/gpu_node.sh', 'configs/demo.py', 'gs://bucket/run'],
      env={**env, 'DRPL_DRY_RUN': '1'},
  )
  assert shlex.split(dry.stdout)[:4] == [
      'env',
      'DRPL_DISTRIBUTED=0',
      python,
      '-m',
  ]


def test_slurm_sbatch_runs_one_task_per_node_under_srun(tmp_path):
  bindir = tmp_path / 'bin'
  fake_program(bindir / 'srun')
  # sbatch runs a spool copy of the script from the submit directory.
  spool = tmp_path / 'spool' / 'slurm_script'
  spool.parent.mkdir()
  shutil.copy(os.path.join(LAUNCH, 'slurm.sbatch'), spool)
  env = {
      'PATH': f'{bindir}:{os.environ["PATH"]}',
      'SLURM_SUBMIT_DIR': ROOT,
      'SLURM_JOB_ID': '7',
      'DRPL_DISTRIBUTED': '0',
      'PYTHON': '/venv/bin/python',
  }
  proc = run(
      [str(spool), 'configs/demo.py', '/shared/run', 'seed=3'],
      env=env,
      cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr
  got = parsed(proc.stdout)
  assert got['args'] == [
      '--ntasks-per-node=1',
      '--kill-on-bad-exit=1',
      '/venv/bin/python',
      '-m',
      'drpl_jax.main',
      f'--config={DEMO}',
      '--workdir=/shared/run',
      '--config.seed=3',
  ]
  assert got['env']['DRPL_DISTRIBUTED'] == 'unset'  # SLURM detection on
  with open(spool) as f:
    header = f.read()
  assert '#SBATCH --ntasks-per-node=1' in header
  assert '#SBATCH --nodes=' in header


def test_slurm_sh_submits_the_sbatch_script(tmp_path):
  bindir = tmp_path / 'bin'
  fake_program(bindir / 'sbatch')
  env = {
      'PATH': f'{bindir}:{os.environ["PATH"]}',
      'SBATCH_EXTRA': '--account=abc --qos=high',
  }
  args = [
      'launch/slurm.sh',
      '-N',
      '4',
      '-g',
      '8',
      '-t',
      '2:00:00',
      'configs/demo.py',
      '/shared/run',
      'total_steps=9',
  ]
  proc = run(args, env=env)
  assert proc.returncode == 0, proc.stderr
  expected = [
      f'--chdir={ROOT}',
      f'--export=ALL,DRPL_REPO={ROOT}',
      '--nodes=4',
      '--gpus-per-node=8',
      '--time=2:00:00',
      '--account=abc',
      '--qos=high',
      os.path.join(LAUNCH, 'slurm.sbatch'),
      DEMO,
      '/shared/run',
      '--config.total_steps=9',
  ]
  assert parsed(proc.stdout)['args'] == expected
  dry = run(args, env={**env, 'DRPL_DRY_RUN': '1'})
  assert shlex.split(dry.stdout) == ['sbatch', *expected]


def tpu(*args, env=None):
  proc = run(
      [
          'launch/tpu_pod.sh',
          '--dry-run',
          '--name=pod1',
          '--zone',
          'us-central2-b',
          '--project=proj',
          *args,
      ],
      env=env,
  )
  assert proc.returncode == 0, proc.stderr
  lines = [t[2:] for t in proc.stdout.splitlines() if t.startswith('+ ')]
  assert len(lines) == len(proc.stdout.splitlines())
  return [shlex.split(t) for t in lines]


def remote(cmd: list[str]) -> str:
  """The shell command line of a `gcloud ... ssh --command=...`."""
  (command,) = [a for a in cmd if a.startswith('--command=')]
  return command[len('--command=') :]


SSH_ALL = [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'ssh',
    'pod1',
    '--zone=us-central2-b',
    '--project=proj',
    '--worker=all',
]


def test_tpu_create_and_delete():
  assert tpu(
      '--accelerator-type',
      'v5litepod-16',
      '--version=v2-alpha',
      '--spot',
      'create',
  ) == [
      [
          'gcloud',
          'compute',
          'tpus',
          'tpu-vm',
          'create',
          'pod1',
          '--zone=us-central2-b',
          '--project=proj',
          '--accelerator-type=v5litepod-16',
          '--version=v2-alpha',
          '--spot',
      ]
  ]
  assert tpu('delete') == [
      [
          'gcloud',
          'compute',
          'tpus',
          'tpu-vm',
          'delete',
          'pod1',
          '--zone=us-central2-b',
          '--project=proj',
          '--quiet',
      ]
  ]
  # Defaults and environment variables.
  proc = run(
      ['launch/tpu_pod.sh', 'create'],
      env={'DRPL_DRY_RUN': '1', 'TPU_NAME': 'envpod'},
  )
  assert shlex.split(proc.stdout[2:]) == [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'create',
      'envpod',
      '--zone=us-central2-b',
      '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base',
  ]


def test_tpu_install_on_all_workers():
  (cmd,) = tpu('--python=python3.12', 'install')
  assert cmd[:9] == SSH_ALL
  line = remote(cmd)
  assert line.startswith('cd drpl-jax || exit 1; ')
  assert 'python3.12 -m venv .venv' in line
  assert ".venv/bin/pip install -q -c constraints.txt -e '.[data]'" in line
  assert (
      "'jax[tpu]' -f https://storage.googleapis.com/jax-releases/"
      'libtpu_releases.html'
  ) in line
  subprocess.run(['sh', '-n', '-c', line], check=True)


def test_tpu_copy_then_run_logs_stop_on_a_simulated_worker(tmp_path):
  """Runs the printed local and remote commands (not gcloud) for real;
  remote ones with `sh`, as a worker's login shell might be POSIX only."""
  tar, scp, ssh = tpu('copy', env={'TMPDIR': str(tmp_path)})
  assert tar[0] == 'tar' and scp[:5] == [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'scp',
  ]
  assert '--worker=all' in scp and scp[6] == 'pod1:drpl-jax-src.tar.gz'
  assert ssh[:9] == SSH_ALL
  # Exit status 1: a file changed while read (other work in this repo).
  sh(shlex.join(tar), cwd=tmp_path, ok=(0, 1))
  home = tmp_path / 'home'
  home.mkdir()
  shutil.copy(scp[5], home / 'drpl-jax-src.tar.gz')
  sh(remote(ssh), cwd=home)
  repo = home / 'drpl-jax'
  assert (repo / 'launch' / 'tpu_pod.sh').is_file()
  assert (repo / 'drpl_jax' / 'parallel' / 'distributed.py').is_file()
  assert not (repo / '.venv').exists() and not (repo / '.git').exists()
  assert not (home / 'drpl-jax-src.tar.gz').exists()

  fake_program(repo / '.venv' / 'bin' / 'python')
  (cmd,) = tpu(
      'run',
      'configs/drpl_vit.py:variant=s,preset=drpl',
      'gs://bkt/run 1',
      'total_steps=7',
      '--config.data.name=a b',
  )
  assert cmd[:9] == SSH_ALL
  env = {**os.environ, 'FAKE_SLEEP': '60'}
  sh(remote(cmd), cwd=home, env=env)
  pid_file = repo / 'logs' / 'run.pid'
  pid = int(pid_file.read_text())
  host = subprocess.run(
      ['sh', '-c', 'echo $(hostname)'],
      text=True,
      capture_output=True,
      check=True,
  ).stdout.strip()
  log = repo / 'logs' / f'run-{host}.log'
  try:
    deadline = time.time() + 20
    while time.time() < deadline and not (
        log.exists() and 'PWD' in log.read_text()
    ):
      time.sleep(0.1)
    assert [p.name for p in (repo / 'logs').glob('run-*.log')] == [log.name]
    got = parsed(log.read_text())
    assert got['args'] == [
        '-m',
        'drpl_jax.main',
        '--config=configs/drpl_vit.py:variant=s,preset=drpl',
        '--workdir=gs://bkt/run 1',
        '--config.total_steps=7',
        '--config.data.name=a b',
    ]
    assert got['env']['DRPL_DISTRIBUTED'] == '1'
    assert got['pwd'] == str(repo)
    os.kill(pid, 0)  # still running after the ssh command returned

    (logs_cmd,) = tpu('logs', '-n', '3', '2')
    assert '--worker=2' in logs_cmd
    out = sh(remote(logs_cmd), cwd=home)
    assert out.stdout.splitlines() == log.read_text().splitlines()[-3:]

    (stop,) = tpu('stop')
    assert stop[:9] == SSH_ALL
    sh(remote(stop), cwd=home)
    deadline = time.time() + 20
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.1)
    assert not _alive(pid)
    assert not pid_file.exists()
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


def sh(line: str, cwd, env=None, ok=(0,)) -> subprocess.CompletedProcess:
  """Runs a command line with sh; asserts its exit status is in `ok`."""
  proc = subprocess.run(
      ['sh', '-c', line],
      cwd=cwd,
      env=env,
      text=True,
      capture_output=True,
      timeout=60,
      check=False,
  )
  assert proc.returncode in ok, (line, proc.stdout, proc.stderr)
  return proc


def _alive(pid: int) -> bool:
  try:
    os.waitpid(pid, os.WNOHANG)
  except ChildProcessError:
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:  # a zombie is not running
    return f.read().split(')')[-1].split()[0] != 'Z'


def test_tpu_exec_runs_in_the_repo(tmp_path):
  (cmd,) = tpu('exec', '-w', '0', '--', 'printf', '%s|', 'a b', "it's")
  assert '--worker=0' in cmd
  (tmp_path / 'drpl-jax').mkdir()
  out = sh(remote(cmd), cwd=tmp_path)
  assert out.stdout == "a b|it's|"
  (cmd,) = tpu('exec', 'true')
  assert cmd[:9] == SSH_ALL


def test_tpu_without_gcloud_says_so(tmp_path):
  bindir = tmp_path / 'bin'  # a PATH with the script's tools but no gcloud
  bindir.mkdir()
  os.symlink(shutil.which('dirname'), bindir / 'dirname')
  proc = subprocess.run(
      [shutil.which('bash'), 'launch/tpu_pod.sh', 'delete'],
      cwd=ROOT,
      env={'PATH': str(bindir)},
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert proc.returncode == 1, proc.stderr
  assert 'gcloud not found' in proc.stderr
  assert proc.stdout == ''
