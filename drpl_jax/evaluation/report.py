"""Writes an evaluation report: report.json, report.md and PNG plots.

`write_report` takes the dict built by `metrics.classification_metrics`
(plus whatever the evaluator adds: per-head sub-reports under `heads`, a
`temperature` entry, checkpoint step, config hash...) and the predictions it
was computed from, and writes into `out_dir`:

  report.json            the dict as given (NaN/inf become null), atomically
  report.md              Markdown tables for a human reader
  confusion_matrix.png   counts and row-normalised matrix
  roc.png                one-vs-rest ROC curve per class with its AUC
  pr.png                 precision-recall curve per class with its AP
  reliability.png        reliability diagram with the ECE

`out_dir` may be any path `etils.epath` understands (local or gs://). Every
file is written to a temporary name first and then renamed, so a reader
never sees a half-written report. matplotlib (Agg, no pyplot state) is
imported only when the plots are drawn.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np

from drpl_jax.evaluation import metrics
from drpl_jax.evaluation import probes
from drpl_jax.utils import files

# Bai et al., "DRPL-ViT ...", Laser Journal 2024, 45(2): reported, not
# reproduced; the paper publishes no code and no split.
PAPER_CITATION = 'Bai et al., Laser Journal 2024, 45(2)'
PAPER_AVERAGE_ACCURACY = 0.9211
PAPER_COVID_ACCURACY = 0.9785
# The paper's four classes (the Kaggle database's folder names).
PAPER_CLASSES = ('COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia')

# The classification metrics of every report, the online teacher's entry
# (evaluate.teacher_report) included: what the reproduction table reads.
CLASSIFICATION_KEYS = (
    'accuracy',
    'balanced_accuracy',
    'num_examples',
    'class_names',
    'per_class',
    'macro',
    'confusion_matrix',
    'ci95',
)
_METRIC_KEYS = frozenset(
    (
        *CLASSIFICATION_KEYS,
        'weighted',
        'ece',
        'ece_bins',
        'nll',
        'heads',
        'temperature',
        'probes',
        'attention',
        'teacher',
    )
)
# The axis labels, title and legend corner of the one-vs-rest curves.
_CURVE_TEXT = {
    'roc': (
        'False positive rate',
        'True positive rate (sensitivity)',
        'ROC, one vs rest',
        'lower right',
    ),
    'pr': (
        'Recall (sensitivity)',
        'Precision (PPV)',
        'Precision-recall, one vs rest',
        'lower left',
    ),
}
_PLOT_DPI = 110


def _jsonable(obj: Any, where: str = 'report') -> Any:
  """A copy of `obj` that `json.dumps(allow_nan=False)` accepts."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v, f'{where}[{k!r}]') for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [_jsonable(v, f'{where}[{i}]') for i, v in enumerate(obj)]
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if obj is None or isinstance(obj, (bool, int, str)):
    return obj
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(
      f'{where} has a {type(obj).__name__} value that cannot be '
      'written to report.json'
  )


# ------------------------------------------------------------------ Markdown


def _pct(x: Any) -> str:
  return '—' if x is None else f'{100 * x:.2f}%'


def _num(x: Any, digits: int = 3) -> str:
  return '—' if x is None else f'{x:.{digits}f}'


def _ci(pair: Any) -> str:
  return '—' if not pair else f'[{100 * pair[0]:.2f}, {100 * pair[1]:.2f}]'


def _with_ci(x: Any, pair: Any) -> str:
  return _pct(x) if x is None or not pair else f'{_pct(x)} {_ci(pair)}'


def _cell(x: Any) -> str:
  return str(x).replace('|', '\\|').replace('\n', ' ')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = [
      '| ' + ' | '.join(_cell(h) for h in header) + ' |',
      '|' + '|'.join('---' for _ in header) + '|',
  ]
  lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
  return lines + ['']


