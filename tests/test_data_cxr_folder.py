"""cxr_folder: class folders, manifests, patient grouping, bad images."""

import collections
import csv
import io
import os

import numpy as np
import PIL.Image
import pytest

from drpl_jax import data


def _save(path, array, fmt='PNG', mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = PIL.Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  image.save(path, format=fmt)


def _gray(seed, size=40):
  return (
      np.random.default_rng(seed)
      .integers(0, 256, (size, size))
      .astype(np.uint8)
  )


def _write_manifest(path, rows, columns):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows(rows)


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_folder_layout_with_images_subfolder(tmp_path):
  manual = tmp_path / 'cxr'
  for i in range(10):
    _save(str(manual / 'pneumonia' / f'p{i}.png'), _gray(i))
    _save(
        str(manual / 'normal' / 'images' / f'n{i}.jpg'),
        _gray(50 + i),
        fmt='JPEG',
    )
    _save(str(manual / 'normal' / 'masks' / f'n{i}.png'), _gray(0))
  (manual / 'normal' / 'images' / 'notes.txt').write_text('x')
  summary = data.prepare(
      'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(manual)
  )
  assert summary['class_names'] == ['normal', 'pneumonia']  # sorted
  assert summary['num_examples'] == {'train': 16, 'validation': 2, 'test': 2}
  assert summary['num_ignored'] == 1
  assert summary['ignored_examples'] == ['normal/images/notes.txt']
  ids = {r['id']: r['label'] for r in _read_csv(summary['splits_csv'])}
  assert ids['normal/images/n3.jpg'] == 'normal'
  assert ids['pneumonia/p3.png'] == 'pneumonia'
  assert not any('masks' in i for i in ids)
  # classes= fixes the order and selects a subset; own prepared folder.
  subset = data.prepare(
      'cxr_folder',
      data_dir=str(tmp_path / 'd'),
      manual_dir=str(manual),
      classes=['pneumonia'],
  )
  assert subset['class_names'] == ['pneumonia']
  assert subset['data_dir'] != summary['data_dir']
  assert sum(subset['num_examples'].values()) == 10
  other = tmp_path / 'cxr2'
  _save(str(other / 'normal' / 'x.png'), _gray(1))
  assert (
      data.prepared_dir(
          'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(other)
      )
      != summary['data_dir']
  )
  with pytest.raises(data.DataError, match=r"unknown classes \['covid'\]"):
    data.prepare(
        'cxr_folder',
        data_dir=str(tmp_path / 'd'),
        manual_dir=str(manual),
        classes=['covid'],
    )


def test_manifest_patients_never_in_two_splits(tmp_path):
  manual = tmp_path / 'cxr'
  rng = np.random.default_rng(0)
  rows = []
  for patient in range(120):
    label = ['covid', 'normal', 'other'][patient % 3]
    for k in range(int(rng.integers(1, 4))):
      path = f'img/{patient}_{k}.png'
      _save(str(manual / path), _gray(patient * 10 + k, size=32))
      rows.append((path, label, f'P{patient:03d}'))
  _write_manifest(
      manual / 'manifest.csv', rows, ['path', 'label', 'patient_id']
  )
  summary = data.prepare(
      'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(manual)
  )
  assert summary['split_method'] == 'grouped by patient'
  assert sum(summary['patients'].values()) == 120
  out = _read_csv(summary['splits_csv'])
  assert len(out) == len(rows)
  splits_of = collections.defaultdict(set)
  for row in out:
    splits_of[row['patient_id']].add(row['split'])
  assert len(splits_of) == 120
  assert all(len(s) == 1 for s in splits_of.values())
  assert all(summary['num_examples'][s] > 0 for s in summary['num_examples'])
  # Stratified as far as groups allow: every class is in every split.
  for split, per_class in summary['examples_per_class'].items():
    assert all(n > 0 for n in per_class.values()), (split, per_class)
  source = data.Source(summary['data_dir'], 'test', summary['class_names'])
  patient = source[0]['patient_id']
  assert patient.startswith('P') and splits_of[patient] == {'test'}


def test_manifest_split_respected_and_missing_file_skipped(tmp_path):
  manual = tmp_path / 'cxr'
  rows = []
  for i in range(12):
    _save(str(manual / f'{i}.png'), _gray(i))
    rows.append((f'{i}.png', 'ab'[i % 2], ['train', 'val', 'test'][i % 3]))
  rows.append(('gone.png', 'a', 'train'))
  _write_manifest(manual / 'manifest.csv', rows, ['path', 'label', 'split'])
  summary = data.prepare(
      'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(manual)
  )
  assert summary['split_method'] == 'manifest'
  expected = {
      f'{i}.png': ['train', 'validation', 'test'][i % 3] for i in range(12)
  }
  got = {r['id']: r['split'] for r in _read_csv(summary['splits_csv'])}
  assert got == expected
  assert summary['num_skipped'] == 1
  skipped = summary['skipped'][0]
  assert skipped['path'].endswith('gone.png')
  assert (
      'file not found' in skipped['reason'] and 'line 14' in skipped['reason']
  )


def test_manifest_errors_named(tmp_path):
  manual = tmp_path / 'cxr'
  _save(str(manual / 'x.png'), _gray(0))
  data_dir = str(tmp_path / 'd')
  _write_manifest(
      manual / 'manifest.csv', [('x.png', 'tumour')], ['path', 'label']
  )
  with pytest.raises(
      data.DataError,
      match=r"line 2: label 'tumour' is not "
      r"one of the classes \['a', 'b'\]",
  ):
    data.prepare(
        'cxr_folder',
        data_dir=data_dir,
        manual_dir=str(manual),
        classes=['a', 'b'],
    )
  _write_manifest(manual / 'manifest.csv', [('x.png',)], ['path'])
  with pytest.raises(
      data.DataError, match=r"manifest.csv: missing column\(s\) \['label'\]"
  ):
    data.prepare('cxr_folder', data_dir=data_dir, manual_dir=str(manual))
  _write_manifest(
      manual / 'manifest.csv',
      [('x.png', 'a', 'holdout')],
      ['path', 'label', 'split'],
  )
  with pytest.raises(data.DataError, match="line 2: unknown split 'holdout'"):
    data.prepare('cxr_folder', data_dir=data_dir, manual_dir=str(manual))
  _write_manifest(
      manual / 'manifest.csv',
      [('x.png', 'a'), ('x.png', 'a')],
      ['path', 'label'],
  )
  with pytest.raises(data.DataError, match="id 'x.png' occurs twice"):
    data.prepare('cxr_folder', data_dir=data_dir, manual_dir=str(manual))


def test_folder_errors_named(tmp_path):
  data_dir = str(tmp_path / 'd')
  with pytest.raises(
      data.DataError, match='manual_dir .*nowhere does not exist'
  ):
    data.prepare(
        'cxr_folder', data_dir=data_dir, manual_dir=str(tmp_path / 'nowhere')
    )
  manual = tmp_path / 'cxr'
  _save(str(manual / 'a' / '1.png'), _gray(1))
  (manual / 'b').mkdir()
  with pytest.raises(
      data.DataError, match=r'class folder .*cxr/b has no images'
  ):
    data.prepare('cxr_folder', data_dir=data_dir, manual_dir=str(manual))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError, match='no class folders'):
    data.prepare(
        'cxr_folder', data_dir=data_dir, manual_dir=str(tmp_path / 'empty')
    )
  assert not os.path.exists(data_dir)


