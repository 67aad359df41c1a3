"""Tests for the grain input pipeline and the input benchmark."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest
from PIL import Image

import drpl_jax
from drpl_jax.input import augment
from drpl_jax.input import pipeline as ip
from drpl_jax.input.config import DataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(
    os.path.dirname(ROOT), 'shared', 'data', 'covid19_radiography_sample'
)
S = 16  # output image side in most tests


class ListSource:
  """A random-access source over random uint8 images; label i % classes."""

  def __init__(self, n, classes=None, labels=None, shape=(24, 20, 3)):
    rng = np.random.default_rng(n)
    self.images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    if labels is None:
      labels = np.arange(n) % classes if classes else np.arange(n)
    self.labels = np.asarray(labels)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {
        'image': self.images[i],
        'label': int(self.labels[i]),
        'id': f'ex{i}',
        'patient_id': f'p{i // 2}',
    }


def _train(source, **kw):
  args = dict(batch_size=4, image_size=S, seed=0, augment_config=None)
  args.update(kw)
  return ip.train_iterator(source, **args)


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_train_batches_shape_and_dtype():
  batch = next(_train(ListSource(12)))
  assert batch['image'].shape == (4, S, S, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32


@pytest.mark.parametrize('n_first', [2, 5, 7])  # 5 steps per epoch
def test_resume_is_bit_identical_with_augmentation(n_first):
  source = ListSource(21)  # 21 // 4 = 5 steps per epoch, remainder dropped
  reference = _take(_train(source), n_first + 6)
  it = _train(source)
  _take(it, n_first)
  state = it.get_state()
  resumed = _train(source)
  resumed.set_state(state)
  _assert_same(_take(resumed, 6), reference[n_first:])


def test_worker_processes_give_the_same_batches_and_resume():
  source = ListSource(21)
  reference = _take(_train(source), 7)
  it = _train(source, num_workers=2)
  got = _take(it, 3)
  state = it.get_state()
  it.close()
  resumed = _train(source, num_workers=2)
  resumed.set_state(state)
  got += _take(resumed, 4)
  resumed.close()
  _assert_same(got, reference)


def test_batched_reads_give_the_same_batches():
  calls = []

  class Batched(ListSource):

    def __getitems__(self, indices):
      calls.append(len(indices))
      return [self[i] for i in indices]

  plain, batched = ListSource(21), Batched(21)
  _assert_same(_take(_train(batched), 3), _take(_train(plain), 3))
  assert calls and set(calls) == {4}
  ev_plain = list(ip.eval_batches(plain, batch_size=8, image_size=S))
  ev_batched = list(ip.eval_batches(batched, batch_size=8, image_size=S))
  for a, b in zip(ev_plain, ev_batched):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_teacher_logits_are_joined_by_id():
  source = ListSource(12)  # label = index, id = f'ex{index}'
  table = {f'ex{i}': np.array([i, -i, 0.5], np.float32) for i in range(12)}
  batch = next(_train(source, teacher_logits=table))
  assert batch['teacher_logits'].dtype == np.float32
  np.testing.assert_array_equal(batch['teacher_logits'][:, 0], batch['label'])
  del table['ex3'], table['ex7']
  it = _train(source, teacher_logits=table)
  with pytest.raises(ValueError, match="'ex[37]'"):
    _take(it, 3)


def test_teacher_logits_from_a_soft_labels_file_object():
  soft_labels = pytest.importorskip('drpl_jax.pytorch.soft_labels')
  ids = [f'ex{i}' for i in range(12)]
  logits = np.stack([np.arange(12.0), np.zeros(12)], -1)
  table = soft_labels.SoftLabels(
      ids, logits, ['train'] * 12, {'class_names': ['a', 'b']}
  )
  batch = next(_train(ListSource(12), teacher_logits=table))
  np.testing.assert_array_equal(batch['teacher_logits'][:, 0], batch['label'])


def test_same_seed_agrees_different_seed_differs():
  source = ListSource(16)
  a, b = _take(_train(source), 3), _take(_train(source), 3)
  c = _take(_train(source, seed=1), 3)
  _assert_same(a, b)
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation():
  source = ListSource(12)  # label = index
  batches = _take(_train(source, augment_config={'randaugment_ops': 0}), 6)
  epochs = [
      np.concatenate([b['label'] for b in batches[e * 3 : e * 3 + 3]])
      for e in range(2)
  ]
  for labels in epochs:
    assert sorted(labels) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize('count', [2, 3])
def test_process_shards_partition_the_global_batch(count):
  source = ListSource(30)  # label = index
  single = _take(_train(source, batch_size=6), 6)
  shards = [
      _take(
          _train(source, batch_size=6, process_index=p, process_count=count), 6
      )
      for p in range(count)
  ]
  for step in range(6):
    parts = [shards[p][step] for p in range(count)]
    assert all(len(part['label']) == 6 // count for part in parts)
    labels = np.concatenate([part['label'] for part in parts])
    assert len(set(labels.tolist())) == 6  # distinct examples
    # The global batch does not depend on the process count, pixel for pixel.
    np.testing.assert_array_equal(labels, single[step]['label'])
    np.testing.assert_array_equal(
        np.concatenate([part['image'] for part in parts]), single[step]['image']
    )


def test_repeated_augmentation_repeats_examples_with_new_views():
  source = ListSource(12)  # label = index
  batches = _take(
      _train(source, batch_size=12, augment_config={'repeated_aug': 3}), 2
  )
  for batch in batches:
    labels = batch['label']
    values, counts = np.unique(labels, return_counts=True)
    assert len(values) == 4 and set(counts) == {3}
    first = np.nonzero(labels == values[0])[0]
    views = batch['image'][first]
    assert not np.array_equal(views[0], views[1])


def test_balanced_sampler_equalises_classes():
  labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
  source = ListSource(100, labels=labels, shape=(8, 8, 3))
  it = _train(
      source,
      batch_size=20,
      balanced=True,
      labels=labels,
      augment_config={'randaugment_ops': 0, 'random_erase': 0.0},
  )
  seen = np.concatenate([b['label'] for b in _take(it, 30)])
  freq = np.bincount(seen, minlength=3) / len(seen)
  np.testing.assert_allclose(freq, 1 / 3, atol=0.05)


def test_train_errors_name_the_problem():
  with pytest.raises(ValueError, match='process_count'):
    _train(ListSource(12), batch_size=5, process_count=2)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    _train(ListSource(3))
  with pytest.raises(ValueError, match='labels'):
    _train(ListSource(12), balanced=True)
  with pytest.raises(ValueError, match='bogus'):
    _train(ListSource(12), augment_config={'bogus': True})

  class NoLabel(ListSource):

    def __getitem__(self, i):
      return {'image': self.images[i]}

  with pytest.raises(ValueError, match='label'):
    next(_train(NoLabel(12)))


@pytest.mark.parametrize('count', [1, 2, 3])
def test_eval_covers_every_example_once(count):
  source = ListSource(23)  # label = index
  n_batches = ip.num_eval_batches(23, 6)
  assert n_batches == 4
  per_process = [
      list(
          ip.eval_batches(
              source,
              batch_size=6,
              image_size=S,
              process_index=p,
              process_count=count,
          )
      )
      for p in range(count)
  ]
  assert all(len(batches) == n_batches for batches in per_process)
  indices = []
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape == (6 // count, S, S, 3)
      assert batch['mask'].dtype == np.bool_
      assert batch['index'].dtype == np.int64
      real = batch['index'][batch['mask']]
      np.testing.assert_array_equal(batch['label'][batch['mask']], real)
      assert np.all(batch['index'][~batch['mask']] == -1)
      indices.extend(real.tolist())
  assert sorted(indices) == list(range(23))


def test_eval_images_are_the_center_crop():
  source = ListSource(5, shape=(40, 30, 3))
  batch = next(
      ip.eval_batches(source, batch_size=8, image_size=S, crop_ratio=0.875)
  )
  for k in range(5):
    np.testing.assert_array_equal(
        batch['image'][k],
        augment.eval_transform(source.images[k], size=S, crop_ratio=0.875),
    )
  assert np.all(batch['image'][5:] == 0)


def test_num_eval_batches():
  assert ip.num_eval_batches(0, 8) == 0
  assert ip.num_eval_batches(8, 8) == 1
  assert ip.num_eval_batches(9, 8) == 2
  with pytest.raises(ValueError):
    ip.num_eval_batches(9, 0)


class _RealXrays:
  """The shared sample's PNGs, decoded like a TFDS data source would."""

  def __init__(self, paths):
    self.paths = paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with Image.open(self.paths[i]) as img:
      image = np.asarray(img.convert('RGB'))
    label = 0 if '/COVID/' in self.paths[i] else 1
    return {
        'image': image,
        'label': label,
        'id': self.paths[i],
        'patient_id': '',
    }


