"""Prediction on single images: rollout maths, DICOM, heatmaps, end to end."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import PIL.Image
import pytest

from conftest import tiny_demo_config, write_dicom
from drpl_jax import cli
from drpl_jax.evaluation import predict
from drpl_jax.evaluation import rollout
from drpl_jax.input import pipeline as input_pipeline
from drpl_jax.train import loop as train
from drpl_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE = os.path.join(
    os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ),
    'shared',
    'data',
    'covid19_radiography_sample',
    'COVID-19_Radiography_Dataset',
    'COVID',
    'images',
)


# ----------------------------------------------------------------------------
# Attention rollout on hand-made attention matrices.


def _layers(matrix, num_layers, batch=2, heads=3):
  """The same [L, L] attention in every head, batch entry and layer."""
  a = np.broadcast_to(matrix, (batch, heads) + matrix.shape)
  return [a.copy() for _ in range(num_layers)]


@pytest.mark.parametrize('prefix', [1, 2])
def test_identity_attention_gives_uniform_map(prefix):
  n = prefix + 3 * 4
  maps = rollout.attention_rollout(_layers(np.eye(n), 3), prefix, (3, 4))
  assert maps.shape == (2, 3, 4)
  # The prefix tokens never look at a patch: every patch gets the same (0).
  np.testing.assert_allclose(maps, 0.0, atol=1e-12)


def test_uniform_attention_gives_uniform_positive_map():
  n = 2 + 9
  maps = rollout.attention_rollout(_layers(np.full((n, n), 1.0 / n), 4), 2, 3)
  assert maps.shape == (2, 3, 3)
  assert maps.min() > 0
  np.testing.assert_allclose(maps, maps[0, 0, 0], rtol=1e-12)


@pytest.mark.parametrize('prefix', [1, 2])
def test_attention_on_one_patch_concentrates_the_map(prefix):
  grid, k, depth = (3, 3), 5, 4
  n = prefix + 9
  attn = np.zeros((n, n))
  attn[:, prefix + k] = 1.0  # every token attends only to patch k
  maps = rollout.attention_rollout(_layers(attn, depth), prefix, grid)
  flat = maps.reshape(2, -1)
  # Per layer, A_hat = (A + I) / 2: the prefix row keeps half of itself and
  # moves half to patch k, whose row stays on k. After `depth` layers the
  # prefix rows put 1 - 2**-depth on k and nothing on any other patch.
  np.testing.assert_allclose(flat[:, k], 1 - 0.5**depth)
  np.testing.assert_allclose(np.delete(flat, k, axis=1), 0.0, atol=1e-12)
  assert np.unravel_index(np.argmax(maps[0]), grid) == (1, 2)


def test_rollout_rows_sum_to_one():
  rng = np.random.default_rng(0)
  n = 2 + 16
  attentions = []
  for _ in range(5):
    logits = rng.normal(size=(3, 4, n, n))
    attentions.append(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  joint = rollout.rollout_matrix(attentions)
  assert joint.shape == (3, n, n)
  np.testing.assert_allclose(joint.sum(-1), 1.0, rtol=1e-12)
  assert joint.min() >= 0


def test_rollout_composes_layers_in_order():
  # Layer 1: patch a attends to patch b. Layer 2: cls attends to patch a.
  # Information flows b -> a -> cls, so b must appear in the cls row; in the
  # opposite order (a bug) it would not.
  n, a, b = 1 + 4, 1 + 0, 1 + 3
  first, second = np.eye(n), np.eye(n)
  first[a] = 0
  first[a, b] = 1.0
  second[0] = 0
  second[0, a] = 1.0
  maps = rollout.attention_rollout(
      [
          np.broadcast_to(first, (1, 1, n, n)),
          np.broadcast_to(second, (1, 1, n, n)),
      ],
      1,
      (2, 2),
  ).reshape(-1)
  # cls row = 0.5 e_cls + 0.5 (0.5 e_a + 0.5 e_b).
  np.testing.assert_allclose(maps, [0.25, 0.0, 0.0, 0.25])


def test_rollout_averages_both_prefix_tokens():
  n = 2 + 4
  attn = np.eye(n)
  attn[0] = 0
  attn[0, 2 + 1] = 1.0  # cls -> patch 1
  attn[1] = 0
  attn[1, 2 + 2] = 1.0  # dist -> patch 2
  maps = rollout.attention_rollout([attn[None, None]], 2, 2).reshape(-1)
  np.testing.assert_allclose(maps, [0.0, 0.25, 0.25, 0.0])


def test_rollout_averages_heads():
  n = 1 + 2
  h0, h1 = np.eye(n), np.eye(n)
  h0[0] = [0, 1, 0]
  h1[0] = [0, 0, 1]
  maps = rollout.attention_rollout([np.stack([h0, h1])[None]], 1, (1, 2))
  np.testing.assert_allclose(maps.reshape(-1), [0.25, 0.25])


def test_rollout_rejects_bad_input():
  with pytest.raises(ValueError, match='at least one layer'):
    rollout.attention_rollout([], 1, 2)
  with pytest.raises(ValueError, match=r'\[B, heads, L, L\]'):
    rollout.attention_rollout([np.ones((2, 5, 5))], 1, 2)
  with pytest.raises(ValueError, match='2 prefix tokens'):
    rollout.attention_rollout([np.ones((1, 1, 5, 5)) / 5], 2, 2)
  with pytest.raises(ValueError, match='layer 1'):
    rollout.attention_rollout(
        [np.ones((1, 1, 5, 5)), np.ones((2, 1, 5, 5))], 1, 2
    )


# ----------------------------------------------------------------------------
# DICOM.


def _ds(**attrs):
  base = dict(PhotometricInterpretation='MONOCHROME2')
  base.update(attrs)
  return types.SimpleNamespace(**base)


def test_dicom_rescale_and_linear_window():
  # value = 2 * stored - 100; window centre 100.5, width 101 maps
  # [50, 150] linearly onto [0, 1] (DICOM PS3.3 C.11.2.1.2.1).
  stored = np.array([[0, 75, 100], [125, 200, 87]], np.uint16)
  out = predict.dicom_to_rgb(
      stored,
      _ds(
          RescaleSlope='2',
          RescaleIntercept='-100',
          WindowCenter=[100.5, 40],
          WindowWidth=[101, 400],
      ),
  )
  assert out.shape == (2, 3, 3) and out.dtype == np.uint8
  gray = out[..., 0]
  np.testing.assert_array_equal(out[..., 1], gray)
  assert gray[0, 0] == 0 and gray[0, 1] == 0  # at or below the window
  assert gray[0, 2] == 128  # the centre: 0.5
  assert gray[1, 0] == 255 and gray[1, 1] == 255
  assert gray[1, 2] == round(0.24 * 255)  # value 74


def test_dicom_monochrome1_is_inverted():
  stored = np.array([[0, 1000], [250, 1000]], np.uint16)
  mono2 = predict.dicom_to_rgb(stored, _ds())[..., 0]
  mono1 = predict.dicom_to_rgb(
      stored, _ds(PhotometricInterpretation='MONOCHROME1')
  )[..., 0]
  np.testing.assert_array_equal(mono2, [[0, 255], [64, 255]])  # min-max
  np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_dicom_window_functions():
  values = np.array([-10.0, 0.0, 10.0])
  np.testing.assert_allclose(
      predict.window(values, 0.0, 20.0, 'LINEAR_EXACT'), [0.0, 0.5, 1.0]
  )
  sig = predict.window(values, 0.0, 20.0, 'SIGMOID')
  assert sig[1] == 0.5 and 0 < sig[0] < 0.5 < sig[2] < 1
  with pytest.raises(ValueError, match='VOILUTFunction'):
    predict.window(values, 0.0, 20.0, 'CUBIC')


def test_dicom_multiframe_rejected():
  with pytest.raises(predict.ImageError, match='one grayscale frame'):
    predict.dicom_to_rgb(np.zeros((2, 4, 4), np.uint16), _ds(), path='x.dcm')


def test_dicom_without_pydicom_names_the_install(tmp_path, monkeypatch):
  path = tmp_path / 'scan.dcm'
  path.write_bytes(b'\0' * 128 + b'DICM' + b'\0' * 16)
  monkeypatch.setitem(sys.modules, 'pydicom', None)  # import fails
  with pytest.raises(predict.ImageError, match='pip install pydicom') as e:
    predict.read_image(str(path))
  assert str(path) in str(e.value)


def test_dicom_file_round_trip(tmp_path):
  pydicom = pytest.importorskip('pydicom')
  stored = np.zeros((40, 48), np.uint16)
  stored[:, 24:] = 4095  # 12-bit
  stored[:20, :8] = 2048
  path = str(tmp_path / 'chest')  # no extension: found by the DICM magic
  write_dicom(
      path,
      stored,
      'MONOCHROME1',
      bits_stored=12,
      RescaleSlope=1,
      RescaleIntercept=0,
      WindowCenter=2048.5,
      WindowWidth=4096,
  )
  assert pydicom.dcmread(path).PhotometricInterpretation == 'MONOCHROME1'
  out = predict.read_image(path)
  assert out.shape == (40, 48, 3) and out.dtype == np.uint8
  assert out[0, 30, 0] == 0  # the maximum is black in MONOCHROME1
  assert out[30, 0, 0] == 255  # zero is white
  assert out[0, 0, 0] == 128  # the window centre is mid grey


# ----------------------------------------------------------------------------
# Reading images and drawing heatmaps.


def test_read_image_formats_and_errors(tmp_path):
  values = np.linspace(0, 4095, 40 * 48).reshape(40, 48).astype(np.uint16)
  PIL.Image.fromarray(values).save(tmp_path / 'x16.png')
  out = predict.read_image(str(tmp_path / 'x16.png'))
  assert out.shape == (40, 48, 3) and out.max() == 255 and out.min() == 0
  rgb = np.full((40, 48, 3), 90, np.uint8)
  PIL.Image.fromarray(rgb).save(tmp_path / 'x.jpg', quality=95)
  assert (
      np.abs(predict.read_image(str(tmp_path / 'x.jpg')).astype(int) - 90).max()
      <= 2
  )
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
  for name, reason in [
      ('bad.png', 'not an image|corrupt'),
      ('missing.png', 'cannot read file'),
      ('.', 'is a directory'),
  ]:
    path = str(tmp_path / name)
    with pytest.raises(predict.ImageError, match=reason) as e:
      predict.read_image(path)
    assert e.value.path == path


def test_overlay_puts_hot_colours_on_the_hot_patch():
  view = np.full((64, 64, 3), 128, np.uint8)
  heat = np.zeros((4, 4))
  heat[0, 0] = 1.0
  out = predict.overlay_heatmap(view, heat)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  hot, cold = out[4, 4].astype(int), out[60, 60].astype(int)
  assert hot[0] > hot[2] + 50  # red over the hot patch (jet)
  assert cold[2] > cold[0] + 50  # blue far from it
  # A constant map is not an error: one colour everywhere.
  flat = predict.overlay_heatmap(view, np.full((4, 4), 0.3))
  assert (flat == flat[0, 0]).all()


# ----------------------------------------------------------------------------
# End to end on a briefly trained demo run.


@pytest.fixture(scope='module')
def run(demo_data_dir, tmp_path_factory):
  """A demo model trained for 2 steps; (workdir, config)."""
  # Half the micro depth: half the compile time.
  config = tiny_demo_config(demo_data_dir, 2, **{'model.depth': 2})
  workdir = str(tmp_path_factory.mktemp('predict_run'))
  train.train_and_evaluate(config, workdir)
  return workdir, config


def _test_image(config, index=0):
  """(source image, its eval-pipeline view) of a demo test example."""
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  source = data.get_source(config.data, 'test')
  batch = next(
      input_pipeline.create_eval_iterator(
          input_pipeline.DataConfig.from_config(config.data),
          'test',
          batch_size=config.eval_batch_size,
      )
  )
  assert batch['index'][index] == index
  return source[index]['image'], batch['image'][index]


def test_preprocess_matches_the_eval_pipeline(run, tmp_path):
  _, config = run
  image, expected = _test_image(config, 3)
  path = str(tmp_path / 'digit.png')
  PIL.Image.fromarray(image).save(path)
  view = predict.preprocess(predict.read_image(path), config)
  np.testing.assert_array_equal(view, expected)


def test_predict_images_probabilities_and_heatmaps(run, tmp_path):
  workdir, config = run
  image, view = _test_image(config, 0)
  os.makedirs(tmp_path / 'a')
  paths = [
      str(tmp_path / 'digit.png'),
      str(tmp_path / 'broken.png'),
      str(tmp_path / 'a' / 'digit.png'),
  ]
  PIL.Image.fromarray(image).save(paths[0])
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  PIL.Image.fromarray(image).save(paths[2])
  xray = os.path.join(SAMPLE, 'COVID-1004.png')
  if os.path.exists(xray):
    paths.append(xray)
  out_dir = str(tmp_path / 'heat')
  results = predict.predict_images(workdir, paths, heatmap_dir=out_dir)
  assert [r['path'] for r in results] == paths
  assert results[1] == {
      'path': paths[1],
      'error': 'not an image (unrecognised format)',
  }

  # The probabilities are the model's own on the eval view of the image.
  restored = predict.restore_model(workdir)
  model = restored.model()
  x = step_lib.normalize(view[None], config.data.mean, config.data.std)
  mean = np.asarray(jax.nn.softmax(model(x, train=False)))[0]
  cls, dist = (np.asarray(jax.nn.softmax(h))[0] for h in model.heads(x))
  names = restored.class_names
  assert names == [str(i) for i in range(10)]
  first = results[0]
  np.testing.assert_allclose(
      [first['probabilities'][n] for n in names], mean, atol=1e-5
  )
  np.testing.assert_allclose(
      [first['heads']['cls'][n] for n in names], cls, atol=1e-5
  )
  np.testing.assert_allclose(
      [first['heads']['dist'][n] for n in names], dist, atol=1e-5
  )
  assert first['predicted'] == names[int(np.argmax(mean))]
  assert first['probability'] == max(first['probabilities'].values())
  assert first['step'] == 2 and first['weights'] == 'params'

  heatmaps = [r['heatmap'] for r in results if 'heatmap' in r]
  assert len(heatmaps) == len(paths) - 1
  assert len(set(heatmaps)) == len(heatmaps)  # same stem, two files
  assert os.path.basename(heatmaps[0]) == 'digit_rollout.png'
  for path in heatmaps:
    with PIL.Image.open(path) as img:
      assert img.format == 'PNG' and min(img.size) > 100
  for r in results[3:]:  # a 224 px RGB radiograph through a 32 px model
    assert abs(sum(r['probabilities'].values()) - 1) < 1e-5


def test_predict_rejects_missing_ema(run):
  workdir, _ = run
  with pytest.raises(ValueError, match='no EMA weights'):
    predict.restore_model(workdir, use_ema=True)


def test_cli_prints_json_lines_and_fails_on_bad_images(run, tmp_path, capsys):
  workdir, config = run
  image, _ = _test_image(config, 1)
  good = str(tmp_path / 'one.png')
  PIL.Image.fromarray(image).save(good)
  bad = str(tmp_path / 'scan.dcm')
  with open(bad, 'wb') as f:
    f.write(b'garbage')
  code = predict.predict_command(
      workdir, [good, bad], step=2, heatmap_dir=str(tmp_path / 'maps')
  )
  out, err = capsys.readouterr()
  assert code == 1
  lines = [json.loads(line) for line in out.strip().splitlines()]
  assert len(lines) == 1 and lines[0]['path'] == good
  assert os.path.exists(lines[0]['heatmap'])
  assert bad in err and ('pydicom' in err or 'DICOM' in err)
  assert good not in err

  assert predict.predict_command(workdir, [good]) == 0
  with pytest.raises(cli.UserError, match='no checkpoint for step 7'):
    predict.predict_command(workdir, [good], step=7)
  with pytest.raises(cli.UserError, match='no IMAGE'):
    predict.predict_command(workdir, [])


def test_the_command_line_runs_under_the_exit_policy(run, tmp_path):
  """`python -m drpl_jax.predict`: absl flags, images as arguments, bad
  input one `error:` line and exit 2."""
  workdir, config = run
  image, _ = _test_image(config, 1)
  good = str(tmp_path / 'one.png')
  PIL.Image.fromarray(image).save(good)
  command = [sys.executable, '-m', 'drpl_jax.predict', f'--workdir={workdir}']
  env = dict(os.environ, PYTHONPATH=ROOT)
  ok = subprocess.run(
      command + [good, '--ema=false'],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert json.loads(ok.stdout.strip().splitlines()[-1])['path'] == good
  bad = subprocess.run(
      command + ['--step=7', good],
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
      .startswith('error: no checkpoint for step 7')
  )
  assert 'Traceback' not in bad.stderr
