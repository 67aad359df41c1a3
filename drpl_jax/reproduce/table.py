"""The comparison table of a reproduction (launch/reproduce_paper.sh).

  python -m drpl_jax.reproduce table --workdir W [--out FILE.md]

Reads WORKDIR/reproduce.json (the plan), every run's eval/test/report.json
and WORKDIR/timings/, and writes one Markdown table: accuracy, COVID-19
sensitivity and specificity and macro F1 with 95% intervals, per run and
mean ± std over seeds, beside the paper's reported figures, with the
command, the wall time and the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from drpl_jax.evaluation import report as paper
from drpl_jax.reproduce.protocol import Paths, Settings, read_json
from drpl_jax.reproduce.protocol import run_step_name
from drpl_jax.utils import files

# The keys of an evaluation report (a run's, or its teacher's entry in it)
# that the table reads; a run's report must also count its examples.
EVAL_KEYS = (
    'accuracy',
    'class_names',
    'per_class',
    'macro',
    'confusion_matrix',
    'ci95',
)
REPORT_KEYS = (*EVAL_KEYS, 'num_examples')


def load_report(path: str) -> dict[str, Any]:
  """A run's report.json, checked for the keys the table reads."""
  report = read_json(path, 'report')
  missing = [
      k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report
  ]
  if missing:
    raise ValueError(
        f'report {path} lacks {missing}; is it a report.json '
        'of drpl_jax.evaluation.evaluate?'
    )
  return report


def macro_f1_interval(
    confusion: Sequence[Sequence[int]], n_bootstrap: int, seed: int
) -> list[float] | None:
  """Bootstrap 95% interval of the macro F1, resampling test images.

  report.json has no interval for the macro F1; the confusion matrix holds
  every (label, prediction) pair, so resampling its cells is resampling the
  images (as the report's own intervals do when there are no patient ids).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top

  cm = np.asarray(confusion, np.int64)
  num = cm.shape[0]
  if n_bootstrap <= 0 or cm.sum() == 0:
    return None
  labels = np.repeat(np.arange(num), cm.sum(axis=1))
  preds = np.concatenate([np.repeat(np.arange(num), row) for row in cm])
  cms = metrics.bootstrap_confusion_matrices(
      labels, preds, num, n_bootstrap=n_bootstrap, seed=seed
  )  # [R, C, C]
  tp = np.diagonal(cms, axis1=1, axis2=2)  # [R, C]
  denom = cms.sum(axis=2) + cms.sum(axis=1)  # 2tp + fn + fp
  f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
  defined = ~np.isnan(f1).all(axis=1)
  macro = np.nanmean(f1[defined], axis=1)
  lo, hi = np.percentile(macro, [2.5, 97.5])
  return [float(lo), float(hi)]


def summarise(report: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """The table's metrics of one report: {column: (value, [lo, hi] | None)}."""
  ci = report['ci95']
  covid = paper.covid_class(report['class_names'])
  rates = {
      k: (
          (
              report['per_class'][covid][k],
              ci.get('per_class', {}).get(covid, {}).get(k),
          )
          if covid
          else (None, None)
      )
      for k in ('sensitivity', 'specificity')
  }
  return {
      'accuracy': (report['accuracy'], ci.get('accuracy')),
      'covid_sensitivity': rates['sensitivity'],
      'covid_specificity': rates['specificity'],
      'macro_f1': (
          report['macro'].get('f1'),
          macro_f1_interval(
              report['confusion_matrix'],
              int(ci.get('n_bootstrap', 1000)),
              int(ci.get('seed', 0)),
          ),
      ),
  }


COLUMNS = {
    'accuracy': 'Accuracy',
    'covid_sensitivity': 'COVID-19 accuracy (= sensitivity)',
    'covid_specificity': 'COVID-19 specificity',
    'macro_f1': 'Macro F1',
}


def _pct(x: float | None) -> str:
  return '—' if x is None else f'{100 * x:.1f}'


def _cell(value: float | None, interval: Sequence[float] | None) -> str:
  if value is None or not interval:
    return _pct(value)
  return f'{_pct(value)} [{_pct(interval[0])}, {_pct(interval[1])}]'


