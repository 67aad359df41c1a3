"""The demo data set: prepares in seconds, stratified, readable, reused."""

import collections
import csv
import os
import pickle
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from drpl_jax import data
from drpl_jax.data import demo


def _data_config(data_dir, **overrides):
  config = ml_collections.ConfigDict(
      dict(name='demo', manual_dir='', data_dir=data_dir, classes='')
  )
  config.update(overrides)
  return config


def test_counts_sum_and_stratified(demo_data_dir):
  summary = data.prepare('demo', data_dir=demo_data_dir)
  assert summary['reused'] is True  # the fixture prepared it already
  assert sum(summary['num_examples'].values()) == 1797
  assert summary['num_skipped'] == 0
  totals = collections.Counter(str(t) for t in sk_datasets.load_digits().target)
  per_class = summary['examples_per_class']
  for name, total in totals.items():
    expected = int(np.floor(total * 0.1 + 0.5))
    assert per_class['validation'][name] == expected
    assert per_class['test'][name] == expected
    assert per_class['train'][name] == total - 2 * expected
  assert summary['patients'] is None
  assert summary['split_method'] == 'stratified'


def test_sources_return_images_labels_ids(demo_data_dir):
  config = _data_config(demo_data_dir)
  info = data.ensure_prepared(config)
  assert info.class_names == demo.CLASS_NAMES
  assert info.version == '1.0.0' and os.path.isdir(info.data_dir)
  all_ids = []
  for split in ('train', 'validation', 'test'):
    source = data.get_source(config, split)
    assert len(source) == info.num_examples[split]
    for i in (0, len(source) - 1):
      example = source[i]
      assert example['image'].dtype == np.uint8
      assert example['image'].shape == (32, 32, 3)
      assert isinstance(example['label'], int)
      assert isinstance(example['id'], str) and example['patient_id'] == ''
      # The id names the digit and its index in scikit-learn's array.
      digit, index = example['id'].split('/digit-')
      assert info.class_names[example['label']] == digit
      np.testing.assert_array_equal(
          example['image'], demo.digit_image(int(index))
      )
    labels = source.labels
    assert labels.shape == (len(source),)
    assert [source[i]['label'] for i in range(5)] == list(labels[:5])
    all_ids += [r['id'] for r in source.__getitems__(range(len(source)))]
  assert len(all_ids) == len(set(all_ids)) == 1797


def test_source_indexing_and_pickle(demo_data_dir):
  source = data.get_source(_data_config(demo_data_dir), 'test')
  assert source[-1]['id'] == source[len(source) - 1]['id']
  with pytest.raises(IndexError):
    source[len(source)]  # pylint: disable=pointless-statement
  clone = pickle.loads(pickle.dumps(source))
  # pylint: disable-next=protected-access
  assert clone._source is None  # reopened lazily
  np.testing.assert_array_equal(clone[3]['image'], source[3]['image'])
  with pytest.raises(data.DataError, match="no examples in split 'bogus'"):
    data.get_source(_data_config(demo_data_dir), 'bogus')


def test_splits_csv(demo_data_dir):
  summary = data.prepare('demo', data_dir=demo_data_dir)
  assert summary['splits_csv'] == os.path.join(
      summary['data_dir'], 'splits.csv'
  )
  with open(summary['splits_csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1797
  assert set(rows[0]) == {'id', 'split', 'label', 'patient_id'}
  assert all(r['id'].startswith(r['label'] + '/') for r in rows)
  assert (
      collections.Counter(r['split'] for r in rows) == summary['num_examples']
  )


def test_second_prepare_reuses(tmp_path):
  first = data.prepare('demo', data_dir=str(tmp_path))
  assert first['reused'] is False
  assert data.prepared_dir('demo', data_dir=str(tmp_path)) == first['data_dir']
  shards = [
      os.path.join(first['data_dir'], f) for f in os.listdir(first['data_dir'])
  ]
  mtimes = {p: os.stat(p).st_mtime_ns for p in shards}
  second = data.prepare('demo', data_dir=str(tmp_path))
  assert second['reused'] is True
  assert {p: os.stat(p).st_mtime_ns for p in shards} == mtimes
  first.pop('reused'), second.pop('reused')
  assert first == second


def test_class_subset_and_seed_get_own_folders(tmp_path):
  subset = data.prepare('demo', data_dir=str(tmp_path), classes=['3', '1'])
  assert subset['class_names'] == ['3', '1']
  assert sum(subset['num_examples'].values()) == 183 + 182
  other_seed = data.prepare(
      'demo', data_dir=str(tmp_path), classes=['3', '1'], seed=1
  )
  assert other_seed['data_dir'] != subset['data_dir']
  with open(subset['splits_csv']) as f, open(other_seed['splits_csv']) as g:
    assert f.read() != g.read()  # another seed, another split
  with pytest.raises(data.DataError, match=r"unknown classes \['x'\]"):
    data.prepare('demo', data_dir=str(tmp_path), classes=['x'])
  with pytest.raises(data.DataError, match="unknown data set 'nope'"):
    data.prepare('nope', data_dir=str(tmp_path))


def test_no_tensorflow_and_lazy_tfds(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      import drpl_jax.data as data
      assert 'tensorflow_datasets' not in sys.modules
      summary = data.prepare('demo', data_dir={str(tmp_path)!r})
      source = data.get_source(dict(name='demo', data_dir={str(tmp_path)!r},
                                    manual_dir='', classes=''), 'train')
      assert source[0]['image'].shape == (32, 32, 3)
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      assert sorted(data.BUILDERS) == ['covid19_radiography', 'cxr_folder',
                                       'demo']
      print('OK')
  """)
  result = subprocess.run(
      [sys.executable, '-c', script],
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('OK')
