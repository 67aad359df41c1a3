r"""Prepares data sets and shows what is prepared.

  python -m drpl_jax.data prepare --name covid19_radiography \
      --manual_dir ~/Downloads --data_dir ~/tensorflow_datasets \
      [--classes=COVID,Normal] [--seed 0] [--min_side 32]
  python -m drpl_jax.data info --name covid19_radiography \
      --data_dir ~/tensorflow_datasets [--manual_dir ... --classes ...]

`prepare` prints the JSON summary on stdout (progress and skipped files go
to stderr) and writes `splits.csv` (`id,split,label,patient_id`) beside the
data; the summary's `splits_csv` says where. `info` prints the summaries of
the prepared configs of a data set (all, or the one the arguments select).
Bad input exits with code 2 and a one-line message.
"""

import argparse
import glob
import json
import os
import sys

from drpl_jax.data import api
from drpl_jax.data import images
from drpl_jax.data.files import DataError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m drpl_jax.data',
      description='Prepare chest X-ray data sets (TFDS, ArrayRecord).')
  commands = parser.add_subparsers(dest='command', required=True)
  for command in ('prepare', 'info'):
    sub = commands.add_parser(command)
    sub.add_argument('--name', required=True,
                     help='demo | covid19_radiography | cxr_folder')
    sub.add_argument('--data_dir', default='',
                     help='TFDS data dir (default: $TFDS_DATA_DIR or '
                     '~/tensorflow_datasets)')
    sub.add_argument('--manual_dir', default=None,
                     help='the raw data: folder, its parent, or a .zip')
    sub.add_argument('--classes', default=None,
                     help='comma separated subset/order, e.g. COVID,Normal')
    sub.add_argument('--seed', type=int, default=None, help='split seed (0)')
    sub.add_argument('--min_side', type=int, default=None,
                     help=f'skip smaller images ({images.DEFAULT_MIN_SIDE})')
  return parser


def _prepare(args: argparse.Namespace) -> dict:
  return api.prepare(
      args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
      classes=api.parse_classes(args.classes), seed=args.seed or 0,
      min_side=args.min_side or images.DEFAULT_MIN_SIDE)


def _info(args: argparse.Namespace) -> dict:
  data_dir = args.data_dir or api.default_data_dir()
  if api.builders().get(args.name) is None:
    raise DataError(f'unknown data set {args.name!r}; known: '
                    f'{list(api.builders())}')
  pattern = os.path.join(glob.escape(data_dir), args.name, '*', '*',
                         'summary.json')
  paths = sorted(glob.glob(pattern))
  selecting = any(v is not None for v in (args.manual_dir, args.classes,
                                          args.seed, args.min_side))
  if selecting:
    wanted = api.prepared_dir(
        args.name, data_dir=data_dir, manual_dir=args.manual_dir,
        classes=api.parse_classes(args.classes), seed=args.seed or 0,
        min_side=args.min_side or images.DEFAULT_MIN_SIDE)
    paths = [p for p in paths if os.path.dirname(p) == wanted]
    if not paths:
      raise DataError(f'{args.name} is not prepared in {wanted}; run '
                      '`python -m drpl_jax.data prepare` with the same '
                      'arguments')
  prepared = []
  for path in paths:
    with open(path) as f:
      prepared.append(json.load(f))
  return {'name': args.name, 'data_dir': data_dir, 'prepared': prepared}


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (2 for bad input)."""
  args = _parser().parse_args(argv)
  try:
    result = _prepare(args) if args.command == 'prepare' else _info(args)
  except DataError as e:
    message = ' '.join(str(e).split('\n')[0].split())
    print(f'error: {message}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