def _summary(m: Mapping[str, Any]) -> list[str]:
  """Overall metrics with their bootstrap intervals."""
  ci = m.get('ci95') or {}
  macro, weighted = m.get('macro') or {}, m.get('weighted') or {}
  rows = [
      ('Accuracy', _pct(m.get('accuracy')), _ci(ci.get('accuracy'))),
      ('Balanced accuracy', _pct(m.get('balanced_accuracy')), ''),
      ('Macro F1', _pct(macro.get('f1')), ''),
      ('Weighted F1', _pct(weighted.get('f1')), ''),
      ('Macro ROC-AUC (one-vs-rest)', _num(macro.get('auc')), ''),
      ('Macro PR-AUC', _num(macro.get('pr_auc')), ''),
      (f'ECE ({m.get("ece_bins", 15)} bins, top-1)', _num(m.get('ece'), 4), ''),
      ('NLL', _num(m.get('nll'), 4), ''),
      ('Examples', m.get('num_examples', '—'), ''),
  ]
  lines = ['## Overall', ''] + _table(('Metric', 'Value', '95% CI'), rows)
  if ci.get('n_bootstrap'):
    unit = 'patients' if ci.get('resampling') == 'patient' else 'images'
    lines += [
        f'95% CIs: percentile bootstrap over {ci["n_bootstrap"]} '
        f'resamples of {unit} (seed {ci.get("seed")}), in %.',
        '',
    ]
  return lines


def _per_class(m: Mapping[str, Any]) -> list[str]:
  """One row per class, then the macro and weighted averages."""
  ci = (m.get('ci95') or {}).get('per_class') or {}
  rows = []
  for name, v in m['per_class'].items():
    c = ci.get(name) or {}
    rows.append(
        (
            name,
            v.get('support'),
            _with_ci(v.get('sensitivity'), c.get('sensitivity')),
            _with_ci(v.get('specificity'), c.get('specificity')),
            _pct(v.get('ppv')),
            _pct(v.get('npv')),
            _pct(v.get('f1')),
            _num(v.get('auc')),
            _num(v.get('pr_auc')),
        )
    )
  for label, key in (
      ('Macro average', 'macro'),
      ('Weighted average', 'weighted'),
  ):
    v = m.get(key) or {}
    rows.append(
        (
            f'*{label}*',
            '',
            _pct(v.get('sensitivity')),
            _pct(v.get('specificity')),
            _pct(v.get('ppv')),
            _pct(v.get('npv')),
            _pct(v.get('f1')),
            _num(v.get('auc')),
            _num(v.get('pr_auc')),
        )
    )
  header = (
      'Class',
      'Support',
      'Sensitivity [95% CI]',
      'Specificity [95% CI]',
      'PPV',
      'NPV',
      'F1',
      'ROC-AUC',
      'PR-AUC',
  )
  return ['## Per class', ''] + _table(header, rows)


