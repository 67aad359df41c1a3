"""Tests of drpl_jax.evaluation.metrics, checked against scikit-learn and by hand."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from drpl_jax.evaluation import metrics

NAMES = ['COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia']


def random_predictions(n=400, c=4, seed=0, skill=1.5):
  """Probabilities that are informative but imperfect, with tied scores."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, size=n)
  logits = rng.normal(size=(n, c)) + skill * np.eye(c)[labels]
  logits = np.round(logits, 1)  # ties exercise the rank handling
  return metrics.softmax(logits), labels


def test_product_does_not_import_sklearn():
  code = (
      'import sys, drpl_jax.evaluation.metrics; '
      'print(sorted(m for m in ("sklearn", "scipy", "tensorflow") '
      'if m in sys.modules))'
  )
  out = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]'


def test_against_sklearn_four_classes():
  probs, labels = random_predictions()
  preds = probs.argmax(1)
  got = metrics.classification_metrics(probs, labels, NAMES, n_bootstrap=50)
  assert got['accuracy'] == pytest.approx(skm.accuracy_score(labels, preds))
  assert got['balanced_accuracy'] == pytest.approx(
      skm.balanced_accuracy_score(labels, preds)
  )
  np.testing.assert_array_equal(
      got['confusion_matrix'], skm.confusion_matrix(labels, preds)
  )
  np.testing.assert_array_equal(
      metrics.confusion_matrix(labels, preds, 4),
      skm.confusion_matrix(labels, preds),
  )
  p, r, f, s = skm.precision_recall_fscore_support(labels, preds)
  for c, name in enumerate(NAMES):
    entry = got['per_class'][name]
    assert entry['ppv'] == pytest.approx(p[c])
    assert entry['sensitivity'] == pytest.approx(r[c])
    assert entry['f1'] == pytest.approx(f[c])
    assert entry['support'] == s[c]
    assert entry['auc'] == pytest.approx(
        skm.roc_auc_score(labels == c, probs[:, c])
    )
    assert entry['pr_auc'] == pytest.approx(
        skm.average_precision_score(labels == c, probs[:, c])
    )
  assert got['macro']['f1'] == pytest.approx(
      skm.f1_score(labels, preds, average='macro')
  )
  assert got['weighted']['f1'] == pytest.approx(
      skm.f1_score(labels, preds, average='weighted')
  )
  assert got['weighted']['sensitivity'] == pytest.approx(got['accuracy'])
  assert got['macro']['auc'] == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class='ovr', average='macro')
  )
  assert got['num_examples'] == 400 and got['class_names'] == NAMES
  assert got['nll'] == pytest.approx(skm.log_loss(labels, probs))
  json.dumps(got, allow_nan=False)


def test_curves_against_sklearn():
  probs, labels = random_predictions(n=200, seed=3)
  scores, pos = probs[:, 1], labels == 1
  fpr, tpr, thr = metrics.roc_curve(scores, pos)
  sk_fpr, sk_tpr, _ = skm.roc_curve(pos, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, sk_fpr)
  np.testing.assert_allclose(tpr, sk_tpr)
  assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
  precision, recall, _ = metrics.pr_curve(scores, pos)
  sk_p, sk_r, _ = skm.precision_recall_curve(pos, scores)
  # sklearn runs from high to low recall and stops at full recall.
  n = sk_p.size
  np.testing.assert_allclose(precision[:n], sk_p[::-1])
  np.testing.assert_allclose(recall[:n], sk_r[::-1])
  with pytest.raises(ValueError, match='negative'):
    metrics.roc_curve(scores, np.ones_like(pos))


