"""`python -m drpl_jax.reproduce SUBCOMMAND [flags]`: one reproduction.

  settings [--mode M] [--smoke] [--seeds N]      the settings, as JSON
  args {prepare,teacher,run} --workdir W ...     a step's arguments
  runs | paths | plan --workdir W ...            runs, paths; check the plan
  record --workdir W --step NAME --start S --end E [--rc RC] -- COMMAND...
  table --workdir W [--out FILE]                 the Markdown table
  exists PATH                                    exit 0 if PATH exists

Settings, paths and bookkeeping come from `protocol`; `table` writes the
Markdown table. This module is the command line only (an absl command under
drpl_jax/cli.py's exit policy), above both, so that neither imports the
other's caller. launch/reproduce_paper.sh drives it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

from absl import flags
from etils import epath

from drpl_jax import cli

from drpl_jax.reproduce import table
from drpl_jax.reproduce.protocol import (
    MODES,
    PRESETS,
    Paths,
    Settings,
    TRAIN_IMAGES,
    check_plan,
    config_arg,
    estimate_minutes,
    get_paths,
    get_settings,
    plan_dict,
    prepare_args,
    prepared_summary,
    read_json,
    record,
    run_overrides,
    teacher_args,
    write_json,
)


def _lines(args: Any) -> list[str]:
  """The output lines of a subcommand that works on one reproduction
  (`args`: the parsed flags, plus `cmd` and `what`)."""
  settings = get_settings(args.mode, smoke=args.smoke, num_seeds=args.seeds)
  if args.cmd == 'settings':
    values = dataclasses.asdict(settings)
    if settings.mode in TRAIN_IMAGES and not settings.smoke:
      values['estimate_minutes_2_cores'] = {
          k: round(v, 1) for k, v in estimate_minutes(settings).items()
      }
    return [json.dumps(values, indent=1)]
  paths = get_paths(
      settings, args.workdir, **{k: getattr(args, k) for k in PATH_FLAGS}
  )
  if args.cmd == 'runs':
    return [
        '\t'.join((p, str(s), paths.run_dir(p, s), paths.report(p, s)))
        for p in settings.presets
        for s in settings.seeds
    ]
  if args.cmd == 'paths':
    values = dict(
        dataclasses.asdict(paths),
        **paths.extra(),
        prepared=prepared_summary(settings, paths),
    )
    return [f'{k}\t{v}' for k, v in values.items()]
  if args.cmd == 'plan':
    return [_plan(settings, paths, args)]
  if args.what == 'prepare':
    return prepare_args(settings, paths)
  if args.what == 'teacher':
    return teacher_args(settings, paths)
  if args.preset is None or args.seed is None:
    raise ValueError('args run needs --preset and --seed')
  return [config_arg(settings, args.preset)] + run_overrides(
      settings, paths, args.preset, args.seed
  )


def _plan(settings: Settings, paths: Paths, args: Any) -> str:
  """Checks the arguments and writes (or checks) WORKDIR/reproduce.json."""
  if not paths.manual_dir.startswith('gs://') and not os.path.exists(
      paths.manual_dir
  ):
    raise ValueError(
        _missing_data(paths.manual_dir, args.manual_dir, settings.mode)
    )
  plan = plan_dict(settings, paths, args.command, args.launcher)
  path = paths.extra()['plan']
  old = read_json(path, 'plan') if epath.Path(path).exists() else None
  if check_plan(plan, old, path) and not args.dry_run:
    write_json(path, plan)
    return f'wrote {path}'
  if args.dry_run and old is None:
    return f'plan {path}: would be written (dry run)'
  return f'plan {path}: unchanged{" (dry run)" if args.dry_run else ""}'


def _missing_data(path: str, given: str, mode: str) -> str:
  """Why the raw data folder `path` is missing: given, or the mode's default."""
  if given:
    return f'--manual_dir {path} does not exist'
  return (
      f'the {mode} data {path} does not exist (it is expected beside '
      'this checkout, in ../shared/data); pass --manual_dir '
      f'PATH/{os.path.basename(path)}'
  )