def _mean_std(values: Sequence[float | None]) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top

  got = [v for v in values if v is not None]
  if len(got) < 2:
    return '—'
  return f'{100 * np.mean(got):.1f} ± {100 * np.std(got, ddof=1):.1f}'


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '—'
  minutes, secs = divmod(int(round(seconds)), 60)
  return f'{minutes}m {secs:02d}s' if minutes else f'{secs}s'


def machine() -> str:
  """This machine: host, CPUs, JAX devices (where the table is written)."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return (
      f'{socket.gethostname()}, {os.cpu_count()} CPUs, JAX '
      f'{jax.__version__}, {len(devices)} {jax.default_backend()} '
      f'device(s) ({", ".join(sorted({d.device_kind for d in devices}))})'
  )


def _row(cells: Sequence[str]) -> str:
  return '| ' + ' | '.join(cells) + ' |'


def _rows(
    settings: Settings,
    reports: Mapping[tuple[str, int], Any],
    seconds: Mapping[str, float],
) -> list[str]:
  head = ['Preset', 'Seed', *COLUMNS.values(), 'Step', 'Time']
  lines = [_row(head), '|' + '---|' * len(head)]
  for preset in settings.presets:
    summaries = [summarise(reports[preset, s]) for s in settings.seeds]
    for seed, summary in zip(settings.seeds, summaries):
      lines.append(
          _row(
              [preset, str(seed)]
              + [_cell(*summary[k]) for k in COLUMNS]
              + [
                  str(reports[preset, seed].get('checkpoint_step', '—')),
                  _duration(seconds.get(run_step_name(preset, seed))),
              ]
          )
      )
    if len(settings.seeds) > 1:
      lines.append(
          _row(
              [f'**{preset}**', f'mean ± std ({len(settings.seeds)})']
              + [_mean_std([s[k][0] for s in summaries]) for k in COLUMNS]
              + ['', '']
          )
      )
  teacher = teacher_report(reports)
  if teacher is not None:
    summary = summarise(teacher)
    lines.append(
        _row(
            [f'teacher ({settings.teacher_arch})', '—']
            + [_cell(*summary[k]) for k in COLUMNS]
            + ['—', _duration(seconds.get('teacher'))]
        )
    )
  lines.append(
      _row(
          [
              f'Paper ({paper.PAPER_CITATION}), reported',
              '—',
              f'{100 * paper.PAPER_AVERAGE_ACCURACY:.2f}',
              f'{100 * paper.PAPER_COVID_ACCURACY:.2f}',
          ]
          + ['—'] * 4
      )
  )
  return lines


def teacher_report(
    reports: Mapping[tuple[str, int], Any],
) -> dict[str, Any] | None:
  """The shared teacher's test report (from the first distilled run).

  Every distilled run evaluates the same teacher on the same test split;
  None when no report has a teacher entry with intervals (older reports).
  """
  for report in reports.values():
    t = report.get('teacher')
    if t and all(k in t for k in EVAL_KEYS):
      return t
  return None


def _notes(
    settings: Settings, paths: Paths, reports: Mapping[tuple[str, int], Any]
) -> list[str]:
  first = next(iter(reports.values()))
  names, ci = list(first['class_names']), first['ci95']
  lines = [
      f'Settings: {settings.describe()}. Every preset has the same data, '
      'split, steps, seeds and recipe; only the preset differs (the ViT '
      'baseline has no teacher). Evaluated once: the last checkpoint on the '
      f'test split ({first["num_examples"]} images: {", ".join(names)}).',
      '',
      'Values in %; brackets: percentile bootstrap 95% interval over test '
      f'{ci.get("resampling", "image")}s ({ci.get("n_bootstrap")} resamples, '
      'from report.json; the macro F1 one is bootstrapped here from the '
      'confusion matrix, by image). mean ± std: over seeds (sample std). '
      'COVID-19 accuracy is read as the COVID-19 sensitivity (recall); the '
      'paper does not define it.',
      '',
  ]
  if tuple(names) != paper.PAPER_CLASSES:
    lines += [
        f'**Not comparable with the paper:** its figures are 4-class '
        f'({", ".join(paper.PAPER_CLASSES)}); this run has {len(names)} '
        f'classes.',
        '',
    ]
  else:
    lines += [
        'Same four classes as the paper, but not its split (it '
        'publishes none) nor, necessarily, its recipe: read '
        'docs/reproduction.md before comparing.',
        '',
    ]
  if len(settings.presets) > 1:
    lines += [_spread(settings, reports), '']
  teacher = [r['teacher'] for r in reports.values() if r.get('teacher')]
  if teacher:
    meta = epath.Path(os.path.splitext(paths.teacher)[0] + '.json')
    val = (
        json.loads(meta.read_text())['validation']['accuracy']
        if meta.exists()
        else None
    )
    lines += [
        f'Teacher: {teacher[0]["description"]}; validation accuracy '
        f'{_pct(val)}, test accuracy {_pct(teacher[0]["accuracy"])}.',
        '',
    ]
  return lines


def _spread(settings: Settings, reports: Mapping[tuple[str, int], Any]) -> str:
  """The presets' spread in accuracy beside the width of one interval."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  means = [
      np.mean([reports[p, s]['accuracy'] for s in settings.seeds])
      for p in settings.presets
  ]
  widths = [
      r['ci95']['accuracy'][1] - r['ci95']['accuracy'][0]
      for r in reports.values()
      if r['ci95'].get('accuracy')
  ]
  width = f'{100 * np.median(widths):.1f}' if widths else '—'
  return (
      f"The presets' mean accuracies span {100 * np.ptp(means):.1f} "
      f'points; the 95% interval of one run is {width} points wide '
      '(median). All runs share one test set: a difference smaller than '
      'that width is no evidence that one preset is better.'
  )