def _bad_files(folder) -> dict[str, str]:
  """Writes every kind of bad image; returns file name -> expected reason."""
  good = io.BytesIO()
  PIL.Image.fromarray(_gray(3, size=64)).save(good, format='PNG')
  jpeg = io.BytesIO()
  PIL.Image.fromarray(_gray(4, size=64)).save(jpeg, format='JPEG')
  contents = {
      'zero.png': b'',
      'text.png': b'this is not an image',
      'corrupt.png': b'\x89PNG\r\n\x1a\n' + os.urandom(200),
      'truncated.png': good.getvalue()[: len(good.getvalue()) // 2],
      'truncated.jpg': jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
  }
  for name, content in contents.items():
    (folder / name).write_bytes(content)
  _save(str(folder / 'small.png'), _gray(5, size=16))
  return {
      'zero.png': 'empty file',
      'text.png': 'not an image',
      'corrupt.png': 'not an image',
      'truncated.png': 'truncated',
      'truncated.jpg': 'truncated',
      'small.png': '16x16 is smaller than the minimum side 32',
  }


def test_every_bad_image_skipped_with_reason(tmp_path):
  manual = tmp_path / 'cxr'
  good = manual / 'good'
  _save(str(good / 'gray8.png'), _gray(0))
  sixteen = np.zeros((40, 40), np.uint16)
  sixteen[0, 0] = 4095  # 12-bit data in a 16-bit PNG
  sixteen[1, 1] = 2048
  _save(str(good / 'gray16.png'), sixteen)
  _save(str(good / 'rgba.png'), np.dstack([_gray(1)] * 3 + [_gray(2)]))
  _save(str(good / 'palette.png'), np.dstack([_gray(1)] * 3), mode='P')
  _save(str(good / 'photo.jpg'), _gray(6), fmt='JPEG')
  for i in range(5):
    _save(str(manual / 'bad' / f'ok{i}.png'), _gray(10 + i))
  expected = _bad_files(manual / 'bad')
  summary = data.prepare(
      'cxr_folder', data_dir=str(tmp_path / 'd'), manual_dir=str(manual)
  )
  reasons = {
      os.path.basename(s['path']): s['reason'] for s in summary['skipped']
  }
  assert set(reasons) == set(expected)
  for name, reason in expected.items():
    assert reason in reasons[name], (name, reasons[name])
  assert summary['num_skipped'] == len(expected)
  assert sum(summary['num_examples'].values()) == 10
  images = {}
  for split in ('train', 'validation', 'test'):
    if summary['num_examples'][split]:
      source = data.Source(summary['data_dir'], split, summary['class_names'])
      images.update(
          {source[i]['id']: source[i]['image'] for i in range(len(source))}
      )
  assert all(
      im.dtype == np.uint8 and im.shape == (40, 40, 3) for im in images.values()
  )
  gray16 = images['good/gray16.png']
  assert gray16[0, 0].tolist() == [255, 255, 255]
  assert gray16[1, 1, 0] == round(2048 * 255 / 4095)
  np.testing.assert_array_equal(images['good/rgba.png'][..., 0], _gray(1))
