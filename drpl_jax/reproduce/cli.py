"""`python -m drpl_jax.reproduce`: the subcommands over one reproduction.

Settings, paths and bookkeeping come from `protocol`; `table` writes the
Markdown table. This module is the command line only, above both, so that
neither imports the other's caller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from etils import epath

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


def _lines(args: argparse.Namespace) -> list[str]:
  """The output lines of a subcommand that works on one reproduction."""
  settings = get_settings(args.mode, smoke=args.smoke, num_seeds=args.seeds)
  if args.cmd == 'settings':
    values = dataclasses.asdict(settings)
    if settings.mode in TRAIN_IMAGES and not settings.smoke:
      values['estimate_minutes_2_cores'] = {
          k: round(v, 1) for k, v in estimate_minutes(settings).items()}
    return [json.dumps(values, indent=1)]
  paths = get_paths(settings, args.workdir, manual_dir=args.manual_dir,
                    data_dir=args.data_dir, teacher=args.teacher,
                    teacher_init=args.teacher_init)
  if args.cmd == 'runs':
    return ['\t'.join((p, str(s), paths.run_dir(p, s), paths.report(p, s)))
            for p in settings.presets for s in settings.seeds]
  if args.cmd == 'paths':
    values = dict(dataclasses.asdict(paths), **paths.extra(),
                  prepared=prepared_summary(settings, paths))
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
      settings, paths, args.preset, args.seed)


def _plan(settings: Settings, paths: Paths, args: argparse.Namespace) -> str:
  """Checks the arguments and writes (or checks) WORKDIR/reproduce.json."""
  if not paths.manual_dir.startswith('gs://') and not os.path.exists(
      paths.manual_dir):
    raise ValueError(_missing_data(paths.manual_dir, args.manual_dir,
                                   settings.mode))
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
  return (f'the {mode} data {path} does not exist (it is expected beside '
          'this checkout, in ../shared/data); pass --manual_dir '
          f'PATH/{os.path.basename(path)}')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m drpl_jax.reproduce')
  sub = parser.add_subparsers(dest='cmd', required=True)
  for name in ('settings', 'args', 'runs', 'paths', 'plan'):
    p = sub.add_parser(name)
    p.add_argument('--mode', choices=MODES, default='paper')
    p.add_argument('--smoke', action='store_true')
    p.add_argument('--seeds', type=int, default=None, help='how many')
    if name != 'settings':
      p.add_argument('--workdir', required=True)
      for flag in ('manual_dir', 'data_dir', 'teacher', 'teacher_init'):
        p.add_argument(f'--{flag}', default='')
    if name == 'args':
      p.add_argument('what', choices=('prepare', 'teacher', 'run'))
      p.add_argument('--preset', choices=PRESETS)
      p.add_argument('--seed', type=int)
    if name == 'plan':
      p.add_argument('--launcher', default='local')
      p.add_argument('--command', default='')
      p.add_argument('--dry_run', action='store_true')
  p = sub.add_parser('record', help='append an attempt to a step timing')
  for flag, kind in (('workdir', str), ('step', str), ('start', float),
                     ('end', float), ('rc', int)):
    p.add_argument(f'--{flag}', type=kind, required=flag != 'rc', default=0)
  p.add_argument('command', nargs=argparse.REMAINDER)
  p = sub.add_parser('table', help='write the Markdown table')
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', default='', help='default WORKDIR/results.md')
  sub.add_parser('exists', help='exit 0 if PATH exists').add_argument('path')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs a subcommand; bad input exits 2 with a one-line message."""
  args = _parser().parse_args(argv)
  try:
    if args.cmd == 'exists':
      return 0 if epath.Path(args.path).exists() else 1
    if args.cmd == 'record':
      command = args.command[1:] if args.command[:1] == ['--'] else (
          args.command)
      path = os.path.join(args.workdir, 'timings', f'{args.step}.json')
      entry = record(path, args.step, command, args.start, args.end, args.rc)
      lines = [f'{args.step}: {entry["seconds"]}s in all ({path})']
    elif args.cmd == 'table':
      lines = [f'wrote {table.write_table(args.workdir, args.out)}']
    else:
      lines = _lines(args)
  except (ValueError, FileNotFoundError) as e:
    print(f'reproduce: error: {e}', file=sys.stderr)
    return 2
  print('\n'.join(lines))
  return 0
