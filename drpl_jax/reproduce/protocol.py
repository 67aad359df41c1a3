r"""The paper's protocol and the sample ablation: settings and bookkeeping.

`launch/reproduce_paper.sh` runs the steps; this module decides everything
they need, so the settings live in one place and are tested:

  python -m drpl_jax.reproduce settings --mode sample [--smoke] [--seeds N]
  python -m drpl_jax.reproduce args run|teacher|prepare --workdir W \
      --mode sample [--preset deit --seed 1]  # one argument per line
  python -m drpl_jax.reproduce runs --workdir W --mode sample
  python -m drpl_jax.reproduce table --workdir W [--out FILE.md]

(the command line is drpl_jax/reproduce/cli.py, the table
drpl_jax/reproduce/table.py).

Modes (`get_settings`): `paper` (4 classes, DeiT-S at 224 px, the config's
full recipe, a ResNet-50 teacher, 1 seed), `sample` (COVID vs Normal on the
600-image sample, micro at 64 px with patch 8, 600 steps, a RegNetY-400MF
teacher at 64 px, 3 seeds), `cxr2k5` (the same on the 2,579-image set in
../shared/data/covid19_radiography_2k5 with 1,200 steps and a 30-epoch
teacher, sized for two hours on 2 cores), and `--smoke` (any of them at toy
size: two presets, one seed, 32 px, 4 steps; what CI runs). Under WORKDIR:
`reproduce.json` (the plan; a rerun with other settings is refused), `data/`,
`teacher/<arch>.safetensors`, `runs/<preset>/seed<k>/` (a drpl_jax.main
workdir each; report in `eval/test/report.json`), `timings/<step>.json`
and `results.md`. Paths may be `gs://...` (etils.epath).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from drpl_jax.utils import files

PRESETS = ('vit', 'deit', 'deit_rpe', 'deit_conv', 'drpl')
MODES = ('paper', 'sample', 'cxr2k5')
# The repository root: drpl_jax/reproduce/protocol.py is three levels down.
REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
CONFIG_FILE = 'configs/drpl_vit.py'
DEFAULT_SAMPLE_DIR = os.path.normpath(
    os.path.join(REPO, '..', 'shared', 'data', 'covid19_radiography_sample')
)
DEFAULT_2K5_DIR = os.path.normpath(
    os.path.join(REPO, '..', 'shared', 'data', 'covid19_radiography_2k5')
)
DEFAULT_DATA = {'sample': DEFAULT_SAMPLE_DIR, 'cxr2k5': DEFAULT_2K5_DIR}
UNDISTILLED = ('vit',)  # presets without a distillation token
# Keys a preset sets through configs/drpl_vit.py (everything else is shared).
PRESET_KEYS = (
    'model.distilled',
    'model.rpe.kind',
    'model.conv.kind',
    'distill.kind',
    'teacher.arch',
    'teacher.checkpoint',
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """One reproduction: the same data, budget and seeds for every preset.

  `student` holds config overrides (key -> value) applied on top of
  `configs/drpl_vit.py:variant=...,preset=...[,runlocal]`; `teacher` the
  `train_teacher` flags. Only the preset and, for the distilled presets,
  the teacher path differ between the runs of one reproduction.
  """

  mode: str
  smoke: bool
  presets: tuple[str, ...]
  seeds: tuple[int, ...]
  variant: str
  runlocal: bool
  classes: str  # data.classes; '' = all four
  num_classes: int
  image_size: int
  patch_size: int
  student: dict[str, Any]
  teacher_arch: str
  teacher: dict[str, Any]

  def describe(self) -> str:
    grid = self.image_size // self.patch_size
    return (
        f'{self.mode}{" smoke" if self.smoke else ""}: {self.variant} '
        f'variant, {self.image_size} px (patch {self.patch_size}, '
        f'{grid}x{grid} grid), {self.student["total_steps"]} steps at '
        f'batch {self.student["batch_size"]}, seeds '
        f'{", ".join(map(str, self.seeds))}; teacher '
        f'{self.teacher_arch} at {self.teacher["image_size"]} px, '
        f'{self.teacher["epochs"]} epoch(s), online hard distillation'
    )


# The settings of every mode side by side, one column each (MODE_COLUMNS):
#   paper: the config's full recipe, written out so it is recorded in the
#     plan;
#   sample: configs/drpl_vit.py's runlocal recipe (micro, 64 px, patch 8,
#     batch 32, no mixup, mild crops); sized in docs/reproduction.md;
#   cxr2k5: the sample mode on the 2,579 images, 1,200 steps (see below);
#   smoke: `--smoke`, any mode at toy size. In that column OF_MODE keeps the
#     value of the mode being shrunk.
# A student or teacher key whose value is None is not set in that column.
#
# cxr2k5: the ablation on the 2,579-image set (COVID 1,279, Normal 1,300;
# 80/10/10 split: about 2,063 training images), sized to finish inside two
# hours on 2 cores with one teacher shared by all 15 runs. The first sizing
# (1,800 steps, estimated at 83 min from the sample's step times) took 3 h 43
# min with other work sharing the cores; measured alone on the 2 cores
# (docs/reproduction.md), the teacher's 30 epochs take 10 min (20 s each)
# and a run costs its steps plus about 40 s (compilation, test evaluation,
# shortcut probes, attention summary). At 1,200 steps (19 epochs; the sample
# ran 40): vit 2.4 min per run, deit/deit_rpe 3.8-4.2, deit_conv/drpl
# 4.6-5.2, so 20 min per seed and one hour for 3 seeds: 71 min in all as
# measured; the rest is margin for a slower machine. A shorter schedule than the
# small-data recipe (configs/small_data.py) at the sample's 64 px, so that
# the table can be rerun in one sitting. Everything else (model, data,
# teacher) is the sample mode's.
MODE_COLUMNS = ('paper', 'sample', 'cxr2k5', 'smoke')
OF_MODE = object()
_REGNET = 'regnet_y_400mf'
_COVID_NORMAL = 'COVID,Normal'
# Settings field: (paper, sample, cxr2k5, smoke).
_FIELDS: dict[str, tuple[Any, ...]] = {
    'presets': (PRESETS, PRESETS, PRESETS, ('vit', 'drpl')),
    'seeds': (1, 3, 3, 1),
    'variant': ('s', 'micro', 'micro', 'micro'),
    'runlocal': (False, True, True, True),
    'classes': ('', _COVID_NORMAL, _COVID_NORMAL, OF_MODE),
    'num_classes': (4, 2, 2, OF_MODE),
    'image_size': (224, 64, 64, 32),
    'patch_size': (16, 8, 8, 8),
    'teacher_arch': ('resnet50', _REGNET, _REGNET, _REGNET),
}
# Settings.student (config overrides): (paper, sample, cxr2k5, smoke).
_STUDENT: dict[str, tuple[Any, ...]] = {
    'total_steps': (30_000, 600, 1200, 4),
    'batch_size': (256, 32, 32, 16),
    'eval_batch_size': (None, 64, 64, 32),
    'optim.base_lr': (5e-4, None, None, None),
    'optim.warmup_steps': (1000, 30, 60, 1),
    'eval_every_steps': (1000, 600, 1200, 4),
    'checkpoint_every_steps': (1000, 200, 600, 2),
    'log_every_steps': (None, 50, 100, 2),
}
# Settings.teacher (train_teacher flags): (paper, sample, cxr2k5, smoke).
_TEACHER: dict[str, tuple[Any, ...]] = {
    'epochs': (20, 30, 30, 1),
    'batch_size': (64, 32, 32, 16),
    'lr': (5e-4, 1e-3, 1e-3, 1e-3),
    'image_size': (224, 64, 64, 32),
    'max_steps_per_epoch': (None, None, None, 2),
}


def _column(
    table: Mapping[str, tuple[Any, ...]], column: str, mode: str
) -> dict[str, Any]:
  """One column of a settings table: its keys that are set, in table order,
  OF_MODE replaced by the value in the column of `mode`."""
  at, of_mode = MODE_COLUMNS.index(column), MODE_COLUMNS.index(mode)
  values = {key: row[at] for key, row in table.items() if row[at] is not None}
  return {
      key: table[key][of_mode] if value is OF_MODE else value
      for key, value in values.items()
  }


def get_settings(
    mode: str, *, smoke: bool = False, num_seeds: int | None = None
) -> Settings:
  """The settings of `mode` (see MODES), optionally at toy size.

  `num_seeds` overrides the mode's seed count (seeds are 0..n-1).
  """
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} is not one of {list(MODES)}')
  column = 'smoke' if smoke else mode
  values = _column(_FIELDS, column, mode)
  values['student'] = _column(_STUDENT, column, mode)
  values['teacher'] = _column(_TEACHER, column, mode)
  n = values.pop('seeds')
  n = n if num_seeds is None else num_seeds
  if n < 1:
    raise ValueError(f'the number of seeds must be >= 1, got {n}')
  image_size, patch = values['image_size'], values['patch_size']
  if image_size % patch:
    raise ValueError(
        f'image size {image_size} is not a multiple of the '
        f'patch size {patch}'
    )
  return Settings(mode=mode, smoke=smoke, seeds=tuple(range(n)), **values)


# Measured on this project's 2-core CPU machine with nothing else running
# (the cxr2k5 table, docs/reproduction.md: 1,200 steps at batch 32, micro at
# 64 px, patch 8; WORKDIR/timings/): seconds per step of each preset (the
# online teacher's forward included; mean over 3 seeds) after a fixed 40 s
# per run (compilation, test evaluation, shortcut probes, attention
# summary), and the teacher's seconds per training image and epoch at 64 px
# (RegNetY-400MF: 621 s for 30 epochs of 2,063 images).
MEASURED_STEP_SECONDS_64PX = {
    'vit': 0.086,
    'deit': 0.154,
    'deit_rpe': 0.176,
    'deit_conv': 0.198,
    'drpl': 0.226,
}
MEASURED_RUN_OVERHEAD_SECONDS = 40.0
MEASURED_TEACHER_IMAGE_EPOCH_SECONDS_64PX = 621.0 / (30 * 2063)
TRAIN_IMAGES = {'sample': 480, 'cxr2k5': 2063}  # 80% of 600 and of 2,579


def estimate_minutes(settings: Settings) -> dict[str, float]:
  """Wall-time estimate of a CPU mode on 2 cores, from the sample's times.

  Steps cost in proportion to the pixels per image (the token count) and
  not to the data set size; the teacher costs per image and epoch. Only for
  the micro variant at batch 32 (what was measured): {'teacher', 'runs',
  'total'} in minutes.
  """
  if settings.variant != 'micro' or settings.mode not in TRAIN_IMAGES:
    raise ValueError(
        f'no measured timing for the {settings.mode} mode '
        f'({settings.variant} variant)'
    )
  scale = (settings.image_size / 64) ** 2 * settings.student['batch_size'] / 32
  steps = settings.student['total_steps']
  runs = len(settings.seeds) * sum(
      MEASURED_RUN_OVERHEAD_SECONDS
      + steps * scale * MEASURED_STEP_SECONDS_64PX[p]
      for p in settings.presets
  )
  teacher = (
      TRAIN_IMAGES[settings.mode]
      * settings.teacher['epochs']
      * (settings.teacher['image_size'] / 64) ** 2
      * MEASURED_TEACHER_IMAGE_EPOCH_SECONDS_64PX
  )
  return {
      'teacher': teacher / 60,
      'runs': runs / 60,
      'total': (teacher + runs) / 60,
  }


# ------------------------------------------------------------------- paths


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where one reproduction reads and writes (see the module doc)."""

  workdir: str
  manual_dir: str
  data_dir: str
  teacher: str
  teacher_init: str

  def run_dir(self, preset: str, seed: int) -> str:
    return os.path.join(self.workdir, 'runs', preset, f'seed{seed}')

  def report(self, preset: str, seed: int) -> str:
    return os.path.join(self.run_dir(preset, seed), 'eval/test/report.json')

  def timing(self, step: str) -> str:
    return os.path.join(self.workdir, 'timings', f'{step}.json')

  def extra(self) -> dict[str, str]:
    return {
        'plan': os.path.join(self.workdir, 'reproduce.json'),
        'table': os.path.join(self.workdir, 'results.md'),
    }