SUBCOMMANDS = (
    'settings',
    'args',
    'runs',
    'paths',
    'plan',
    'record',
    'table',
    'exists',
)
WHAT = ('prepare', 'teacher', 'run')
# The flags of `get_paths`'s keywords, by the same names.
PATH_FLAGS = ('manual_dir', 'data_dir', 'teacher', 'teacher_init')


def _define_flags() -> None:
  """The flags of every subcommand (defined only when the command runs)."""
  flags.DEFINE_enum('mode', 'paper', MODES, "The reproduction's mode.")
  flags.DEFINE_bool('smoke', False, 'A few steps of everything.')
  flags.DEFINE_integer('seeds', None, "How many seeds (default: the mode's).")
  cli.define_workdir("The reproduction's directory.", required=False)
  for name in PATH_FLAGS:
    flags.DEFINE_string(name, '', f"{name} (default: the mode's).")
  flags.DEFINE_enum('preset', None, PRESETS, 'args run: the preset.')
  flags.DEFINE_integer('seed', None, 'args run: the seed.')
  flags.DEFINE_string('launcher', 'local', 'plan: the launcher.')
  flags.DEFINE_string('command', '', 'plan: the command line to record.')
  flags.DEFINE_bool('dry_run', False, 'plan: check, write nothing.')
  flags.DEFINE_string('step', None, "record: the step's name.")
  flags.DEFINE_float('start', None, 'record: start time (seconds).')
  flags.DEFINE_float('end', None, 'record: end time (seconds).')
  flags.DEFINE_integer('rc', 0, 'record: the exit status.')
  flags.DEFINE_string('out', '', 'table: output (default WORKDIR/results.md).')


def _subcommand(argv: Sequence[str]) -> tuple[str, list[str]]:
  """(subcommand, its positional arguments), checked."""
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    got = repr(argv[1]) if len(argv) > 1 else 'none'
    raise cli.UserError(f'expected a subcommand of {SUBCOMMANDS}, got {got}')
  cmd, rest = argv[1], list(argv[2:])
  wanted = {'args': 1, 'exists': 1}.get(cmd, 0)
  if cmd != 'record' and len(rest) != wanted:
    raise cli.UserError(
        f'{cmd} takes {wanted} positional argument(s), got {rest}'
    )
  if cmd == 'args' and rest[0] not in WHAT:
    raise cli.UserError(f'args {rest[0]!r}: expected one of {WHAT}')
  if cmd not in ('settings', 'exists') and not flags.FLAGS.workdir:
    raise cli.UserError(f'{cmd} needs --workdir')
  if cmd == 'record' and (
      not flags.FLAGS.step
      or flags.FLAGS.start is None
      or flags.FLAGS.end is None
  ):
    raise cli.UserError('record needs --step, --start and --end')
  return cmd, rest


def main(argv: Sequence[str]) -> None:
  """Runs a subcommand and prints its lines."""
  f = flags.FLAGS
  cmd, rest = _subcommand(argv)
  if cmd == 'exists':
    sys.exit(0 if epath.Path(rest[0]).exists() else 1)
  if cmd == 'record':  # rest: the command, after `--`
    path = os.fspath(epath.Path(f.workdir) / 'timings' / f'{f.step}.json')
    entry = record(path, f.step, rest, f.start, f.end, f.rc)
    lines = [f'{f.step}: {entry["seconds"]}s in all ({path})']
  elif cmd == 'table':
    lines = [f'wrote {table.write_table(f.workdir, f.out)}']
  else:
    args = _namespace(f, cmd=cmd, what=rest[0] if rest else None)
    lines = _lines(args)
  print('\n'.join(lines))


def _namespace(f: Any, **extra: Any) -> Any:
  """The flag values as one namespace (`args.mode`, ...) with `extra`."""
  return types.SimpleNamespace(**{name: f[name].value for name in f}, **extra)


def run() -> None:
  """The command line (`python -m drpl_jax.reproduce`, `drpl-reproduce`):
  bad input (a ValueError, a missing file) exits 2 with one `error:` line."""
  _define_flags()
  cli.run(main, (ValueError, FileNotFoundError), tensorflow=False)
