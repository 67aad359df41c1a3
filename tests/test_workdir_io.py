"""Workdir writes go through etils.epath: a gs:// workdir served locally."""

import json
import os

import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from drpl_jax.utils import files

BUCKET = 'gs://bucket'


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs://bucket/... is served from tmp_path/bucket/... for the test."""
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, which
  # mock_epath does not replace: take the mocked backend instead.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  root = tmp_path / 'bucket'
  root.mkdir()

  def local(path):
    text = os.fspath(path)
    # epath may normalise gs:// to gs:/ when it joins paths
    for prefix in (BUCKET + '/', 'gs:/bucket/'):
      if text.startswith(prefix):
        return os.fspath(root / text[len(prefix) :])
    assert not text.startswith('gs:'), text
    return text

  def one(orig, path, *args, **kwargs):
    return orig(local(path), *args, **kwargs)

  def two(orig, path, dst, *args, **kwargs):
    return orig(local(path), local(dst), *args, **kwargs)

  def walk(orig, top, **kwargs):
    yield from orig(local(top), **kwargs)

  single = (
      'exists',
      'glob',
      'isdir',
      'listdir',
      'makedirs',
      'mkdir',
      'open',
      'remove',
      'rmtree',
      'stat',
  )
  mocks = {name: one for name in single}
  mocks.update(copy=two, rename=two, replace=two, walk=walk)
  with epath_testing.mock_epath(**mocks):
    yield root


def test_atomic_write_on_a_gs_workdir(gcs):
  run = epath.Path(BUCKET) / 'run'
  run.mkdir(parents=True)
  assert files.atomic_write(run / 'meta.json', '{"a": 1}').startswith('gs:')
  files.atomic_write(run / 'plot.png', b'\x89PNG')
  assert (gcs / 'run' / 'meta.json').read_text() == '{"a": 1}'
  assert (gcs / 'run' / 'plot.png').read_bytes() == b'\x89PNG'
  assert sorted(os.listdir(gcs / 'run')) == ['meta.json', 'plot.png']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'meta.json'
  path.write_text('old')

  def broken(orig, src, dst):
    del orig, src, dst
    raise OSError('disk full')

  with epath_testing.mock_epath(replace=broken):
    with pytest.raises(OSError, match='disk full'):
      files.atomic_write(path, 'new')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['meta.json']


def test_run_metadata_is_read_from_a_gs_workdir(gcs):
  from drpl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import predict  # pylint: disable=g-import-not-at-top

  run = f'{BUCKET}/run'
  epath.Path(run).mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='gs://bucket/run/meta.json'):
    evaluate.config_from_workdir(run)
  files.atomic_write(
      f'{run}/meta.json',
      '{"config": {"seed": 3}, "data": {"class_names": ["a", "b"]}}',
  )
  assert (gcs / 'run' / 'meta.json').exists()
  assert evaluate.config_from_workdir(run).seed == 3
  assert predict.class_names_from_workdir(run, 2) == ['a', 'b']
  assert files.read_meta(run)['data']['class_names'] == ['a', 'b']


def test_heatmap_png_is_written_to_a_gs_folder(gcs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from drpl_jax.config import base  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import predict  # pylint: disable=g-import-not-at-top

  config = base.drpl_vit('variant=micro,runlocal')
  image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)
  maps = epath.Path(BUCKET) / 'maps'
  maps.mkdir(parents=True)
  predict.save_heatmap(
      image, np.full((8, 8), 0.5), 'x', f'{maps}/x.png', config
  )
  assert (gcs / 'maps' / 'x.png').read_bytes()[:4] == b'\x89PNG'


def test_report_and_plots_are_written_to_a_gs_folder(gcs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import report  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 40)
  probs = metrics.softmax(rng.normal(size=(40, 2)) + 2 * np.eye(2)[labels])
  names = ['COVID', 'Normal']
  values = metrics.classification_metrics(probs, labels, names, n_bootstrap=20)
  out = f'{BUCKET}/run/eval/test'
  written = report.write_report(
      out, values, probs, labels, names, title='gs test'
  )
  local = gcs / 'run' / 'eval' / 'test'
  assert written['json'] == f'{out}/report.json'
  got = json.loads((local / 'report.json').read_text())
  assert got['accuracy'] == values['accuracy']
  assert (local / 'report.md').is_file()
  assert {p.name for p in local.glob('*.png')} >= {'roc.png', 'pr.png'}
  assert not list(gcs.rglob('*.tmp-*'))


def test_sweep_and_reproduce_files_on_a_gs_workdir(gcs):
  from drpl_jax.reproduce import protocol  # pylint: disable=g-import-not-at-top
  from drpl_jax.reproduce import sweep  # pylint: disable=g-import-not-at-top

  results = [
      {
          'index': 0,
          'overrides': {},
          'teacher_val_accuracy': None,
          'seeds': [{}],
          'shortcut_flags': 0,
          'minutes': 0.1,
          'mean': dict.fromkeys(sweep.FIGURES, 0.5),
      }
  ]
  sweep._write(f'{BUCKET}/sweep', results, 'cmd', 'validation')  # pylint: disable=protected-access
  assert (
      json.loads((gcs / 'sweep' / 'sweep.json').read_text())['candidates']
      == results
  )
  assert '| 0 | base |' in (gcs / 'sweep' / 'sweep.md').read_text()
  # A finished candidate is read back from the gs:// workdir, not rerun;
  # its candidate.json is read there too (another candidate is refused).
  import ml_collections  # pylint: disable=g-import-not-at-top

  base = ml_collections.ConfigDict(
      {'seed': 0, 'data': {'eval_split': 'validation', 'test_split': 'test'}}
  )
  done = {'index': 3, 'overrides': {}, 'seeds': [{}]}
  (gcs / 'sweep' / 'candidates' / '3').mkdir(parents=True)
  (gcs / 'sweep' / 'candidates' / '3' / 'result.json').write_text(
      json.dumps(done)
  )
  run = lambda: sweep.run_candidate(
      'unused', base, [], {}, 3, f'{BUCKET}/sweep', None, 1
  )
  assert run() == done
  (gcs / 'sweep' / 'candidates' / '3' / 'candidate.json').write_text(
      json.dumps({'overrides': {'optim.base_lr': 0.1}, 'fingerprint': 'x'})
  )
  with pytest.raises(ValueError, match='candidates/3 holds the runs'):
    run()
  timing = f'{BUCKET}/repro/timings/teacher.json'
  protocol.record(timing, 'teacher', ['python', 'x'], 1.0, 3.5, 0)
  entry = json.loads((gcs / 'repro' / 'timings' / 'teacher.json').read_text())
  assert entry['seconds'] == 2.5


def test_teacher_record_is_read_from_gs(gcs):
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top
  from drpl_jax.utils.errors import UserError  # pylint: disable=g-import-not-at-top

  (gcs / 't.json').write_text('{"arch": "resnet18"}')
  with pytest.raises(UserError, match='resnet18'):
    preflight.check_teacher_arch('resnet50', f'{BUCKET}/t.safetensors')
  preflight.check_teacher_arch('resnet18', f'{BUCKET}/t.safetensors')
