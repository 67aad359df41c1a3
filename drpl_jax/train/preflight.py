"""Checks a command runs on its config before any work starts.

Each check either fixes what can be inferred (the class count from the data
set) or raises a one-line `UserError` (a ValueError) that names the
flag, file or value to change. The CLI
entry points call them right after parsing their flags.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import ml_collections
from absl import logging
from etils import epath

from drpl_jax.utils.errors import UserError


def explicit_overrides(argv: Iterable[str]) -> set[str]:
  """The keys set by `--config.KEY=VALUE` (or `--config.KEY VALUE`) flags."""
  return {
      a[len('--config.') :].partition('=')[0]
      for a in argv
      if a.startswith('--config.')
  }


def check_teacher(config: ml_collections.ConfigDict) -> None:
  """A distilled model with a distillation loss but no teacher: one line
  saying which flags to add (before data is prepared or a model built)."""
  kind = config.get('distill', {}).get('kind', 'none')
  teacher = config.get('teacher', {})
  checkpoint = teacher.get('checkpoint')
  if (
      checkpoint
      and teacher.get('arch')
      and not epath.Path(checkpoint).is_file()
  ):
    raise UserError(
        f'config.teacher.checkpoint={checkpoint!r}: no such file (python -m '
        'drpl_jax.train_teacher makes one)'
    )
  if (
      kind == 'none'
      or not config.model.get('distilled', False)
      or teacher.get('arch')
      or teacher.get('soft_labels')
  ):
    return
  raise UserError(
      f'config.distill.kind={kind!r} needs a teacher: add '
      '--config.teacher.arch=resnet50 --config.teacher.checkpoint=FILE '
      '(online; python -m drpl_jax.train_teacher makes one), or '
      '--config.teacher.soft_labels=FILE.npz, or --config.distill.kind=none'
  )


def infer_num_classes(
    config: ml_collections.ConfigDict,
    class_names: Sequence[str],
    explicit: set[str],
) -> None:
  """Sets config.model.num_classes from the data set's classes.

  `explicit`: the overridden keys (`explicit_overrides(argv)`); a
  num_classes set there that contradicts the data set is an error naming
  the flag, otherwise the count follows the data (e.g. after
  --config.data.classes=COVID,Normal).
  """
  configured = int(config.model.num_classes)
  if configured == len(class_names):
    return
  if 'model.num_classes' in explicit:
    raise UserError(
        f'--config.model.num_classes={configured} contradicts the data set '
        f'{config.data.name}, which has {len(class_names)} classes '
        f"{list(class_names)}; leave the flag out to use the data's count"
    )
  logging.info(
      'config.model.num_classes: %d from the data set (%s), not '
      "the config's %d",
      len(class_names),
      ','.join(class_names),
      configured,
  )
  config.model.num_classes = len(class_names)


def check_teacher_arch(arch: str, checkpoint: str) -> None:
  """Refuses a teacher checkpoint whose record (the `.json` train_teacher
  writes beside it) names another architecture, in one line."""
  record = epath.Path(checkpoint).with_suffix('.json')
  try:
    recorded = json.loads(record.read_text()).get('arch')
  except (OSError, ValueError, AttributeError):
    return  # no readable record: the converter's shape check decides
  if recorded and recorded != arch:
    raise UserError(
        f'{checkpoint} holds a {recorded} (per {record}), not {arch}: set '
        f'--config.teacher.arch={recorded}'
    )