def get_paths(
    settings: Settings,
    workdir: str,
    *,
    manual_dir: str = '',
    data_dir: str = '',
    teacher: str = '',
    teacher_init: str = '',
) -> Paths:
  """Resolves the defaults: data in WORKDIR/data, the teacher under it."""
  if not workdir:
    raise ValueError('empty --workdir')
  if not manual_dir:
    if settings.mode == 'paper':
      raise ValueError(
          'the paper mode needs --manual_dir: the Kaggle COVID-19 '
          'Radiography Database, downloaded by hand (the folder '
          'COVID-19_Radiography_Dataset, its parent, or the .zip)'
      )
    manual_dir = DEFAULT_DATA[settings.mode]
  if not manual_dir.startswith('gs://'):
    manual_dir = os.path.abspath(manual_dir)
  return Paths(
      workdir=workdir,
      manual_dir=manual_dir,
      data_dir=data_dir or os.path.join(workdir, 'data'),
      teacher=teacher
      or os.path.join(
          workdir, 'teacher', f'{settings.teacher_arch}.safetensors'
      ),
      teacher_init=teacher_init,
  )


# -------------------------------------------------------- command arguments


def config_arg(settings: Settings, preset: str) -> str:
  """The `--config` value (FILE:ARGS, relative to the repo root)."""
  if preset not in PRESETS:
    raise ValueError(f'preset {preset!r} is not one of {list(PRESETS)}')
  arg = f'{CONFIG_FILE}:variant={settings.variant},preset={preset}'
  return arg + (',runlocal' if settings.runlocal else '')