def test_real_xrays_through_train_and_eval():
  paths = sorted(glob.glob(os.path.join(SAMPLE, '*', '*', 'images', '*.png')))
  if not paths:
    pytest.skip(f'no shared sample data under {SAMPLE}')
  paths = paths[:4] + paths[-4:]  # both classes
  source = _RealXrays(paths)
  batch = next(_train(source, batch_size=8, image_size=64))
  assert batch['image'].shape == (8, 64, 64, 3)
  assert sorted(batch['label'].tolist()) == [0] * 4 + [1] * 4
  assert batch['image'].std() > 10  # real content, not blank
  ev = list(ip.eval_batches(source, batch_size=8, image_size=64))
  assert len(ev) == 1 and ev[0]['mask'].all()


def _fake_data_module(source, calls):
  def find_prepared(data_config):
    calls.append(('find_prepared', data_config.name))
    return 'found-info'

  def get_source(info, split):
    calls.append(('get_source', info, split))
    return source

  return types.SimpleNamespace(
      find_prepared=find_prepared, get_source=get_source
  )


def test_create_iterators_from_typed_config(monkeypatch):
  cfg = DataConfig(image_size=S, balanced_sampler=True)
  source = ListSource(10, classes=2)
  calls = []
  fake = _fake_data_module(source, calls)
  monkeypatch.setitem(sys.modules, 'drpl_jax.data', fake)
  monkeypatch.setattr(drpl_jax, 'data', fake, raising=False)
  # The setup's info is passed down: nothing is looked up again.
  batch = next(
      ip.create_train_iterator(cfg, batch_size=4, seed=0, info='setup-info')
  )
  assert batch['image'].shape == (4, S, S, 3)
  assert calls == [('get_source', 'setup-info', 'train')]
  batches = list(
      ip.create_eval_iterator(
          cfg, 'test', batch_size=8, process_index=0, process_count=2
      )
  )
  assert len(batches) == 2 and batches[0]['image'].shape == (4, S, S, 3)
  assert calls[1:] == [
      ('find_prepared', cfg.name),
      ('get_source', 'found-info', 'test'),
  ]


