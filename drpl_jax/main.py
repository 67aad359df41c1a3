r"""Trains and evaluates DRPL-ViT.

  python -m drpl_jax.main --config=configs/demo.py --workdir=/tmp/drpl_demo
  python -m drpl_jax.main --config=configs/drpl_vit.py:variant=s,preset=drpl \
      --config.data.manual_dir=/data/covid --workdir=gs://bucket/run1

`--config.key=value` overrides any config key. A workdir that already holds
checkpoints is resumed from the latest one. At the end the test split is
evaluated and the report path printed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from drpl_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_WORKDIR = cli.define_workdir()
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for a multi-process run on a generic cluster; '
    'TPU pods and SLURM detect themselves (docs/scaling.md).',
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Total processes (generic clusters).'
)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..N-1 (generic clusters).'
)
flags.mark_flags_as_required(['config'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from drpl_jax.parallel import hostmem  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top

  preflight.check_teacher(_CONFIG.value)  # before any work
  hostmem.configure()  # before JAX starts its CPU client
  # Imported here so that --help is fast and flags parse before JAX starts.
  from drpl_jax.parallel import distributed  # pylint: disable=g-import-not-at-top

  distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  from drpl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import loop as train  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  try:  # a data set that is missing or contradicts the config
    preflight.infer_num_classes(
        config,
        data.ensure_prepared(config.data).class_names,
        preflight.explicit_overrides(sys.argv),
    )
  except ValueError as e:
    raise cli.UserError(str(e)) from e
  result = train.train_and_evaluate(config, workdir)
  if result.get('preempted'):
    logging.info(
        'Preempted at step %d; rerun the same command to resume.',
        result['step'],
    )
    # Launchers read the last stdout line of every run, preempted or not.
    print(
        json.dumps(
            {'step': result['step'], 'preempted': True, 'workdir': workdir}
        )
    )
    return
  report = evaluate.evaluate(config, workdir)
  path = os.path.join(workdir, 'eval', report['data']['split'], 'report.json')
  summary = {
      'step': result['step'],
      'test_accuracy': report['accuracy'],
      'test_balanced_accuracy': report['balanced_accuracy'],
      'num_test_examples': report['num_examples'],
      'chance_accuracy': 1 / len(report['class_names']),
      'teacher_test_accuracy': report.get('teacher', {}).get('accuracy'),
      'report': path,
  }
  logging.info('Done: %s', summary)
  print(json.dumps(summary))


def run() -> None:
  """The command line (the `drpl-train` console script); bad input exits 2
  with one `error:` line (drpl_jax/cli.py)."""
  cli.run(main)


if __name__ == '__main__':
  run()
