"""Data is resolved once per run: setup prepares, iterators only find.

The setup-time resolver (`data.ensure_prepared`) prepares once, on process
0 only when there are several processes, behind a barrier; `get_source` and
the input pipeline's iterators never start a build and name the `prepare`
command when the data set is not there.
"""

import os

import pytest

from drpl_jax import data
from drpl_jax.data import api
from drpl_jax.input import pipeline as ip
from drpl_jax.input.config import DataConfig


def test_iterators_on_unprepared_data_raise_instead_of_building(
    tmp_path, monkeypatch
):
  def no_build(*args, **kwargs):
    raise AssertionError('an iterator started a build')

  monkeypatch.setattr(api, 'prepare', no_build)
  cfg = DataConfig(name='demo', data_dir=str(tmp_path), image_size=32)
  expected = (
      f'python -m drpl_jax.data prepare --name=demo --data_dir={tmp_path}'
  )
  with pytest.raises(data.DataError, match='not prepared') as e:
    ip.create_train_iterator(cfg, batch_size=8, seed=0)
  assert expected in str(e.value)
  with pytest.raises(data.DataError, match='prepare --name=demo'):
    ip.create_eval_iterator(cfg, 'test', batch_size=8)
  with pytest.raises(data.DataError, match='prepare --name=demo'):
    data.get_source(cfg, 'train')
  assert not os.listdir(tmp_path)  # nothing was written


def test_prepare_command_names_every_non_default_argument():
  cfg = DataConfig(
      name='cxr_folder',
      manual_dir='/raw',
      data_dir='/tfds',
      classes='A,B',
      split_seed=2,
      min_side=64,
  )
  assert data.prepare_command(cfg) == (
      'python -m drpl_jax.data prepare --name=cxr_folder --data_dir=/tfds '
      '--manual_dir=/raw --classes=A,B --seed=2 --min_side=64'
  )


def test_one_process_prepares_without_a_barrier(tmp_path, monkeypatch):
  # No jax.distributed here: a single process, whose JAX (if any) is not
  # asked, so a PyTorch-only command starts no JAX backend.
  assert api._process_index() is None  # pylint: disable=protected-access
  events = []
  monkeypatch.setattr(
      api,
      'prepare',
      lambda name, **kw: events.append(name)
      or {
          'name': name,
          'version': '1.0.0',
          'class_names': ['a'],
          'num_examples': {'train': 1},
          'data_dir': 'd',
          'splits_csv': 'd/splits.csv',
      },
  )
  monkeypatch.setattr(api, '_barrier', lambda name: events.append('barrier'))
  info = data.ensure_prepared(DataConfig(name='demo', data_dir=str(tmp_path)))
  assert events == ['demo'] and info.class_names == ('a',)


def test_setup_prepares_once_and_passes_the_info_down(
    demo_data_dir, monkeypatch
):
  cfg = DataConfig(name='demo', data_dir=demo_data_dir, image_size=32)
  info = data.ensure_prepared(cfg)  # found: the fixture prepared it
  calls = []
  monkeypatch.setattr(api, 'find_prepared', lambda c: calls.append(c) or info)
  batch = next(ip.create_train_iterator(cfg, batch_size=8, seed=0, info=info))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert calls == []  # the setup's info is used, no second look-up
  evals = next(ip.create_eval_iterator(cfg, 'test', batch_size=8, info=info))
  source = data.get_source(info, 'test')
  assert list(evals['id']) == source.ids[:8]
  assert list(evals['patient_id']) == source.patient_ids[:8]


@pytest.mark.parametrize('index', [0, 1])
def test_only_process_zero_prepares_behind_a_barrier(
    index, tmp_path, monkeypatch
):
  events = []
  monkeypatch.setattr(api, '_process_index', lambda: index)
  monkeypatch.setattr(
      api, 'prepare', lambda name, **kw: events.append(('prepare', name))
  )
  monkeypatch.setattr(api, '_barrier', lambda name: events.append('barrier'))
  cfg = DataConfig(name='demo', data_dir=str(tmp_path))
  # The fake prepare wrote nothing: after the barrier every process finds
  # no data and stops with the command to run.
  with pytest.raises(data.DataError, match='prepare --name=demo'):
    data.ensure_prepared(cfg)
  expected = [('prepare', 'demo'), 'barrier'] if index == 0 else ['barrier']
  assert events == expected


def test_a_failed_prepare_on_process_zero_still_meets_the_barrier(
    tmp_path, monkeypatch
):
  events = []
  monkeypatch.setattr(api, '_process_index', lambda: 0)

  def bad_prepare(name, **kwargs):
    raise data.DataError(f'manual_dir {kwargs["manual_dir"]}: no images')

  monkeypatch.setattr(api, 'prepare', bad_prepare)
  monkeypatch.setattr(api, '_barrier', lambda name: events.append('barrier'))
  cfg = DataConfig(
      name='cxr_folder', manual_dir='/nowhere', data_dir=str(tmp_path)
  )
  with pytest.raises(data.DataError, match='/nowhere: no images'):
    data.ensure_prepared(cfg)
  assert events == ['barrier']  # the other processes are not left waiting