def _confusion(m: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  rows = [(names[i], *row) for i, row in enumerate(m['confusion_matrix'])]
  return [
      '## Confusion matrix (rows: true class, columns: predicted)',
      '',
  ] + _table(('True \\ Predicted', *names), rows)


def _heads(heads: Mapping[str, Mapping[str, Any]]) -> list[str]:
  rows = []
  for head, h in heads.items():
    macro = h.get('macro') or {}
    acc_ci = (h.get('ci95') or {}).get('accuracy')
    rows.append(
        (
            head,
            _pct(h.get('accuracy')),
            _ci(acc_ci),
            _pct(h.get('balanced_accuracy')),
            _pct(macro.get('f1')),
            _num(macro.get('auc')),
            _num(h.get('ece'), 4),
            _num(h.get('nll'), 4),
        )
    )
  header = (
      'Head',
      'Accuracy',
      '95% CI',
      'Balanced accuracy',
      'Macro F1',
      'Macro ROC-AUC',
      'ECE',
      'NLL',
  )
  return [
      '## Heads',
      '',
      'cls: class-token head; dist: distillation head; '
      'mean: their average (what the model predicts).',
      '',
  ] + _table(header, rows)


def _temperature(t: Mapping[str, Any]) -> list[str]:
  row = (
      _num(t.get('value')),
      _num(t.get('ece_before'), 4),
      _num(t.get('ece_after'), 4),
      t.get('fitted_on', '—'),
  )
  return ['## Temperature scaling', ''] + _table(
      ('Temperature', 'ECE before', 'ECE after', 'Fitted on'), [row]
  )


def _teacher(t: Mapping[str, Any]) -> list[str]:
  """The online teacher on the same images (its own row, for comparison)."""
  ci = t.get('ci95') or {}
  row = (
      t.get('description', '—'),
      _with_ci(t.get('accuracy'), ci.get('accuracy')),
      _pct(t.get('balanced_accuracy')),
      _num(t.get('auc')),
      _cell(t.get('num_examples')),
  )
  return ['## Teacher on the same images', ''] + _table(
      ('Teacher', 'Accuracy', 'Balanced accuracy', 'AUC (macro)', 'Images'),
      [row],
  )


def covid_class(class_names: Sequence[str]) -> str | None:
  """The COVID-19 class name (the first containing 'covid'), if any."""
  return next((n for n in class_names if 'covid' in n.lower()), None)


def _paper(m: Mapping[str, Any], names: Sequence[str]) -> list[str]:
  """The paper's reported figures beside ours."""
  covid = covid_class(names)
  ours_covid = (
      _pct(m['per_class'][covid].get('sensitivity'))
      if covid
      else 'no COVID-19 class'
  )
  rows = [
      (
          'Average accuracy (4 classes)',
          _pct(PAPER_AVERAGE_ACCURACY),
          f'{_pct(m.get("accuracy"))} (balanced '
          f'{_pct(m.get("balanced_accuracy"))})',
      ),
      (
          'COVID-19 accuracy',
          _pct(PAPER_COVID_ACCURACY),
          f'{ours_covid} (sensitivity)',
      ),
  ]
  return (
      ['## Paper reference', '']
      + _table(
          (
              'Metric',
              f'{PAPER_CITATION} (reported, not reproduced)',
              'This run',
          ),
          rows,
      )
      + [
          "The paper's figures are quoted as published; it releases no "
          'code and no split, so they are not reproduced here. It does not '
          "define its per-class accuracy; we show the class's "
          'sensitivity.',
          '',
      ]
  )


def _flatten(obj: Mapping[str, Any], prefix: str = '') -> list[tuple]:
  rows = []
  for k, v in obj.items():
    if isinstance(v, Mapping):
      rows += _flatten(v, f'{prefix}{k}.')
    elif v is None or isinstance(v, (bool, int, float, str, np.generic)):
      rows.append((f'{prefix}{k}', v))
  return rows


def render_markdown(
    report: Mapping[str, Any], *, title: str, paper_reference: bool = False
) -> str:
  """The human-readable report.md for a metrics dict (see module doc)."""
  m = _main_metrics(report)
  names = list(m['class_names'])
  lines = [f'# {title}', '']
  lines += _summary(m) + _per_class(m) + _confusion(m, names)
  if report.get('heads'):
    lines += _heads(report['heads'])
  if report.get('temperature'):
    lines += _temperature(report['temperature'])
  if report.get('teacher'):
    lines += _teacher(report['teacher'])
  lines += probes.markdown(report)  # shortcut probes, attention in the box
  if paper_reference:
    lines += _paper(m, names)
  extra = {k: v for k, v in report.items() if k not in _METRIC_KEYS}
  run_rows = _flatten(extra)
  if run_rows:
    lines += ['## Run', ''] + _table(('Key', 'Value'), run_rows)
  lines += ['## Plots', '']
  for name, caption in (
      ('confusion_matrix', 'Confusion matrix'),
      ('roc', 'ROC curves'),
      ('pr', 'Precision-recall'),
      ('reliability', 'Reliability diagram'),
  ):
    lines.append(f'![{caption}]({name}.png)')
  return '\n'.join(lines) + '\n'


def _main_metrics(report: Mapping[str, Any]) -> Mapping[str, Any]:
  """The metrics dict to render: the top level, or else heads['mean']."""
  if 'per_class' in report:
    m = report
  else:
    m = (report.get('heads') or {}).get('mean')
  required = ('class_names', 'per_class', 'confusion_matrix', 'accuracy')
  missing = [k for k in required if m is None or k not in m]
  if missing:
    raise ValueError(
        f'report lacks metrics keys {missing}: pass the dict of '
        'metrics.classification_metrics (or one with '
        "heads['mean'])"
    )
  return m


# --------------------------------------------------------------------- plots


def _new_figure(width: float, height: float, **kwargs):
  # pylint: disable=g-import-not-at-top
  from matplotlib import figure
  from matplotlib.backends import backend_agg
  # pylint: enable=g-import-not-at-top
  fig = figure.Figure(figsize=(width, height), **kwargs)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=_PLOT_DPI)
  return buf.getvalue()


