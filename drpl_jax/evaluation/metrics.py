"""Clinical evaluation metrics for multi-class classifiers (numpy only).

`classification_metrics` turns predicted class probabilities and true labels
into the JSON-serialisable dict written as `report.json`: accuracy, balanced
accuracy, per-class sensitivity / specificity / PPV / NPV / F1 / one-vs-rest
ROC-AUC / PR-AUC, macro and support-weighted averages, the confusion matrix
(rows true, columns predicted), top-1 expected calibration error, NLL and
percentile-bootstrap 95% intervals (resampling patients when patient ids are
given). A value that is undefined on the data (the sensitivity of a class
with no examples, an AUC when a class is absent) is `None`, never NaN.

The helpers return numpy arrays and may use NaN internally; only the dict
returned by `classification_metrics` is guaranteed NaN-free. scikit-learn is
used by the tests to check these numbers, never imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_PER_CLASS_KEYS = (
    'sensitivity',
    'specificity',
    'ppv',
    'npv',
    'f1',
    'auc',
    'pr_auc',
)
_MAX_BOOTSTRAP_BLOCK = 4_000_000  # resamples x units held in memory at once


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """Numerically stable softmax over the last axis of `logits / temperature`."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _check_labels(
    labels: Any, num_classes: int, n: int | None = None
) -> np.ndarray:
  """Integer class ids in [0, num_classes), with a clear error otherwise."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
  if n is not None and labels.shape[0] != n:
    raise ValueError(f'got {labels.shape[0]} labels for {n} predictions')
  if not np.issubdtype(labels.dtype, np.integer):
    if labels.size and not np.all(np.mod(labels, 1) == 0):
      raise ValueError(f'labels must be integer class ids, got {labels.dtype}')
    labels = labels.astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(f'label {bad} is outside [0, {num_classes})')
  return labels.astype(np.int64)


def _check_probs(probs: Any, num_classes: int) -> np.ndarray:
  """Rows of class probabilities [N, C] that are finite and sum to one."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] != num_classes:
    raise ValueError(
        f'probs must have shape [N, {num_classes}], got {probs.shape}'
    )
  if probs.shape[0] == 0:
    raise ValueError('probs has no examples')
  if not np.all(np.isfinite(probs)):
    raise ValueError('probs contains NaN or infinite values')
  sums = probs.sum(axis=1)
  if probs.min() < 0 or np.max(np.abs(sums - 1)) > 1e-2:
    raise ValueError(
        'probs rows must be probabilities summing to 1 (got a '
        f'row summing to {sums[np.argmax(np.abs(sums - 1))]:.4g});'
        ' pass softmax(logits), not logits'
    )
  return probs


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
  """Counts [C, C]: rows are the true class, columns the predicted class."""
  labels = _check_labels(labels, num_classes)
  preds = _check_labels(preds, num_classes, n=labels.shape[0])
  flat = np.bincount(
      labels * num_classes + preds, minlength=num_classes * num_classes
  )
  return flat.reshape(num_classes, num_classes)


