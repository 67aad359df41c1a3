"""Export: StableHLO with a symbolic batch, TF SavedModel, metadata, CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_demo_config
from drpl_jax.evaluation import export
from drpl_jax.evaluation import predict
from drpl_jax.train import loop as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run(demo_data_dir, tmp_path_factory):
  """A demo model trained for 2 steps; (workdir, restored model)."""
  # Half the micro depth: half the compile time.
  config = tiny_demo_config(demo_data_dir, 2, **{'model.depth': 2})
  workdir = str(tmp_path_factory.mktemp('export_run'))
  train.train_and_evaluate(config, workdir)
  return workdir, predict.restore_model(workdir)


def _reference(restored, images):
  """The JAX model's probabilities (float images are in [0, 1])."""
  model = restored.model()
  cfg = restored.config
  x = (
      np.asarray(images, np.float32)
      / (255.0 if images.dtype == np.uint8 else 1.0)
      - np.asarray(cfg.data.mean, np.float32)
  ) / np.asarray(cfg.data.std, np.float32)
  forward = jax.jit(lambda x: jax.nn.softmax(model(x, train=False), axis=-1))
  return np.asarray(forward(x))


def _images(batch, dtype='uint8', seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, 32, 32, 3), np.uint8)
  return images if dtype == 'uint8' else (images / 255.0).astype(np.float32)


def test_stablehlo_reloads_and_serves_any_batch(run, tmp_path):
  workdir, restored = run
  out = str(tmp_path / 'export')
  metadata = export.export_model(workdir, out)
  assert sorted(os.listdir(out)) == ['metadata.json', 'model.stablehlo']
  with open(os.path.join(out, 'model.stablehlo'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert str(exported.in_avals[0].shape[0]) == 'b'  # symbolic batch
  assert set(exported.platforms) == {'cpu', 'cuda', 'tpu'}
  fn = export.load_stablehlo(out)
  for batch in (1, 5):
    images = _images(batch, seed=batch)
    probs = np.asarray(fn(images))
    assert probs.shape == (batch, 10)
    np.testing.assert_allclose(probs, _reference(restored, images), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(exported.call(images)), probs, atol=1e-7
    )

  with open(os.path.join(workdir, 'meta.json')) as f:
    meta = json.load(f)
  with open(os.path.join(out, 'metadata.json')) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(metadata))
  assert on_disk['class_names'] == meta['data']['class_names']
  assert on_disk['config_hash'] == meta['config_hash']
  assert on_disk['checkpoint_step'] == 2
  assert on_disk['image_size'] == 32
  assert on_disk['input_dtype'] == 'uint8'
  assert on_disk['mean'] == [0.5, 0.5, 0.5]
  assert on_disk['std'] == [0.5, 0.5, 0.5]
  assert on_disk['input_shape'] == ['b', 32, 32, 3]


def test_float_input_export(run):
  _, restored = run
  exported = export.export_stablehlo(
      restored, input_dtype='float32', platforms=('cpu',)
  )
  images = _images(3, 'float32', seed=7)
  np.testing.assert_allclose(
      np.asarray(exported.call(images)), _reference(restored, images), atol=1e-5
  )
  # The same pixels as uint8 give the same probabilities.
  np.testing.assert_allclose(
      np.asarray(exported.call(images)),
      _reference(restored, _images(3, seed=7)),
      atol=1e-5,
  )


def test_load_stablehlo_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='export first'):
    export.load_stablehlo(str(tmp_path))
  bogus = tmp_path / 'model.stablehlo'
  bogus.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='not a jax.export serialization'):
    export.load_stablehlo(str(bogus))
  _, restored = run
  exported = export.export_stablehlo(restored, platforms=('cpu',))
  bogus.write_bytes(exported.serialize())
  fn = export.load_stablehlo(str(bogus))
  with pytest.raises(ValueError, match=r'expected images uint8 \[b, 32, 32'):
    fn(_images(2, 'float32'))
  with pytest.raises(ValueError, match='got uint8 \\[2, 16, 16, 3\\]'):
    fn(np.zeros((2, 16, 16, 3), np.uint8))


def test_bad_arguments_are_named(run, tmp_path):
  workdir, _ = run
  with pytest.raises(ValueError, match='onnx'):
    export.export_model(workdir, str(tmp_path), formats=('onnx',))
  with pytest.raises(ValueError, match='float16'):
    export.export_model(workdir, str(tmp_path), input_dtype='float16')
  with pytest.raises(FileNotFoundError, match='meta.json'):
    export.export_model(str(tmp_path / 'nowhere'), str(tmp_path / 'o'))


def test_cli(run, tmp_path):
  """`python -m drpl_jax.export`: absl flags; bad input one `error:` line
  and exit 2."""
  workdir, _ = run
  out = str(tmp_path / 'cli')
  command = [
      sys.executable,
      '-m',
      'drpl_jax.export',
      '--workdir',
      workdir,
      '--out',
      out,
  ]
  env = dict(os.environ, PYTHONPATH=ROOT)
  ok = subprocess.run(
      command + ['--step', '2', '--platforms', 'cpu'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  printed = json.loads(ok.stdout.strip().splitlines()[-1])
  assert printed['out'] == out and printed['platforms'] == ['cpu']
  assert os.path.isfile(os.path.join(out, 'model.stablehlo'))
  bad = subprocess.run(
      command + ['--step', '5'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert bad.returncode == 2
  assert (
      bad.stderr.strip()
      .splitlines()[-1]
      .startswith('error: no checkpoint for step 5')
  )


def test_export_module_does_not_import_tensorflow():
  code = (
      'import sys, drpl_jax.evaluation.export, drpl_jax.evaluation.predict; '
      'print("tensorflow" in sys.modules)'
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=ROOT,
      check=True,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.stdout.strip() == 'False'


def test_savedmodel_matches(run, tmp_path):
  tf = pytest.importorskip('tensorflow')
  workdir, restored = run
  out = str(tmp_path / 'both')
  metadata = export.export_model(
      workdir, out, formats='both', platforms=('cpu',)
  )
  assert metadata['files'] == {
      'stablehlo': 'model.stablehlo',
      'savedmodel': 'savedmodel',
  }
  assert tf.config.get_visible_devices('GPU') == []
  loaded = tf.saved_model.load(os.path.join(out, 'savedmodel'))
  serve = loaded.signatures['serving_default']
  for batch in (2, 3):
    images = _images(batch, seed=10 + batch)
    probs = serve(images=tf.constant(images))['probabilities'].numpy()
    assert probs.shape == (batch, 10)
    np.testing.assert_allclose(probs, _reference(restored, images), atol=1e-4)