def _matrix_panel(ax, values, annotations, names, title, vmax) -> None:
  ax.imshow(values, cmap='Blues', vmin=0, vmax=vmax)
  n = len(names)
  for i in range(n):
    for j in range(n):
      dark = vmax and values[i, j] > 0.6 * vmax
      ax.text(
          j,
          i,
          annotations[i][j],
          ha='center',
          va='center',
          color='white' if dark else 'black',
          fontsize=9,
      )
  ax.set_xticks(range(n), names, rotation=30, ha='right')
  ax.set_yticks(range(n), names)
  ax.set_xlabel('Predicted')
  ax.set_ylabel('True')
  ax.set_title(title)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str]):
  """Two panels: counts, and rows normalised to the true-class support."""
  cm = np.asarray(cm)
  support = cm.sum(axis=1, keepdims=True)
  norm = cm / np.where(support > 0, support, 1)
  fig = _new_figure(11, 4.8, layout='constrained')
  ax1, ax2 = fig.subplots(1, 2)
  counts = [[str(v) for v in row] for row in cm]
  _matrix_panel(ax1, cm, counts, class_names, 'Counts', max(cm.max(), 1))
  fractions = [
      [f'{v:.2f}' if s else '—' for v in row]
      for row, s in zip(norm, support[:, 0])
  ]
  _matrix_panel(
      ax2, norm, fractions, class_names, 'Row-normalised (recall)', 1.0
  )
  return fig


def _scored_classes(
    ax,
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    score,
    what: str,
) -> Iterator[tuple[int, str, np.ndarray, float]]:
  """(class, name, one-vs-rest truth, score) of each class whose `score`
  (e.g. metrics.roc_auc) is defined; an undefined one only gets a legend
  entry saying so."""
  for c, name in enumerate(class_names):
    truth = labels == c
    value = score(probs[:, c], truth)
    if value is None:
      ax.plot([], [], label=f'{name} ({what} undefined)')
      continue
    yield c, name, truth, value


def plot_roc(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]):
  """One-vs-rest ROC curve of every class, AUC in the legend."""
  fig = _new_figure(6, 5.5, layout='constrained')
  ax = fig.subplots()
  for c, name, truth, auc in _scored_classes(
      ax, probs, labels, class_names, metrics.roc_auc, 'AUC'
  ):
    fpr, tpr, _ = metrics.roc_curve(probs[:, c], truth)
    ax.plot(fpr, tpr, label=f'{name} (AUC {auc:.3f})')
  ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1)
  _finish_curve_axes(ax, 'roc')
  return fig


def plot_pr(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]):
  """Precision-recall curve of every class, average precision in the
  legend; dotted lines mark each class's prevalence (a random classifier)."""
  fig = _new_figure(6, 5.5, layout='constrained')
  ax = fig.subplots()
  for c, name, truth, ap in _scored_classes(
      ax, probs, labels, class_names, metrics.average_precision, 'AP'
  ):
    precision, recall, _ = metrics.pr_curve(probs[:, c], truth)
    (line,) = ax.step(
        recall, precision, where='pre', label=f'{name} (AP {ap:.3f})'
    )
    ax.axhline(np.mean(truth), ls=':', lw=1, color=line.get_color())
  _finish_curve_axes(ax, 'pr')
  return fig


