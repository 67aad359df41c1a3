r"""Prepares data sets and shows what is prepared.

  python -m drpl_jax.data prepare --name=covid19_radiography \
      --manual_dir=~/Downloads --data_dir=~/tensorflow_datasets \
      [--classes=COVID,Normal] [--seed=0] [--min_side=32]
  python -m drpl_jax.data info --name=covid19_radiography \
      --data_dir=~/tensorflow_datasets [--manual_dir=... --classes=...]

`prepare` prints the JSON summary on stdout (progress and skipped files go
to stderr) and writes `splits.csv` (`id,split,label,patient_id`) beside the
data; the summary's `splits_csv` says where. `info` prints the summaries of
the prepared configs of a data set (all, or the one the arguments select).
Bad input exits with code 2 and a one-line `error:` (drpl_jax/cli.py).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from drpl_jax import cli

COMMANDS = ('prepare', 'info')
# The flags that select one prepared config (None = not given).
SELECTING = ('manual_dir', 'classes', 'seed', 'min_side')


def _define_flags() -> None:
  """This command's flags (defined when it runs, not on import)."""
  flags.DEFINE_string(
      'name', None, 'demo | covid19_radiography | cxr_folder', required=True
  )
  flags.DEFINE_string(
      'data_dir',
      '',
      'TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).',
  )
  flags.DEFINE_string(
      'manual_dir', None, 'The raw data: folder, its parent, or a .zip.'
  )
  flags.DEFINE_string(
      'classes', None, 'Comma separated subset/order, e.g. COVID,Normal.'
  )
  flags.DEFINE_integer('seed', None, 'Split seed (default 0).')
  flags.DEFINE_integer('min_side', None, 'Skip smaller images (default 32).')


def _arguments() -> dict[str, Any]:
  """`api.prepare`'s keyword arguments from the flags."""
  from drpl_jax.data import api, images  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  return dict(
      data_dir=f.data_dir or api.default_data_dir(),
      manual_dir=f.manual_dir,
      classes=api.parse_classes(f.classes),
      seed=f.seed or 0,
      min_side=f.min_side or images.DEFAULT_MIN_SIDE,
  )


def _info(name: str) -> dict[str, Any]:
  from drpl_jax.data import api  # pylint: disable=g-import-not-at-top
  from drpl_jax.data.files import DataError  # pylint: disable=g-import-not-at-top

  args = _arguments()
  if api.builders().get(name) is None:
    raise DataError(f'unknown data set {name!r}; known: {list(api.builders())}')
  pattern = os.path.join(
      glob.escape(args['data_dir']), name, '*', '*', 'summary.json'
  )
  paths = sorted(glob.glob(pattern))
  if any(flags.FLAGS[k].value is not None for k in SELECTING):
    wanted = api.prepared_dir(name, **args)
    paths = [p for p in paths if os.path.dirname(p) == wanted]
    if not paths:
      raise DataError(
          f'{name} is not prepared in {wanted}; run '
          '`python -m drpl_jax.data prepare` with the same '
          'arguments'
      )
  prepared = []
  for path in paths:
    with open(path) as f:
      prepared.append(json.load(f))
  return {'name': name, 'data_dir': args['data_dir'], 'prepared': prepared}


def _main(argv: Sequence[str]) -> None:
  from drpl_jax.data import api  # pylint: disable=g-import-not-at-top

  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise cli.UserError(
        f'expected one command, one of {list(COMMANDS)}; '
        f'got {list(argv[1:])}'
    )
  name = flags.FLAGS.name
  result = (
      api.prepare(name, **_arguments()) if argv[1] == 'prepare' else _info(name)
  )
  print(json.dumps(result, indent=1))


def main() -> None:
  """The command line (`python -m drpl_jax.data`, the `drpl-data` script)."""
  from drpl_jax.data.files import DataError  # pylint: disable=g-import-not-at-top

  _define_flags()
  cli.run(_main, user_errors=(cli.UserError, DataError))


if __name__ == '__main__':
  main()