def test_specificity_and_npv_from_hand_made_confusion_matrix():
  # Rows true, columns predicted:
  #   [[5, 1, 0],
  #    [2, 3, 1],
  #    [0, 0, 4]]
  cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
  labels = np.repeat(np.repeat(np.arange(3), 3), cm.ravel())
  preds = np.repeat(np.tile(np.arange(3), 3), cm.ravel())
  probs = np.full((labels.size, 3), 0.1)
  probs[np.arange(labels.size), preds] = 0.8
  got = metrics.classification_metrics(
      probs, labels, ['a', 'b', 'c'], n_bootstrap=0
  )
  assert got['confusion_matrix'] == cm.tolist()
  a, b, c = (got['per_class'][k] for k in 'abc')
  # Class a: TP 5, FN 1, FP 2, TN 3 + 1 + 0 + 4 = 8.
  assert a['specificity'] == pytest.approx(8 / 10)
  assert a['npv'] == pytest.approx(8 / 9)
  # Class b: TP 3, FN 3, FP 1, TN 5 + 0 + 0 + 4 = 9.
  assert b['specificity'] == pytest.approx(9 / 10)
  assert b['npv'] == pytest.approx(9 / 12)
  assert b['ppv'] == pytest.approx(3 / 4)
  # Class c: TP 4, FN 0, FP 1, TN 11.
  assert c['specificity'] == pytest.approx(11 / 12)
  assert c['npv'] == pytest.approx(1.0)
  assert c['sensitivity'] == pytest.approx(1.0)
  assert got['macro']['specificity'] == pytest.approx(
      (8 / 10 + 9 / 10 + 11 / 12) / 3
  )
  assert got['weighted']['specificity'] == pytest.approx(
      (6 * 8 / 10 + 6 * 9 / 10 + 4 * 11 / 12) / 16
  )
  assert got['ci95']['accuracy'] is None  # n_bootstrap=0 skips intervals


def test_ece_hand_made():
  # conf 0.9 right, 0.9 wrong -> bin acc 0.5, |0.5 - 0.9| * 2/4 = 0.2;
  # conf 0.7 right twice -> |1 - 0.7| * 2/4 = 0.15.
  probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]])
  labels = np.array([0, 1, 1, 0])
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(
      0.35
  )
  curve = metrics.reliability_curve(probs, labels, n_bins=10)
  assert curve['count'].sum() == 4
  assert curve['count'][8] == 2 and curve['count'][6] == 2  # (.8,.9], (.6,.7]
  assert curve['accuracy'][8] == pytest.approx(0.5)
  assert np.isnan(curve['accuracy'][0])
  # Perfect calibration in one bin: ECE 0.
  probs = np.array([[0.75, 0.25]] * 4)
  assert metrics.expected_calibration_error(
      probs, np.array([0, 0, 0, 1])
  ) == pytest.approx(0.0)


def test_bootstrap_ci_contains_point_and_shrinks():
  small_probs, small_labels = random_predictions(n=200, seed=1)
  big_probs, big_labels = random_predictions(n=5000, seed=1)
  small = metrics.classification_metrics(
      small_probs, small_labels, NAMES, n_bootstrap=400, seed=0
  )
  big = metrics.classification_metrics(
      big_probs, big_labels, NAMES, n_bootstrap=400, seed=0
  )
  for res in (small, big):
    lo, hi = res['ci95']['accuracy']
    assert lo <= res['accuracy'] <= hi
    for name in NAMES:
      for key in ('sensitivity', 'specificity'):
        lo, hi = res['ci95']['per_class'][name][key]
        assert lo <= res['per_class'][name][key] <= hi
    assert res['ci95']['resampling'] == 'image'
    assert res['ci95']['n_bootstrap'] == 400 and res['ci95']['seed'] == 0
  width = lambda r: r['ci95']['accuracy'][1] - r['ci95']['accuracy'][0]
  assert width(big) < 0.5 * width(small)
  # Same seed, same intervals; another seed, other intervals.
  again = metrics.classification_metrics(
      small_probs, small_labels, NAMES, n_bootstrap=400, seed=0
  )
  assert again['ci95'] == small['ci95']
  other = metrics.classification_metrics(
      small_probs, small_labels, NAMES, n_bootstrap=400, seed=1
  )
  assert other['ci95']['accuracy'] != small['ci95']['accuracy']


def test_patient_grouped_bootstrap_keeps_patients_together():
  # 40 patients with 10 identical images each: the data hold 40 independent
  # observations, not 400, so the grouped interval must be wider.
  probs, labels = random_predictions(n=40, seed=2, skill=1.0)
  probs, labels = np.repeat(probs, 10, axis=0), np.repeat(labels, 10)
  groups = np.repeat([f'patient-{i}' for i in range(40)], 10)
  by_image = metrics.classification_metrics(
      probs, labels, NAMES, n_bootstrap=500
  )
  by_patient = metrics.classification_metrics(
      probs, labels, NAMES, groups=groups, n_bootstrap=500
  )
  assert by_patient['ci95']['resampling'] == 'patient'
  assert by_patient['ci95']['num_groups'] == 40
  width = lambda r: r['ci95']['accuracy'][1] - r['ci95']['accuracy'][0]
  assert width(by_patient) > 2 * width(by_image)
  # Every resampled confusion matrix is made of whole patients (multiples
  # of 10 images in every cell).
  cms = metrics.bootstrap_confusion_matrices(
      labels, probs.argmax(1), 4, groups=groups, n_bootstrap=50
  )
  assert np.all(cms % 10 == 0) and np.all(cms.sum((1, 2)) == 400)
  with pytest.raises(ValueError, match='groups'):
    metrics.classification_metrics(probs, labels, NAMES, groups=groups[:5])
  mixed = np.array(['p1', None] * 200, dtype=object)
  with pytest.raises(ValueError, match='groups'):
    metrics.classification_metrics(probs, labels, NAMES, groups=mixed)