def _finish_curve_axes(ax, kind: str) -> None:
  """The unit square (a little headroom at 1), the labels and title of
  `kind` ('roc' or 'pr') and a small legend of the curves drawn."""
  xlabel, ylabel, title, legend_loc = _CURVE_TEXT[kind]
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
  ax.legend(loc=legend_loc, fontsize=8)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15):
  """Reliability diagram (accuracy per confidence bin) over a histogram of
  the confidences, with the ECE in the title."""
  curve = metrics.reliability_curve(probs, labels, n_bins)
  ece = metrics.expected_calibration_error(probs, labels, n_bins)
  edges, count = curve['edges'], curve['count']
  left, width = edges[:-1], np.diff(edges)
  filled = count > 0
  fig = _new_figure(6, 6.5, layout='constrained')
  ax, hist = fig.subplots(
      2, 1, sharex=True, gridspec_kw={'height_ratios': (3, 1)}
  )
  ax.bar(
      left[filled],
      curve['accuracy'][filled],
      width=width[filled],
      align='edge',
      edgecolor='black',
      color='tab:blue',
      label='Accuracy',
  )
  ax.bar(
      left[filled],
      (curve['confidence'] - curve['accuracy'])[filled],
      bottom=curve['accuracy'][filled],
      width=width[filled],
      align='edge',
      color='tab:red',
      alpha=0.35,
      hatch='//',
      edgecolor='darkred',
      label='Gap to mean confidence',
  )
  ax.plot(
      [0, 1], [0, 1], ls='--', color='grey', lw=1, label='Perfect calibration'
  )
  ax.set(
      xlim=(0, 1),
      ylim=(0, 1),
      ylabel='Accuracy',
      title=f'Reliability (top-1), ECE {ece:.4f} ({n_bins} bins)',
  )
  ax.legend(loc='upper left', fontsize=8)
  hist.bar(
      left, count, width=width, align='edge', color='grey', edgecolor='black'
  )
  hist.set(xlabel='Confidence (top-1 probability)', ylabel='Examples')
  return fig


# -------------------------------------------------------------------- writer


def write_report(
    out_dir: str | os.PathLike[str],
    report: Mapping[str, Any],
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    title: str,
    paper_reference: bool = False,
) -> dict[str, str]:
  """Writes report.json, report.md and the PNG plots into `out_dir`.

  Args:
    out_dir: folder to write (created if needed).
    report: the metrics dict (`metrics.classification_metrics`), possibly
      with extra keys, per-head sub-reports under `heads` and a
      `temperature` {value, ece_before, ece_after} entry.
    probs: class probabilities [N, C] the report was computed from.
    labels: true class ids [N].
    class_names: the C class names.
    title: heading of report.md.
    paper_reference: add the paper's reported figures beside ours.

  Returns:
    Paths of the written files, keyed 'json', 'markdown',
    'confusion_matrix', 'roc', 'pr' and 'reliability'.
  """
  names = [str(n) for n in class_names]
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] != len(names):
    raise ValueError(
        f'probs must have shape [N, {len(names)}] for class '
        f'names {names}, got {probs.shape}'
    )
  labels = np.asarray(labels)
  cm = metrics.confusion_matrix(labels, probs.argmax(axis=1), len(names))
  main = _main_metrics(report)
  if list(main['class_names']) != names:
    raise ValueError(
        f'report class_names {list(main["class_names"])} differ '
        f'from class_names {names}'
    )
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  text = json.dumps(_jsonable(report), indent=2, allow_nan=False)
  paths = {
      'json': files.atomic_write(out / 'report.json', (text + '\n').encode()),
      'markdown': files.atomic_write(
          out / 'report.md',
          render_markdown(
              report, title=title, paper_reference=paper_reference
          ).encode(),
      ),
  }
  figures = {
      'confusion_matrix': lambda: plot_confusion_matrix(cm, names),
      'roc': lambda: plot_roc(probs, labels, names),
      'pr': lambda: plot_pr(probs, labels, names),
      'reliability': lambda: plot_reliability(
          probs, labels, int(main.get('ece_bins', 15))
      ),
  }
  for name, draw in figures.items():
    paths[name] = files.atomic_write(out / f'{name}.png', _png(draw()))
  return paths
