"""Tests of drpl_jax.evaluation.report: files, JSON round trip, images, Markdown."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from drpl_jax.evaluation import metrics
from drpl_jax.evaluation import report as report_lib

NAMES = ['COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia']
PNGS = ('confusion_matrix', 'roc', 'pr', 'reliability')


def predictions(n=120, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, size=n)
  logits = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
  return logits, labels


def evaluator_like_report(logits, labels):
  """What drpl_jax.evaluation.evaluate builds: mean-head metrics plus extras."""
  heads = {}
  for head, shift in (('cls', 0.0), ('dist', 0.3), ('mean', 0.15)):
    heads[head] = metrics.classification_metrics(
        metrics.softmax(logits + shift * np.arange(4)),
        labels,
        NAMES,
        n_bootstrap=100,
    )
  report = dict(heads['mean'])
  report['heads'] = heads
  report['temperature'] = {
      'value': 1.37,
      'ece_before': 0.081,
      'ece_after': 0.024,
      'fitted_on': 'validation',
  }
  report.update(
      checkpoint_step=1234,
      config_hash='abc123',
      data={'name': 'covid19_radiography', 'split': 'test'},
  )
  return report


def test_write_report_files_json_and_images(tmp_path):
  logits, labels = predictions()
  probs = metrics.softmax(logits)
  report = metrics.classification_metrics(probs, labels, NAMES, n_bootstrap=100)
  report['checkpoint_step'] = np.int64(42)  # numpy scalars are accepted
  out = tmp_path / 'eval' / 'test'
  paths = report_lib.write_report(
      out, report, probs, labels, NAMES, title='unit test'
  )
  assert set(paths) == {'json', 'markdown', *PNGS}
  for path in paths.values():
    assert os.path.isfile(path) and os.path.dirname(path) == str(out)
  assert sorted(os.listdir(out)) == sorted(
      ['report.json', 'report.md'] + [f'{p}.png' for p in PNGS]
  )  # no temps
  with open(paths['json']) as f:
    loaded = json.load(f)
  expected = dict(report, checkpoint_step=42)
  assert loaded == json.loads(json.dumps(expected))
  assert loaded['per_class']['COVID']['support'] == int(np.sum(labels == 0))
  for name in PNGS:
    with Image.open(paths[name]) as img:
      img.verify()
    with Image.open(paths[name]) as img:
      assert img.format == 'PNG'
      assert img.width >= 400 and img.height >= 400
      pixels = np.asarray(img.convert('L'))
      assert pixels.std() > 10  # something was drawn, not a blank canvas
  with Image.open(paths['confusion_matrix']) as img:
    assert img.width > 1.5 * img.height  # two panels side by side


def test_markdown_content_and_paper_table(tmp_path):
  logits, labels = predictions()
  report = evaluator_like_report(logits, labels)
  probs = metrics.softmax(logits + 0.15 * np.arange(4))
  plain = report_lib.write_report(
      tmp_path / 'a', report, probs, labels, NAMES, title='Held-out test'
  )
  paper = report_lib.write_report(
      tmp_path / 'b',
      report,
      probs,
      labels,
      NAMES,
      title='Held-out test',
      paper_reference=True,
  )
  md = open(plain['markdown']).read()
  assert md.startswith('# Held-out test\n')
  for name in NAMES:
    assert name in md
  assert f'{100 * report["accuracy"]:.2f}%' in md
  lo, hi = report['ci95']['accuracy']
  assert f'[{100 * lo:.2f}, {100 * hi:.2f}]' in md
  covid_sens = report['per_class']['COVID']['sensitivity']
  assert f'{100 * covid_sens:.2f}%' in md
  # The confusion matrix rows appear as table rows.
  first_row = report['confusion_matrix'][0]
  assert '| COVID | ' + ' | '.join(map(str, first_row)) + ' |' in md
  # Heads, temperature and run information are rendered.
  assert '## Heads' in md
  for head in ('cls', 'dist', 'mean'):
    assert f'| {head} | {100 * report["heads"][head]["accuracy"]:.2f}%' in md
  assert '## Temperature scaling' in md and '1.370' in md
  assert '0.0810' in md and '0.0240' in md
  assert 'checkpoint_step | 1234' in md and 'data.split | test' in md
  # The paper's figures only when asked, marked as reported.
  assert '92.11%' not in md and 'Laser Journal' not in md
  md_paper = open(paper['markdown']).read()
  assert '92.11%' in md_paper and '97.85%' in md_paper
  assert 'Bai et al., Laser Journal 2024' in md_paper
  assert 'reported, not reproduced' in md_paper
  assert f'{100 * covid_sens:.2f}% (sensitivity)' in md_paper


def test_undefined_values_and_absent_class(tmp_path):
  # 'Viral Pneumonia' never occurs: its AUC and sensitivity are None.
  logits, labels = predictions(n=60, seed=1)
  labels = np.where(labels == 3, 0, labels)
  probs = metrics.softmax(logits)
  report = metrics.classification_metrics(probs, labels, NAMES, n_bootstrap=50)
  report['nan_extra'] = float('nan')
  paths = report_lib.write_report(
      tmp_path, report, probs, labels, NAMES, title='absent class'
  )
  loaded = json.load(open(paths['json']))
  assert loaded['nan_extra'] is None
  assert loaded['per_class']['Viral Pneumonia']['auc'] is None
  md = open(paths['markdown']).read()
  spec = report['per_class']['Viral Pneumonia']['specificity']
  assert f'| Viral Pneumonia | 0 | — | {100 * spec:.2f}% [' in md
  for name in PNGS:
    with Image.open(paths[name]) as img:
      assert img.width >= 400


def test_overwrite_is_atomic_and_errors_are_clear(tmp_path):
  logits, labels = predictions(n=40)
  probs = metrics.softmax(logits)
  report = metrics.classification_metrics(probs, labels, NAMES, n_bootstrap=0)
  report_lib.write_report(tmp_path, report, probs, labels, NAMES, title='1')
  report['accuracy_note'] = 'second'
  paths = report_lib.write_report(
      tmp_path, report, probs, labels, NAMES, title='2'
  )
  assert json.load(open(paths['json']))['accuracy_note'] == 'second'
  assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]
  with pytest.raises(ValueError, match='class_names'):
    report_lib.write_report(
        tmp_path, report, probs, labels, ['a', 'b', 'c', 'd'], title='x'
    )
  with pytest.raises(ValueError, match='shape'):
    report_lib.write_report(
        tmp_path, report, probs[:, :3], labels, NAMES, title='x'
    )
  with pytest.raises(ValueError, match='lacks metrics keys'):
    report_lib.write_report(
        tmp_path, {'step': 1}, probs, labels, NAMES, title='x'
    )
  with pytest.raises(TypeError, match=r"report\['bad'\]"):
    report_lib.write_report(
        tmp_path, dict(report, bad=object()), probs, labels, NAMES, title='x'
    )


def test_import_is_light():
  code = (
      'import sys, drpl_jax.evaluation.report; '
      'print(sorted(m for m in ("matplotlib", "sklearn", "tensorflow") '
      'if m in sys.modules))'
  )
  out = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]'
