"""Every script the docs tell a user to run is executable in git (mode
100755), so that `launch/x.sh ...` works in a fresh clone (issue 14)."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
SOURCED = 'sourced, not run'  # what a helper file that is not run says


def git_modes() -> dict[str, str]:
  """{path: mode} of every tracked file, as git records it."""
  out = subprocess.run(
      ['git', 'ls-files', '-s'],
      cwd=ROOT,
      text=True,
      capture_output=True,
      check=True,
  ).stdout
  modes = {}
  for line in out.splitlines():
    meta, _, path = line.partition('\t')
    modes[path] = meta.split()[0]
  return modes


def documented_scripts() -> set[str]:
  """Repository files the docs run: `launch/...` and any `*.sh` path."""
  found = set()
  for doc in DOCS:
    for path in re.findall(
        r'(?<![\w/.-])((?:launch/|\./)?[\w/.-]+\.(?:sh|sbatch))\b',
        doc.read_text(),
    ):
      path = path.removeprefix('./')
      if (ROOT / path).is_file():
        found.add(path)
  return found


def launcher_scripts() -> set[str]:
  """launch/*.sh and launch/*.sbatch, but for helpers that say they are
  sourced (and have no #! line)."""
  out = set()
  for path in sorted((ROOT / 'launch').iterdir()):
    if path.suffix not in ('.sh', '.sbatch'):
      continue
    text = path.read_text()
    if not text.startswith('#!'):
      assert SOURCED in text.splitlines()[0], (
          f'{path.name}: neither a #! script nor a helper that says '
          f'"{SOURCED}" on its first line'
      )
      continue
    out.add(str(path.relative_to(ROOT)))
  return out


def test_documented_and_launch_scripts_are_executable_in_git():
  modes = git_modes()
  documented = documented_scripts()
  assert 'launch/reproduce_paper.sh' in documented  # the finder finds them
  assert 'launch/demo.sh' in documented
  scripts = documented | launcher_scripts()
  not_executable = sorted(p for p in scripts if modes.get(p) != '100755')
  assert not not_executable, (
      f'not executable in git: {not_executable}; run git update-index '
      '--chmod=+x on them'
  )


def test_the_check_reads_modes_that_git_records():
  modes = git_modes()
  assert modes['README.md'] == '100644'
  assert modes['launch/demo.sh'] == '100755'