def _run_lines(
    plan: Mapping[str, Any], steps: Sequence[str], timings: Mapping[str, Any]
) -> list[str]:
  seconds = {k: v['seconds'] for k, v in timings.items()}
  runs = sum(v for k, v in seconds.items() if k.startswith('run-'))
  hosts = sorted({a['host'] for t in timings.values() for a in t['attempts']})
  lines = [
      '## Run',
      '',
      f'- Command: `{plan.get("command")}` (launcher: '
      f'{plan.get("launcher")})',
      f'- Wall time: {_duration(sum(seconds.values()))} in all (prepare '
      f'{_duration(seconds.get("prepare"))}, teacher '
      f'{_duration(seconds.get("teacher"))}, {len(steps) - 2} '
      f'train+eval runs {_duration(runs)}), from WORKDIR/timings/ '
      '(every attempt of a step counts).',
  ]
  missing = [k for k in steps if k not in seconds]
  if missing:
    lines.append(
        f'- No timing for: {", ".join(missing)} (done outside '
        'this script, or given with --teacher).'
    )
  return lines + [
      f'- Steps launched from: {", ".join(hosts) or "?"}; '
      f'table written on: {machine()}.',
      '',
  ]


def settings_from_plan(plan: Mapping[str, Any]) -> Settings:
  s = dict(plan['settings'])
  s['presets'], s['seeds'] = tuple(s['presets']), tuple(s['seeds'])
  return Settings(**s)


def write_table(workdir: str, out: str = '') -> str:
  """Reads every run's report.json and writes the table; returns its path.

  The runs are those of WORKDIR/reproduce.json. A missing or unreadable
  report is an error naming the file.
  """
  plan = read_json(
      os.path.join(workdir, 'reproduce.json'),
      'plan (written by launch/reproduce_paper.sh)',
  )
  settings = settings_from_plan(plan)
  paths = dataclasses.replace(Paths(**plan['paths']), workdir=workdir)
  reports = {
      (p, s): load_report(paths.report(p, s))
      for p in settings.presets
      for s in settings.seeds
  }
  steps = ['prepare', 'teacher'] + [run_step_name(p, s) for p, s in reports]
  timings = {
      s: read_json(paths.timing(s), 'timing')
      for s in steps
      if epath.Path(paths.timing(s)).exists()
  }
  title = {
      'sample': 'DRPL-ViT ablation on the COVID-19 Radiography sample',
      'cxr2k5': 'DRPL-ViT ablation on 2,579 COVID-19 Radiography images',
  }.get(
      settings.mode,
      'DRPL-ViT on the COVID-19 Radiography Database (paper protocol)',
  )
  lines = [f'# {title}{" (smoke test)" if settings.smoke else ""}', '']
  lines += _rows(
      settings, reports, {k: v['seconds'] for k, v in timings.items()}
  ) + ['']
  lines += _notes(settings, paths, reports) + _run_lines(plan, steps, timings)
  out = out or paths.extra()['table']
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out, '\n'.join(lines))
  return out