def _binary_counts(
    scores: Any, positives: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """True/false positives above each distinct threshold, highest first."""
  scores = np.asarray(scores, np.float64).ravel()
  positives = np.asarray(positives).astype(bool).ravel()
  if scores.shape != positives.shape:
    raise ValueError(
        f'scores {scores.shape} and positives '
        f'{positives.shape} differ in shape'
    )
  order = np.argsort(-scores, kind='stable')
  scores, positives = scores[order], positives[order]
  last = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
  tps = np.cumsum(positives)[last]
  fps = last + 1 - tps
  return tps.astype(np.float64), fps.astype(np.float64), scores[last]


def roc_curve(
    scores: Any, positives: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One-vs-rest ROC curve: (fpr, tpr, thresholds), starting at (0, 0).

  `positives` is a boolean mask of the positive examples. The thresholds
  decrease; the first is +inf. Raises ValueError without both classes.
  """
  tps, fps, thresholds = _binary_counts(scores, positives)
  if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
    raise ValueError('roc_curve needs both positive and negative examples')
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return fpr, tpr, np.r_[np.inf, thresholds]


def pr_curve(
    scores: Any, positives: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision-recall curve: (precision, recall, thresholds).

  Ordered by decreasing threshold (increasing recall); the first point is
  (precision 1, recall 0) at threshold +inf, as in scikit-learn's curve.
  Raises ValueError without positive examples.
  """
  tps, fps, thresholds = _binary_counts(scores, positives)
  if tps.size == 0 or tps[-1] == 0:
    raise ValueError('pr_curve needs at least one positive example')
  precision = np.r_[1.0, tps / (tps + fps)]
  recall = np.r_[0.0, tps / tps[-1]]
  return precision, recall, np.r_[np.inf, thresholds]


def roc_auc(scores: Any, positives: Any) -> float | None:
  """Area under the ROC curve (trapezoidal, ties count half); None if
  only one class is present."""
  try:
    fpr, tpr, _ = roc_curve(scores, positives)
  except ValueError:
    return None
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(scores: Any, positives: Any) -> float | None:
  """Average precision, sum_k (R_k - R_{k-1}) P_k, as scikit-learn's
  `average_precision_score` (no interpolation); None without positives."""
  try:
    precision, recall, _ = pr_curve(scores, positives)
  except ValueError:
    return None
  return float(np.sum(np.diff(recall) * precision[1:]))


def reliability_curve(
    probs: Any, labels: Any, n_bins: int = 15
) -> dict[str, np.ndarray]:
  """Top-1 calibration per equal-width confidence bin.

  Bin b covers confidences (b / n_bins, (b + 1) / n_bins] (the first bin
  also holds 0). Returns `edges` [n_bins + 1], and per bin `count`,
  `confidence` (mean top-1 probability) and `accuracy`; the last two are NaN
  for empty bins.
  """
  if n_bins < 1:
    raise ValueError(f'n_bins must be >= 1, got {n_bins}')
  probs = np.asarray(probs, np.float64)
  labels = _check_labels(labels, probs.shape[-1], n=probs.shape[0])
  conf = probs.max(axis=1)
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
  count = np.bincount(bins, minlength=n_bins).astype(np.float64)
  conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
  correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    return {
        'edges': np.linspace(0.0, 1.0, n_bins + 1),
        'count': count,
        'confidence': np.where(count > 0, conf_sum / count, np.nan),
        'accuracy': np.where(count > 0, correct_sum / count, np.nan),
    }


def expected_calibration_error(
    probs: Any, labels: Any, n_bins: int = 15
) -> float:
  """Top-1 ECE (Guo et al. 2017): sum_b n_b / N |accuracy_b - confidence_b|
  over `n_bins` equal-width confidence bins."""
  curve = reliability_curve(probs, labels, n_bins)
  count = curve['count']
  gaps = np.abs(np.nan_to_num(curve['accuracy'] - curve['confidence']))
  return float(np.sum(count * gaps) / np.sum(count))


def _nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
  return float(-np.mean(log_probs[np.arange(labels.size), labels]))


def fit_temperature(
    logits: Any, labels: Any, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
  """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the NLL
  of softmax(logits / T) on held-out data.

  Deterministic: a grid over log T inside `bounds`, then a golden-section
  search between the neighbours of the best grid point.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not np.all(np.isfinite(logits)):
    raise ValueError(f'logits must be finite [N, C], got shape {logits.shape}')
  labels = _check_labels(labels, logits.shape[1], n=logits.shape[0])
  if not 0 < bounds[0] < bounds[1]:
    raise ValueError(f'bounds must satisfy 0 < lo < hi, got {bounds}')
  nll = lambda log_t: _nll(_log_softmax(logits / np.exp(log_t)), labels)
  grid = np.linspace(np.log(bounds[0]), np.log(bounds[1]), 41)
  best = int(np.argmin([nll(g) for g in grid]))
  lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
  ratio = (np.sqrt(5.0) - 1) / 2
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fa, fb = nll(a), nll(b)
  for _ in range(60):
    if fa <= fb:
      hi, b, fb = b, a, fa
      a = hi - ratio * (hi - lo)
      fa = nll(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + ratio * (hi - lo)
      fb = nll(b)
  return float(np.exp((lo + hi) / 2))


def _rates(cms: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class rates from confusion matrices [..., C, C]; NaN if undefined."""
  cms = np.asarray(cms, np.float64)
  tp = np.diagonal(cms, axis1=-2, axis2=-1)
  support = cms.sum(axis=-1)
  predicted = cms.sum(axis=-2)
  total = cms.sum(axis=(-2, -1))[..., None]
  fn, fp = support - tp, predicted - tp
  tn = total - tp - fn - fp
  div = lambda a, b: np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)
  return {
      'accuracy': div(tp.sum(-1), total[..., 0]),
      'sensitivity': div(tp, tp + fn),
      'specificity': div(tn, tn + fp),
      'ppv': div(tp, tp + fp),
      'npv': div(tn, tn + fn),
      'f1': div(2 * tp, 2 * tp + fp + fn),
  }


def _group_index(groups: Any, n: int) -> np.ndarray:
  """Patient ids [N] -> dense group index [N] in [0, number of groups)."""
  groups = np.asarray(groups)
  if groups.shape != (n,):
    raise ValueError(
        f'groups must have shape ({n},) (one patient id per '
        f'example), got {groups.shape}'
    )
  try:
    _, index = np.unique(groups, return_inverse=True)
  except TypeError as e:
    raise ValueError(
        'groups must be patient ids of one comparable type '
        f'(all str or all int): {e}'
    ) from e
  return index.ravel()


def bootstrap_confusion_matrices(
    labels: np.ndarray,
    preds: np.ndarray,
    num_classes: int,
    *,
    groups: Any = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> np.ndarray:
  """Confusion matrices [n_bootstrap, C, C] of resampled data sets.

  Resamples units with replacement: whole groups (patients: all images of a
  drawn patient enter together) when `groups` is given, images otherwise.
  Vectorised: each block of resamples is a count matrix [R, U] of how often
  each unit was drawn, times the per-unit confusion counts [U, C*C].
  """
  labels = _check_labels(labels, num_classes)
  preds = _check_labels(preds, num_classes, n=labels.size)
  cells = labels * num_classes + preds
  k = num_classes * num_classes
  unit_of = (
      np.arange(labels.size)
      if groups is None
      else _group_index(groups, labels.size)
  )
  n_units = int(unit_of.max()) + 1
  unit_cm = np.zeros((n_units, k))
  np.add.at(unit_cm, (unit_of, cells), 1.0)
  rng = np.random.default_rng(seed)
  block = max(1, min(n_bootstrap, _MAX_BOOTSTRAP_BLOCK // n_units))
  out = np.empty((n_bootstrap, k))
  for start in range(0, n_bootstrap, block):
    r = min(block, n_bootstrap - start)
    draws = rng.integers(0, n_units, size=(r, n_units))
    draws += (np.arange(r) * n_units)[:, None]
    counts = np.bincount(draws.ravel(), minlength=r * n_units)
    out[start : start + r] = counts.reshape(r, n_units) @ unit_cm
  return out.reshape(n_bootstrap, num_classes, num_classes)


def _interval(samples: np.ndarray) -> list[float] | None:
  """95% percentile interval of the defined (non-NaN) samples."""
  samples = samples[~np.isnan(samples)]
  if samples.size == 0:
    return None
  lo, hi = np.percentile(samples, [2.5, 97.5])
  return [float(lo), float(hi)]


def _json_float(x: Any) -> float | None:
  if x is None:
    return None
  x = float(x)
  return x if np.isfinite(x) else None


def _average(
    values: dict[str, dict[str, Any]], weights: np.ndarray | None
) -> dict[str, float | None]:
  """Mean of each per-class metric over the classes where it is defined."""
  out = {}
  for key in _PER_CLASS_KEYS:
    vals = np.array(
        [np.nan if v[key] is None else v[key] for v in values.values()]
    )
    w = np.ones_like(vals) if weights is None else weights.astype(np.float64)
    ok = ~np.isnan(vals) & (w > 0)
    out[key] = (
        float(np.sum(vals[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else None
    )
  return out


def _ci95(
    labels, preds, names, groups, n_bootstrap, seed, point
) -> dict[str, Any]:
  """Bootstrap intervals for accuracy and per-class sensitivity/specificity."""
  ci = {
      'n_bootstrap': int(n_bootstrap),
      'seed': int(seed),
      'resampling': 'image' if groups is None else 'patient',
      'method': 'percentile',
      'accuracy': None,
      'per_class': {
          n: {'sensitivity': None, 'specificity': None} for n in names
      },
  }
  if groups is not None:
    ci['num_groups'] = int(_group_index(groups, labels.size).max()) + 1
  if n_bootstrap <= 0:
    return ci
  cms = bootstrap_confusion_matrices(
      labels,
      preds,
      len(names),
      groups=groups,
      n_bootstrap=n_bootstrap,
      seed=seed,
  )
  rates = _rates(cms)
  ci['accuracy'] = _interval(rates['accuracy'])
  for c, name in enumerate(names):
    for key in ('sensitivity', 'specificity'):
      if point['per_class'][name][key] is not None:
        ci['per_class'][name][key] = _interval(rates[key][:, c])
  return ci


def classification_metrics(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    groups: Any = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
  """Everything a clinical reader asks of a classifier, as a JSON-ready dict.

  Args:
    probs: class probabilities [N, C] (softmax outputs).
    labels: true class ids [N].
    class_names: C names, in class-id order.
    groups: optional patient id per example [N]; the bootstrap then
      resamples patients rather than images.
    n_bootstrap: bootstrap resamples for `ci95` (0 skips the intervals).
    seed: seed of the bootstrap.
    n_bins: confidence bins of the ECE.

  Returns:
    A dict with `accuracy`, `balanced_accuracy` (mean sensitivity over the
    classes present), `num_examples`, `class_names`, `per_class`, `macro`
    (unweighted mean over the classes where a metric is defined),
    `weighted` (support-weighted), `confusion_matrix` (rows true), `ece`,
    `ece_bins`, `nll` and `ci95`. Undefined values are None.
  """
  names = [str(n) for n in class_names]
  if len(set(names)) != len(names):
    raise ValueError(f'class_names must be unique, got {names}')
  probs = _check_probs(probs, len(names))
  labels = _check_labels(labels, len(names), n=probs.shape[0])
  preds = probs.argmax(axis=1)
  cm = confusion_matrix(labels, preds, len(names))
  rates = _rates(cm)
  support = cm.sum(axis=1)
  per_class = {}
  for c, name in enumerate(names):
    positives = labels == c
    entry = {
        k: _json_float(rates[k][c])
        for k in ('sensitivity', 'specificity', 'ppv', 'npv', 'f1')
    }
    entry['auc'] = roc_auc(probs[:, c], positives)
    entry['pr_auc'] = average_precision(probs[:, c], positives)
    entry['support'] = int(support[c])
    per_class[name] = entry
  log_probs = np.log(np.clip(probs, 1e-12, None))
  sens = rates['sensitivity'][support > 0]
  result = {
      'accuracy': float(rates['accuracy']),
      'balanced_accuracy': float(np.mean(sens)),
      'num_examples': int(labels.size),
      'class_names': names,
      'per_class': per_class,
      'macro': _average(per_class, None),
      'weighted': _average(per_class, support),
      'confusion_matrix': cm.astype(int).tolist(),
      'ece': expected_calibration_error(probs, labels, n_bins),
      'ece_bins': int(n_bins),
      'nll': _nll(log_probs, labels),
  }
  result['ci95'] = _ci95(
      labels, preds, names, groups, n_bootstrap, seed, result
  )
  return result