def test_bootstrap_is_vectorised():
  probs, labels = random_predictions(n=20000, seed=4)
  start = time.perf_counter()
  metrics.classification_metrics(probs, labels, NAMES, n_bootstrap=1000)
  assert time.perf_counter() - start < 10.0  # about 1 s on 2 shared cores


def test_temperature_scaling_recovers_known_temperature():
  rng = np.random.default_rng(0)
  true_t = 2.5
  logits = rng.normal(scale=4.0, size=(20000, 4))
  # Labels drawn from softmax(logits / T): T is the calibrated temperature.
  p = metrics.softmax(logits, true_t)
  labels = (rng.random((20000, 1)) > np.cumsum(p, axis=1)).sum(1)
  t = metrics.fit_temperature(logits, labels)
  assert t == pytest.approx(true_t, rel=0.05)
  assert metrics.fit_temperature(logits, labels) == t  # deterministic
  before = metrics.expected_calibration_error(metrics.softmax(logits), labels)
  after = metrics.expected_calibration_error(metrics.softmax(logits, t), labels)
  assert after < before / 3


def test_softmax():
  x = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
  np.testing.assert_allclose(metrics.softmax(x), [[0.5, 0.5], [0.25, 0.75]])
  np.testing.assert_allclose(
      metrics.softmax(x[1:], 2.0),
      [[1 / (1 + np.sqrt(3)), np.sqrt(3) / (1 + np.sqrt(3))]],
  )
  with pytest.raises(ValueError, match='temperature'):
    metrics.softmax(x, 0.0)


def test_undefined_values_are_none():
  # Class 'c' never occurs in the labels; class 'b' is never predicted.
  labels = np.array([0, 0, 1, 1, 0, 1])
  probs = np.array(
      [
          [0.8, 0.1, 0.1],
          [0.7, 0.1, 0.2],
          [0.6, 0.3, 0.1],
          [0.2, 0.3, 0.5],
          [0.9, 0.05, 0.05],
          [0.5, 0.4, 0.1],
      ]
  )
  got = metrics.classification_metrics(
      probs, labels, ['a', 'b', 'c'], n_bootstrap=100
  )
  json.dumps(got, allow_nan=False)  # no NaN anywhere
  c = got['per_class']['c']
  assert c['support'] == 0
  assert c['sensitivity'] is None and c['auc'] is None
  assert c['pr_auc'] is None
  assert c['specificity'] == pytest.approx(5 / 6)  # one false 'c'
  assert c['ppv'] == 0.0 and c['f1'] == 0.0
  b = got['per_class']['b']
  assert b['ppv'] is None and b['sensitivity'] == 0.0 and b['f1'] == 0.0
  assert b['auc'] is not None
  assert got['ci95']['per_class']['c']['sensitivity'] is None
  assert got['ci95']['per_class']['c']['specificity'] is not None
  # Balanced accuracy averages the classes present only.
  assert got['balanced_accuracy'] == pytest.approx((1.0 + 0.0) / 2)
  assert got['macro']['sensitivity'] == pytest.approx(0.5)
  # A single class present: every AUC undefined, nothing crashes.
  one = metrics.classification_metrics(
      probs, np.zeros(6, int), ['a', 'b', 'c'], n_bootstrap=20
  )
  assert all(v['auc'] is None for v in one['per_class'].values())
  assert one['macro']['auc'] is None
  json.dumps(one, allow_nan=False)


def test_bad_input_errors():
  probs, labels = random_predictions(n=10)
  with pytest.raises(ValueError, match='shape'):
    metrics.classification_metrics(probs, labels, NAMES[:3])
  with pytest.raises(ValueError, match='outside'):
    metrics.classification_metrics(probs, labels + 4, NAMES)
  with pytest.raises(ValueError, match='logits'):
    metrics.classification_metrics(probs * 5, labels, NAMES)
  with pytest.raises(ValueError, match='labels'):
    metrics.classification_metrics(probs, labels[:5], NAMES)
  with pytest.raises(ValueError, match='unique'):
    metrics.classification_metrics(probs, labels, ['a', 'a', 'b', 'c'])
