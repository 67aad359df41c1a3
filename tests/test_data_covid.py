"""covid19_radiography: the real sample (subset mode) and synthetic layouts."""

import csv
import io
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from drpl_jax import data
from drpl_jax.data import covid19_radiography as covid

SAMPLE = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    'shared',
    'data',
    'covid19_radiography_sample',
)
DATASET = covid.DATASET_FOLDER


def _png(seed: int, size: int = 40, bits16: bool = False) -> bytes:
  rng = np.random.default_rng(seed)
  if bits16:
    array = rng.integers(0, 4096, (size, size)).astype(np.uint16)
  else:
    array = rng.integers(0, 256, (size, size)).astype(np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _synthetic_files(per_class: int = 10) -> dict[str, bytes]:
  """Relative path -> bytes of a tiny 4-class tree with masks and metadata."""
  files = {}
  for c, name in enumerate(covid.CLASS_NAMES):
    for i in range(per_class):
      image = _png(100 * c + i, bits16=(i == 0))
      files[f'{name}/images/{name}-{i + 1}.png'] = image
      files[f'{name}/masks/{name}-{i + 1}.png'] = _png(7)
    files[f'{name}.metadata.xlsx'] = b'not a spreadsheet'
  files['README.md.txt'] = b'readme'
  return files


def _write_tree(root: str, files: dict[str, bytes]) -> None:
  for rel, content in files.items():
    path = os.path.join(root, *rel.split('/'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(content)


@pytest.fixture(scope='module')
def sample_summary(tmp_path_factory):
  if not os.path.isdir(SAMPLE):
    pytest.skip(f'{SAMPLE} not available')
  data_dir = tmp_path_factory.mktemp('covid_sample')
  return data.prepare(
      'covid19_radiography',
      data_dir=str(data_dir),
      manual_dir=SAMPLE,
      classes=['COVID', 'Normal'],
  )


def test_sample_subset_counts(sample_summary):
  summary = sample_summary
  assert summary['class_names'] == ['COVID', 'Normal']
  assert sum(summary['num_examples'].values()) == 600
  assert summary['num_examples'] == {'train': 480, 'validation': 60, 'test': 60}
  for name in ('COVID', 'Normal'):
    assert {
        s: summary['examples_per_class'][s][name]
        for s in ('train', 'validation', 'test')
    } == {'train': 240, 'validation': 30, 'test': 30}
  assert summary['num_skipped'] == 0 and summary['patients'] is None


def test_sample_splits_csv_and_ids(sample_summary):
  with open(sample_summary['splits_csv']) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 600
  root = os.path.join(SAMPLE, DATASET)
  for row in rows:
    assert row['id'].startswith(f'{row["label"]}/images/{row["label"]}-')
    assert os.path.isfile(os.path.join(root, row['id']))
  assert len({r['id'] for r in rows}) == 600


def test_sample_source_matches_original(sample_summary):
  source = data.Source(
      sample_summary['data_dir'], 'validation', sample_summary['class_names']
  )
  example = source[0]
  assert example['image'].shape == (224, 224, 3)
  original = data.decode_image(
      open(os.path.join(SAMPLE, DATASET, example['id']), 'rb').read()
  )
  np.testing.assert_array_equal(example['image'], original)
  assert source.class_names[example['label']] == example['id'].split('/')[0]


def test_sample_without_subset_names_missing_class(tmp_path):
  if not os.path.isdir(SAMPLE):
    pytest.skip(f'{SAMPLE} not available')
  with pytest.raises(
      data.DataError,
      match='class folder Lung_Opacity/images '
      'not found.*classes=COVID,Normal',
  ):
    data.prepare(
        'covid19_radiography', data_dir=str(tmp_path), manual_dir=SAMPLE
    )
  assert not os.listdir(tmp_path)  # Validated before any work.


def test_zip_nested_twice_with_masks(tmp_path):
  archive = tmp_path / 'manual' / 'archive.zip'
  archive.parent.mkdir()
  with zipfile.ZipFile(archive, 'w') as zf:
    for rel, content in _synthetic_files().items():
      zf.writestr(f'{DATASET}/{DATASET}/{rel}', content)
  summary = data.prepare(
      'covid19_radiography',
      data_dir=str(tmp_path / 'd'),
      manual_dir=str(archive.parent),
  )
  assert summary['class_names'] == list(covid.CLASS_NAMES)
  for split, n in (('train', 8), ('validation', 1), ('test', 1)):
    assert summary['examples_per_class'][split] == dict.fromkeys(
        covid.CLASS_NAMES, n
    )
  with open(summary['splits_csv']) as f:
    ids = {r['id'] for r in csv.DictReader(f)}
  assert 'Viral Pneumonia/images/Viral Pneumonia-3.png' in ids
  assert not any('masks' in i for i in ids) and len(ids) == 40
  source = data.Source(summary['data_dir'], 'train', summary['class_names'])
  assert source[0]['image'].shape == (40, 40, 3)


@pytest.mark.parametrize('layout', ['dataset', 'parent', 'nested', 'zipfile'])
def test_locate_layouts(tmp_path, layout):
  files = _synthetic_files(per_class=1)
  if layout == 'dataset':
    _write_tree(str(tmp_path / DATASET), files)
    manual_dir = tmp_path / DATASET
  elif layout == 'parent':
    _write_tree(str(tmp_path / DATASET), files)
    manual_dir = tmp_path
  elif layout == 'nested':
    _write_tree(str(tmp_path / DATASET / DATASET), files)
    manual_dir = tmp_path
  else:
    manual_dir = tmp_path / 'covid.zip'
    with zipfile.ZipFile(manual_dir, 'w') as zf:
      for rel, content in files.items():
        zf.writestr(f'{DATASET}/{rel}', content)
  tree, root = covid.locate(str(manual_dir), covid.CLASS_NAMES)
  assert tree.is_dir(
      f'{root}/Viral Pneumonia/images' if root else 'Viral Pneumonia/images'
  )
  assert (
      tree.ref(
          f'{root}/COVID/images/COVID-1.png'
          if root
          else 'COVID/images/COVID-1.png'
      ).read()
      == files['COVID/images/COVID-1.png']
  )


def test_errors_before_work(tmp_path):
  manual = tmp_path / 'manual'
  files = _synthetic_files(per_class=1)
  _write_tree(str(manual / DATASET), files)
  os.remove(manual / DATASET / 'Normal' / 'images' / 'Normal-1.png')
  data_dir = tmp_path / 'd'
  with pytest.raises(data.DataError, match='Normal/images has no images'):
    data.prepare(
        'covid19_radiography', data_dir=str(data_dir), manual_dir=str(manual)
    )
  with pytest.raises(data.DataError, match=r"unknown classes \['Covid'\]"):
    data.prepare(
        'covid19_radiography',
        data_dir=str(data_dir),
        manual_dir=str(manual),
        classes=['Covid'],
    )
  with pytest.raises(data.DataError, match='does not exist'):
    data.prepare(
        'covid19_radiography',
        data_dir=str(data_dir),
        manual_dir=str(tmp_path / 'missing'),
    )
  with pytest.raises(data.DataError, match='no `<class>/images/` folders'):
    data.prepare(
        'covid19_radiography',
        data_dir=str(data_dir),
        manual_dir=str(data_dir.parent / 'manual' / DATASET / 'COVID'),
    )
  assert not data_dir.exists() or not any(data_dir.rglob('*.array_record*'))