def test_eval_batches_carry_ids_and_patient_ids():
  source = ListSource(5, classes=2)
  ids = [source[i]['id'] for i in range(5)]
  batches = list(ip.eval_batches(source, batch_size=4, image_size=S))
  got = [str(i) for b in batches for i, m in zip(b['id'], b['mask']) if m]
  assert got == ids
  patients = [str(p) for b in batches for p in b['patient_id']]
  assert patients == [f'p{i // 2}' for i in range(5)] + ['', '', '']
  # Text stays on the host; the numeric entries go to the devices.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  glob = ip.to_global_batch(batches[0], mesh)
  assert set(glob) == {'image', 'label', 'mask', 'index'}


_GLOBAL_BATCH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from drpl_jax.input import pipeline as ip
    assert jax.device_count() == 8, jax.devices()
    batch = {'image': np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(
                 8, 2, 2, 3),
             'label': np.arange(8, dtype=np.int32),
             'mask': np.ones(8, bool),
             'index': np.arange(8, dtype=np.int64) - 1}
    for shape, names in [((4, 2), ('data', 'fsdp')), ((8,), ('data',))]:
      mesh = jax.make_mesh(shape, names)
      out = ip.to_global_batch(batch, mesh)
      for key, x in out.items():
        assert x.shape == batch[key].shape, (key, x.shape)
        expected = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(names))
        assert x.sharding.is_equivalent_to(expected, x.ndim), x.sharding
        np.testing.assert_array_equal(np.asarray(x), batch[key])
        shards = x.addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 1 for s in shards)
    try:
      ip.to_global_batch(batch, jax.make_mesh((8,), ('model',)))
    except ValueError as e:
      assert 'model' in str(e)
    else:
      raise AssertionError('no error for a mesh without data axes')
    print('OK')
""")


def test_to_global_batch_on_8_fake_devices():
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
      JAX_PLATFORMS='cpu',
  )
  result = subprocess.run(
      [sys.executable, '-c', _GLOBAL_BATCH_SCRIPT],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')


def test_input_benchmark_prints_json_without_tensorflow():
  from drpl_jax.bench import input as bench_input  # pylint: disable=g-import-not-at-top

  cmd = [
      sys.executable,
      '-m',
      'drpl_jax.bench',
      'input',
      '--config=configs/drpl_vit.py:variant=micro',
      '--synthetic',
      '--batch_size',
      '8',
      '--steps',
      '2',
      '--warmup',
      '1',
  ]
  result = subprocess.run(
      cmd,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r['pipeline'] for r in records] == ['decode', 'train', 'eval']
  for r in records:
    assert r['benchmark'] == 'input' and r['image_size'] == 224
    assert r['images'] == 16 and r['images_per_s'] > 0
    # A per-core rate only from enough CPU time (ticks are 10 ms), else null.
    if r['cpu_s'] >= bench_input.MIN_CPU_SECONDS:
      assert r['images_per_s_per_core'] > 0
    else:
      assert r['images_per_s_per_core'] is None
    assert r['tensorflow_imported'] is False


def test_bench_dispatch_rejects_unknown_subcommand(capsys):
  # pylint: disable-next=g-import-not-at-top
  from drpl_jax.bench import __main__ as bench_main

  assert bench_main.main(['nope']) == 2
  assert 'input' in capsys.readouterr().err


def test_synthetic_source_protocol():
  # pylint: disable-next=g-import-not-at-top
  from drpl_jax.bench import input as bench_input

  source = bench_input.SyntheticPngSource(5, num_distinct=2)
  ex = source[4]
  assert len(source) == 5
  assert ex['image'].shape == (299, 299, 3) and ex['image'].dtype == np.uint8
  assert 0 <= ex['label'] < 4 and ex['id'] == 'synthetic-4'
  assert ex['image'].std() > 20
  with pytest.raises(IndexError):
    source[5]  # pylint: disable=pointless-statement