def _flag(key: str, value: Any) -> str:
  if isinstance(value, str) and '\n' in value:
    raise ValueError(f'{key}: a value with a newline: {value!r}')
  return f'--config.{key}={value}'


def data_overrides(settings: Settings, paths: Paths) -> dict[str, Any]:
  """The data keys every step shares (teacher and student alike)."""
  return {
      'data.name': 'covid19_radiography',
      'data.manual_dir': paths.manual_dir,
      'data.data_dir': paths.data_dir,
      'data.classes': settings.classes,
      'data.split_seed': 0,
      'data.image_size': settings.image_size,
      'model.num_classes': settings.num_classes,
  }


def run_overrides(
    settings: Settings, paths: Paths, preset: str, seed: int
) -> list[str]:
  """`--config.key=value` flags of one preset and seed for drpl_jax.main."""
  if seed not in settings.seeds:
    raise ValueError(f'seed {seed} is not one of {list(settings.seeds)}')
  config_arg(settings, preset)  # Checks the preset.
  values = {
      'seed': seed,
      **data_overrides(settings, paths),
      'model.patch_size': settings.patch_size,
      **settings.student,
  }
  if preset not in UNDISTILLED:
    values.update(
        {
            'teacher.arch': settings.teacher_arch,
            'teacher.checkpoint': paths.teacher,
            'teacher.image_size': settings.teacher['image_size'],
            'distill.kind': 'hard',
        }
    )
  return [_flag(k, v) for k, v in values.items()]


