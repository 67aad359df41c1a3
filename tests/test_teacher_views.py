"""The teacher-view measurement (drpl_jax/reproduce/teacher_views.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from drpl_jax.input.augment import AugmentConfig, eval_transform
from drpl_jax.reproduce import teacher_views as tv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_view_keeps_only_its_part():
  aug = AugmentConfig(hflip=True, random_erase=0.25, randaugment_ops=2)
  assert tv.view_config(aug, 'clean') is None
  assert tv.view_config(aug, 'full') == aug
  crop = tv.view_config(aug, 'crop')
  assert crop.random_resized_crop and crop.randaugment_ops == 0
  ra = tv.view_config(aug, 'randaugment')
  assert not ra.random_resized_crop and ra.randaugment_ops == 2
  for cfg in (crop, ra):
    assert not cfg.hflip and cfg.random_erase == 0.0
  with pytest.raises(ValueError, match="'blur'"):
    tv.view_config(aug, 'blur')


def _images(n=12, size=40):
  rng = np.random.default_rng(0)
  # Left half bright for class 1, right half bright for class 0.
  images, labels = [], []
  for i in range(n):
    im = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    half = slice(0, size // 2) if i % 2 else slice(size // 2, size)
    im[:, half] = 220
    images.append(im)
    labels.append(i % 2)
  return images, np.array(labels)


def _left_right_teacher(x):
  """Class 1 when the left half is brighter: right on the clean view."""
  s = x.shape[2] // 2
  left, right = x[:, :, :s].mean((1, 2, 3)), x[:, :, s:].mean((1, 2, 3))
  return np.stack([right - left, left - right], -1)


def test_clean_view_is_the_eval_view_and_passes_repeat():
  images, labels = _images()
  seen = []

  def teacher(x):
    seen.append(x)
    return _left_right_teacher(x)

  aug = AugmentConfig(
      crop_scale=(0.3, 1.0),
      randaugment_ops=2,
      randaugment_magnitude=9,
      random_erase=0.0,
  )
  out = tv.teacher_view_accuracy(
      teacher,
      images,
      labels,
      image_size=32,
      augment=aug,
      passes=3,
      batch_size=5,
  )
  assert list(out) == list(tv.VIEWS)
  assert len(out['clean']) == 1 and out['clean'][0] == 1.0
  assert all(len(out[v]) == 3 for v in ('crop', 'randaugment', 'full'))
  # The clean pass fed the teacher the eval view, scaled to [0, 1].
  first = np.concatenate(seen[:3])  # 12 images in batches of 5
  expected = np.stack([eval_transform(im, size=32) for im in images])
  np.testing.assert_allclose(first, expected / 255.0, atol=1e-6)
  # Seeded: a rerun gives the same figures.
  again = tv.teacher_view_accuracy(
      _left_right_teacher, images, labels, image_size=32, augment=aug, passes=3
  )
  assert again == out


def test_rejects_mismatched_inputs():
  images, labels = _images(4)
  with pytest.raises(ValueError, match='4 images and 3 labels'):
    tv.teacher_view_accuracy(
        _left_right_teacher,
        images,
        labels[:3],
        image_size=32,
        augment=AugmentConfig(),
    )
  with pytest.raises(ValueError, match='passes=0'):
    tv.teacher_view_accuracy(
        _left_right_teacher,
        images,
        labels,
        image_size=32,
        augment=AugmentConfig(),
        passes=0,
    )


def _run(args, tmp_path):
  return subprocess.run(
      [sys.executable, '-m', 'drpl_jax.reproduce.teacher_views', *args],
      capture_output=True,
      text=True,
      cwd=ROOT,
      timeout=600,
      check=False,
      env=dict(os.environ, PYTHONPATH=ROOT, OMP_WAIT_POLICY='PASSIVE'),
  )


def test_command_measures_a_saved_teacher(demo_data_dir, tmp_path):
  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file
  from drpl_jax.teacher import TeacherConfig, abstract_teacher
  from drpl_jax.teacher import random_state_dict
  # pylint: enable=g-import-not-at-top
  ckpt = str(tmp_path / 't.safetensors')
  state = random_state_dict(
      abstract_teacher(
          TeacherConfig(arch='resnet18', num_classes=10, image_size=32)
      ),
      0,
  )
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, ckpt)
  out = tmp_path / 'views.json'
  cfg = 'configs/drpl_vit.py:variant=micro,preset=drpl,runlocal'
  args = [
      f'--config={cfg}',
      '--config.data.name=demo',
      f'--config.data.data_dir={demo_data_dir}',
      '--config.data.image_size=32',
      '--config.model.num_classes=10',
      '--config.teacher.arch=resnet18',
      f'--config.teacher.checkpoint={ckpt}',
      '--config.teacher.image_size=32',
      '--passes=1',
      '--max_images=16',
      f'--out={out}',
  ]
  proc = _run(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record['images'] == 16
  for view in tv.VIEWS:
    assert len(record[view]) == 1 and 0.0 <= record[view][0] <= 1.0
    assert view in proc.stdout
  # Bad input: one error line naming the missing teacher, exit 2.
  bad = _run(
      [
          f'--config={cfg}',
          '--config.data.name=demo',
          f'--config.data.data_dir={demo_data_dir}',
      ],
      tmp_path,
  )
  assert bad.returncode == 2 and 'teacher.checkpoint' in bad.stderr
  assert 'Traceback' not in bad.stderr