def teacher_args(settings: Settings, paths: Paths) -> list[str]:
  """Arguments of `python -m drpl_jax.train_teacher` (seed 0)."""
  args = [f'--config={config_arg(settings, "drpl")}']
  args += [_flag(k, v) for k, v in data_overrides(settings, paths).items()]
  args += ['--arch', settings.teacher_arch, '--out', paths.teacher]
  for key, value in settings.teacher.items():
    args += [f'--{key}', str(value)]
  if paths.teacher_init:
    args += ['--init', paths.teacher_init]
  return args


def prepare_args(settings: Settings, paths: Paths) -> list[str]:
  """Arguments of `python -m drpl_jax.data prepare`."""
  args = [
      'prepare',
      '--name',
      'covid19_radiography',
      '--manual_dir',
      paths.manual_dir,
      '--data_dir',
      paths.data_dir,
      '--seed',
      '0',
  ]
  return args + (['--classes', settings.classes] if settings.classes else [])


def prepared_summary(settings: Settings, paths: Paths) -> str:
  """The summary.json that exists once the data set is prepared."""
  from drpl_jax.data import api  # pylint: disable=g-import-not-at-top

  folder = api.prepared_dir(
      'covid19_radiography',
      data_dir=paths.data_dir,
      manual_dir=paths.manual_dir,
      classes=api.parse_classes(settings.classes),
      seed=0,
  )
  return os.path.join(folder, 'summary.json')


# ------------------------------------------------------ plan and timings


def read_json(path: str, what: str) -> Any:
  """JSON from `path`; errors name the file."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'{what} {path} does not exist')
  try:
    return json.loads(p.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'{what} {path} is unreadable: {e}') from e


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` (local or gs://), atomically."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(p, json.dumps(value, indent=1) + '\n')


def plan_dict(
    settings: Settings, paths: Paths, command: str, launcher: str
) -> dict[str, Any]:
  return {
      'settings': dataclasses.asdict(settings),
      'paths': dataclasses.asdict(paths),
      'launcher': launcher,
      'command': command,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'
      ),
  }


def check_plan(
    plan: Mapping[str, Any], old: Mapping[str, Any] | None, path: str
) -> bool:
  """Whether `plan` must be written; refuses one that changes the runs.

  The seeds may change (more seeds reuse the existing runs); anything else
  that shapes a run (mode, presets, budget, data) may not.
  """
  if old is None:
    return True
  plan = json.loads(json.dumps(plan))  # Tuples as the JSON file has them.
  new_s, old_s = plan['settings'], dict(old.get('settings', {}))
  changed = sorted(
      k
      for k in set(new_s) | set(old_s)
      if k != 'seeds' and new_s.get(k) != old_s.get(k)
  )
  for key in ('manual_dir', 'data_dir', 'teacher'):
    if plan['paths'][key] != old.get('paths', {}).get(key):
      changed.append(f'paths.{key}')
  if changed:
    raise ValueError(
        f'{path}: this WORKDIR was started with other settings '
        f'({", ".join(changed)} differ; it was: {old.get("command")}); use '
        'another WORKDIR, or delete the file to reuse the runs anyway'
    )
  return list(new_s['seeds']) != list(old_s['seeds'])


def record(
    path: str,
    step: str,
    command: Sequence[str],
    start: float,
    end: float,
    rc: int,
) -> dict[str, Any]:
  """Appends one attempt of `step` (times in epoch seconds) to its JSON."""
  p = epath.Path(path)
  entry = (
      json.loads(p.read_text())
      if p.exists()
      else {'step': step, 'attempts': []}
  )
  iso = lambda t: datetime.datetime.fromtimestamp(
      t, datetime.timezone.utc
  ).isoformat(timespec='seconds')
  entry['command'] = shlex.join(command)
  entry['attempts'].append(
      {
          'start': iso(start),
          'end': iso(end),
          'seconds': round(end - start, 1),
          'exit_code': rc,
          'host': socket.gethostname(),
          'cpus': os.cpu_count(),
      }
  )
  entry['seconds'] = round(sum(a['seconds'] for a in entry['attempts']), 1)
  write_json(path, entry)
  return entry


def run_step_name(preset: str, seed: int) -> str:
  return f'run-{preset}-seed{seed}'
