"""Tests of the torchvision -> Flax teacher converters (drpl_jax.teacher,
drpl_jax.pytorch.convert): parity with torchvision in fp32, strict key/shape checks,
the architecture table, preprocessing and the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from flax import nnx
from torchvision.transforms.v2 import functional as TF

from conftest import run_module
from drpl_jax import teacher as teacher_lib
from drpl_jax.pytorch import convert
from drpl_jax.pytorch import torch_io
from drpl_jax.teacher import load as teacher_load

MEAN = np.asarray(teacher_lib.IMAGENET_MEAN, np.float32)
STD = np.asarray(teacher_lib.IMAGENET_STD, np.float32)


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.random((batch, size, size, 3), dtype=np.float32)


# One jitted function, so equal module structures and shapes share a compile.
_forward = nnx.jit(lambda module, images: module(images))


def _apply(module, images: np.ndarray) -> np.ndarray:
  return np.asarray(_forward(module, jnp.asarray(images)))


def _torch_logits(model, images: np.ndarray) -> np.ndarray:
  """torchvision eval-mode logits; images [B, H, W, 3] in [0, 1]."""
  nchw = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model.eval()(nchw).numpy()


def _torch_model(arch: str, num_classes: int, size: int, seed: int = 0):
  """A random torchvision model with non-trivial BatchNorm tensors."""
  torch.manual_seed(seed)
  model = torchvision.models.get_model(
      arch, weights=None, num_classes=num_classes
  )
  convert.randomize_batchnorm(model, size, seed)
  return model


def _abstract_teacher(arch: str, num_classes: int = 4):
  return teacher_lib.abstract_teacher(
      teacher_lib.TeacherConfig(arch, num_classes)
  )


def _fake_state(arch: str, num_classes: int = 4, seed: int = 0):
  """A random numpy state dict with exactly the keys/shapes `arch` needs."""
  rng = np.random.default_rng(seed)
  shapes = teacher_lib.torch_key_shapes(_abstract_teacher(arch, num_classes))
  return {
      k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()
  }


# ---------------------------------------------------------------------------
# Parity with torchvision (fp32, odd sizes so stride-2 padding matters).
# ---------------------------------------------------------------------------


def _check_parity(
    arch: str, size: int, tmp_path, fp64_reference: bool = False
) -> None:
  """Converted logits equal torchvision's to 1e-4 (fp32, eval mode).

  Deep members accumulate more fp32 rounding: with `fp64_reference` the
  bound is max(1e-4, 3 x torch's own fp32-vs-fp64 error), i.e. the port must
  be as accurate as PyTorch itself.
  """
  model = _torch_model(arch, 4, size)
  path = os.path.join(tmp_path, f'{arch}.safetensors')
  safetensors.torch.save_file(model.state_dict(), path)
  flax_model = teacher_load.torch_teacher(arch, path, 4, image_size=size)
  images = _images(size)
  expected = _torch_logits(model, images)
  got = _apply(flax_model, images)
  assert got.shape == (2, 4) and got.dtype == np.float32
  # The check means something only if the logits do.
  assert np.abs(expected).max() > 0.1
  assert np.abs(expected[0] - expected[1]).max() > 1e-2
  atol = 1e-4
  if fp64_reference:
    with torch.no_grad():
      nchw = torch.from_numpy(((images - MEAN) / STD).transpose(0, 3, 1, 2))
      exact = model.double()(nchw.double()).numpy()
    torch_error = np.abs(expected - exact).max()
    atol = max(atol, 3 * torch_error)
    np.testing.assert_allclose(got, exact, rtol=0, atol=atol)
  np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


@pytest.mark.torch
@pytest.mark.parametrize(
    'arch,size',
    [
        ('resnet18', 65),
        ('resnet50', 65),
        ('densenet121', 65),
        ('regnet_y_400mf', 97),
    ],
)
def test_parity_with_torchvision(arch, size, tmp_path):
  _check_parity(arch, size, tmp_path)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(
    'arch,size',
    [
        ('resnet34', 97),
        ('resnet101', 97),
        ('densenet169', 97),
        ('regnet_y_800mf', 65),
        ('regnet_y_1_6gf', 97),
        ('resnet50', 224),
    ],
)
def test_parity_with_torchvision_more_members(arch, size, tmp_path):
  _check_parity(arch, size, tmp_path, fp64_reference=True)


@pytest.mark.torch
def test_pth_training_checkpoint_converts(tmp_path):
  model = _torch_model('resnet18', 3, 33)
  path = tmp_path / 'teacher.pth'
  sd = {f'module.{k}': v for k, v in model.state_dict().items()}
  torch.save({'model': sd, 'epoch': 7}, path)
  flax_model = teacher_load.torch_teacher(
      'resnet18', str(path), 3, image_size=33
  )
  images = _images(33)
  np.testing.assert_allclose(
      _apply(flax_model, images),
      _torch_logits(model, images),
      atol=1e-4,
      rtol=0,
  )


# ---------------------------------------------------------------------------
# The architecture table against torchvision (names and shapes, no weights).
# ---------------------------------------------------------------------------


def _torchvision_meta_model(arch: str, num_classes: int, monkeypatch):
  """torchvision's model on the meta device, plus its RegNet BlockParams."""
  if not arch.startswith('regnet'):
    with torch.device('meta'):
      return torchvision.models.get_model(arch, num_classes=num_classes), None
  regnet = torchvision.models.regnet
  # BlockParams needs real tensors; capture them, then build on meta.
  monkeypatch.setattr(regnet, '_regnet', lambda params, *a, **k: params)
  params = torchvision.models.get_model(arch)
  with torch.device('meta'):
    return regnet.RegNet(params, num_classes=num_classes), params


@pytest.mark.torch
@pytest.mark.parametrize(
    'arch', [a for a in sorted(teacher_lib.TEACHER_ARCHS) if 'regnet' in a]
)
def test_regnet_table_is_torchvisions_block_params(arch, monkeypatch):
  _, params = _torchvision_meta_model(arch, 4, monkeypatch)
  spec = teacher_lib.TEACHER_ARCHS[arch]
  assert list(spec.depths) == params.depths
  assert list(spec.widths) == params.widths
  assert list(spec.group_widths) == params.group_widths
  assert params.bottleneck_multipliers == [spec.bottleneck_multiplier] * 4
  assert params.strides == [2, 2, 2, 2]
  assert params.se_ratio == spec.se_ratio


def _check_keys_and_shapes(arch: str, monkeypatch) -> None:
  model, _ = _torchvision_meta_model(arch, 4, monkeypatch)
  expected = {
      k: tuple(v.shape)
      for k, v in model.state_dict().items()
      if not k.endswith('num_batches_tracked')
  }
  got = teacher_lib.torch_key_shapes(_abstract_teacher(arch, 4))
  assert sorted(got) == sorted(expected)
  assert got == expected


# Tracing a deep NNX constructor takes seconds (RNG bookkeeping), so the
# default run covers one or two members per family and the slow run the rest.
_FAST_TABLE = (
    'resnet18',
    'resnet34',
    'resnet50',
    'densenet121',
    'regnet_y_400mf',
    'regnet_y_16gf',
)


@pytest.mark.torch
@pytest.mark.parametrize('arch', _FAST_TABLE)
def test_keys_and_shapes_match_torchvision(arch, monkeypatch):
  _check_keys_and_shapes(arch, monkeypatch)


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(
    'arch',
    [a for a in sorted(teacher_lib.TEACHER_ARCHS) if a not in _FAST_TABLE],
)
def test_keys_and_shapes_match_torchvision_deep_members(arch, monkeypatch):
  _check_keys_and_shapes(arch, monkeypatch)


# ---------------------------------------------------------------------------
# Strict loading: every key consumed, every shape checked.
# ---------------------------------------------------------------------------


def test_weights_land_in_the_right_layout():
  state = _fake_state('resnet18')
  state['bn1.num_batches_tracked'] = np.array(5, np.int64)
  # Half-precision checkpoints load into the float32 parameters.
  state['layer3.1.conv2.weight'] = state['layer3.1.conv2.weight'].astype(
      ml_dtypes.bfloat16
  )
  module = _abstract_teacher('resnet18')
  report = teacher_lib.load_torch_weights(module, state, 'resnet18')
  assert report['ignored'] == ['bn1.num_batches_tracked']
  assert len(report['consumed']) == len(state) - 1
  np.testing.assert_array_equal(
      module.layer2[0].conv1.kernel[...],
      state['layer2.0.conv1.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
      module.layer2[0].downsample[0].kernel[...],
      state['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(module.fc.kernel[...], state['fc.weight'].T)
  np.testing.assert_array_equal(module.fc.bias[...], state['fc.bias'])
  kernel = module.layer3[1].conv2.kernel[...]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
      kernel,
      state['layer3.1.conv2.weight'].astype(np.float32).transpose(2, 3, 1, 0),
  )
  bn = module.layer4[1].bn2
  for flax_name, torch_name in [
      ('scale', 'weight'),
      ('bias', 'bias'),
      ('mean', 'running_mean'),
      ('var', 'running_var'),
  ]:
    np.testing.assert_array_equal(
        getattr(bn, flax_name)[...], state[f'layer4.1.bn2.{torch_name}']
    )


def test_extra_and_missing_keys_are_all_named():
  state = _fake_state('resnet18')
  state['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  del state['layer1.0.bn1.running_var']
  del state['fc.bias']
  with pytest.raises(ValueError) as err:
    teacher_lib.load_torch_weights(
        _abstract_teacher('resnet18'), state, 'resnet18'
    )
  msg = str(err.value)
  assert 'layer9.0.conv1.weight' in msg and 'unexpected' in msg
  assert 'layer1.0.bn1.running_var' in msg and 'fc.bias' in msg
  assert 'missing' in msg


def test_wrong_shape_names_key_and_both_shapes():
  state = _fake_state('resnet18')
  state['layer2.0.conv1.weight'] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    teacher_lib.load_torch_weights(
        _abstract_teacher('resnet18'), state, 'resnet18'
    )
  msg = str(err.value)
  assert "'layer2.0.conv1.weight'" in msg
  assert '(128, 64, 1, 1)' in msg and '(128, 64, 3, 3)' in msg


def test_failed_load_writes_nothing():
  module = _abstract_teacher('resnet18')
  teacher_lib.load_torch_weights(
      module, _fake_state('resnet18', seed=1), 'resnet18'
  )
  before = np.asarray(module.conv1.kernel[...]).copy()
  state = _fake_state('resnet18')
  state['extra'] = np.zeros(1, np.float32)
  with pytest.raises(ValueError, match='extra'):
    teacher_lib.load_torch_weights(module, state, 'resnet18')
  np.testing.assert_array_equal(module.conv1.kernel[...], before)


def test_arch_mismatch_and_unknown_arch():
  state = _fake_state('resnet18')
  with pytest.raises(ValueError, match="'resnet18'.*'resnet34'"):
    teacher_lib.load_torch_weights(
        _abstract_teacher('resnet18'), state, 'resnet34'
    )
  with pytest.raises(ValueError, match="'resnet19'.*known"):
    teacher_lib.create_teacher(
        teacher_lib.TeacherConfig('resnet19', 4), rngs=nnx.Rngs(0)
    )


def test_densenet_legacy_key_names_are_renamed():
  state = _fake_state('densenet121')
  legacy = {}
  for k, v in state.items():
    for part in ('norm1', 'norm2', 'conv1', 'conv2'):
      if '.denselayer' in k and f'.{part}.' in k:
        k = k.replace(f'.{part}.', f'.{part[:-1]}.{part[-1]}.')
    legacy[k] = v
  assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
  counter = 'features.denseblock1.denselayer1.norm.1.num_batches_tracked'
  legacy[counter] = np.array(3, np.int64)
  module = _abstract_teacher('densenet121')
  report = teacher_lib.load_torch_weights(module, legacy, 'densenet121')
  # norm1, norm2 (4 tensors each), conv1, conv2 in each of 58 dense layers.
  num_layers = sum(teacher_lib.TEACHER_ARCHS['densenet121'].block_config)
  assert len(report['renamed']) == 10 * num_layers + 1
  assert report['ignored'] == [
      'features.denseblock1.denselayer1.norm1.num_batches_tracked'
  ]
  # The canonical dict (what --out writes and torch loads) has new names.
  canonical, _ = teacher_lib.canonical_state_dict(legacy, 'densenet121')
  assert sorted(canonical) == sorted(set(state) | set(report['ignored']))
  assert report['renamed'][
      'features.denseblock1.denselayer1.norm.1.weight'
  ] == ('features.denseblock1.denselayer1.norm1.weight')
  layer = module.features.denseblock3.denselayer7
  np.testing.assert_array_equal(
      layer.conv2.kernel[...],
      state['features.denseblock3.denselayer7.conv2.weight'].transpose(
          2, 3, 1, 0
      ),
  )


def test_classifier_size_mismatch_names_shapes(tmp_path):
  path = tmp_path / 'imagenet.safetensors'
  torch_io.save_safetensors(_fake_state('resnet18', num_classes=10), path)
  with pytest.raises(ValueError) as err:
    teacher_load.torch_teacher('resnet18', str(path), 4)
  msg = str(err.value)
  assert "'fc.weight'" in msg and '(10, 512)' in msg
  assert 'num_classes=4' in msg and 'imagenet.safetensors' in msg


# ---------------------------------------------------------------------------
# Preprocessing and the module contract.
# ---------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize('input_size,image_size', [(65, 33), (33, 49)])
def test_resize_matches_torchvision_transforms(input_size, image_size):
  model = _torch_model('resnet18', 4, image_size)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = teacher_lib.TeacherConfig('resnet18', 4, image_size=image_size)
  flax_model, _ = teacher_load.teacher_from_state_dict(cfg, state)
  images = _images(input_size)
  resized = TF.resize(
      torch.from_numpy(images).permute(0, 3, 1, 2),
      [image_size, image_size],
      interpolation=torchvision.transforms.InterpolationMode.BILINEAR,
      antialias=True,
  )
  expected = _torch_logits(model, resized.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(
      _apply(flax_model, images), expected, rtol=0, atol=1e-4
  )
  # Without the resize the logits differ: the test can see a skipped resize.
  naive = F.interpolate(
      torch.from_numpy(images).permute(0, 3, 1, 2),
      size=(image_size, image_size),
      mode='nearest',
  )
  assert (
      np.abs(
          _torch_logits(model, naive.permute(0, 2, 3, 1).numpy()) - expected
      ).max()
      > 1e-3
  )


def test_custom_mean_std_and_grayscale_input():
  module = teacher_load.torch_teacher(
      'resnet18', None, 3, image_size=33, mean=[0.5] * 3, std=[0.25] * 3, seed=1
  )
  gray = _images(33)[..., :1]
  rgb = np.repeat(gray, 3, axis=-1)
  np.testing.assert_allclose(
      _apply(module, gray), _apply(module, rgb), rtol=0, atol=1e-6
  )
  # The module normalises with its own statistics: shifting the mean by
  # one std equals shifting the raw input by -0.25.
  shifted = teacher_load.torch_teacher(
      'resnet18',
      None,
      3,
      image_size=33,
      mean=[0.75] * 3,
      std=[0.25] * 3,
      seed=1,
  )
  np.testing.assert_allclose(
      _apply(shifted, rgb + 0.25), _apply(module, rgb), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\].*\(2, 33, 33, 2\)'):
    module(jnp.zeros((2, 33, 33, 2)))


def test_random_teacher_is_eval_only_and_has_no_gradient():
  module = teacher_load.torch_teacher('resnet18', None, 4, image_size=33)
  images = _images(33)
  logits = _apply(module, images)
  assert logits.shape == (2, 4) and logits.dtype == np.float32
  assert np.all(np.isfinite(logits)) and np.abs(logits).max() > 0
  # Inference only: BN uses running averages (batch-independent outputs).
  np.testing.assert_allclose(_apply(module, images[:1]), logits[:1], atol=1e-5)
  grad_fn = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))
  grads = grad_fn(module, jnp.asarray(images))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  # A different seed gives a different random teacher.
  other = teacher_load.torch_teacher('resnet18', None, 4, image_size=33, seed=1)
  assert np.abs(_apply(other, images) - logits).max() > 1e-3


def test_bfloat16_compute_returns_float32_close_to_fp32():
  fp32 = teacher_load.torch_teacher('resnet18', None, 4, image_size=33, seed=3)
  bf16 = teacher_load.torch_teacher(
      'resnet18', None, 4, image_size=33, seed=3, dtype='bfloat16'
  )
  images = _images(33)
  a, b = _apply(fp32, images), _apply(bf16, images)
  assert b.dtype == np.float32
  assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
  assert bf16.conv1.kernel[...].dtype == jnp.float32


# ---------------------------------------------------------------------------
# parity_report, the CLI, and running without torch.
# ---------------------------------------------------------------------------


@pytest.mark.torch
def test_parity_report_random_init():
  report = convert.parity_report('resnet18', None, 3, image_size=33, seed=1)
  assert report['max_abs_diff'] < 1e-4
  assert report['max_abs_logit'] > 0.1
  assert report['argmax_agreement'] == 1.0
  assert report['torch_version'] == torch.__version__


@pytest.mark.torch
def test_cli_teacher_converts_checks_parity_and_writes_safetensors(tmp_path):
  model = _torch_model('resnet18', 4, 65)
  src = tmp_path / 'teacher.pth'
  torch.save(model.state_dict(), src)
  out = tmp_path / 'converted.safetensors'
  proc = run_module(
      'drpl_jax.convert',
      'teacher',
      '--arch',
      'resnet18',
      '--checkpoint',
      str(src),
      '--num_classes',
      '4',
      '--image_size',
      '65',
      '--parity',
      '--out',
      str(out),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout)
  assert result['consumed'] == 102 and result['ignored'] == 20
  assert result['num_params'] == sum(p.numel() for p in model.parameters())
  assert result['parity']['max_abs_diff'] < 1e-4
  written = torch_io.load_state_dict(out)
  expected = model.state_dict()
  assert sorted(written) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(written[k], v.numpy())


_NO_TORCH_SCRIPT = """
import sys
for name in ('torch', 'torchvision', 'tensorflow', 'tensorflow_datasets',
             'clu'):
  sys.modules[name] = None  # Any import of these now fails.
import numpy as np
from drpl_jax.teacher import load as teacher_load
from drpl_jax.teacher import load as teacher_load
from flax import nnx
m = teacher_load.torch_teacher('resnet18', sys.argv[1], 4, image_size=33)
x = np.load(sys.argv[3])
np.save(sys.argv[2], np.asarray(nnx.jit(lambda m, x: m(x))(m, x)))
"""


@pytest.mark.torch
def test_safetensors_teacher_runs_without_torch(tmp_path):
  model = _torch_model('resnet18', 4, 33)
  ckpt = tmp_path / 't.safetensors'
  safetensors.torch.save_file(model.state_dict(), ckpt)
  images = _images(33)
  np.save(tmp_path / 'x.npy', images)
  subprocess.run(
      [
          sys.executable,
          '-c',
          _NO_TORCH_SCRIPT,
          str(ckpt),
          str(tmp_path / 'y.npy'),
          str(tmp_path / 'x.npy'),
      ],
      check=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  np.testing.assert_allclose(
      np.load(tmp_path / 'y.npy'),
      _torch_logits(model, images),
      atol=1e-4,
      rtol=0,
  )


@pytest.mark.parametrize(
    'args, needle',
    [
        (['teacher', '--arch=resnet9'], 'resnet9'),
        (
            [
                'teacher',
                '--arch=resnet18',
                '--checkpoint=/no/such.pth',
                '--num_classes=4',
            ],
            '/no/such.pth',
        ),
        (['teacher', '--arch=resnet18', '--checkpoint=x.pth'], '--num_classes'),
        (
            [
                'teacher',
                '--arch=resnet18',
                '--checkpoint=x.pth',
                '--num_classes=4',
                '--mean=0.5,0.5',
            ],
            '--mean=0.5,0.5',
        ),
        (['teacher', '--arch=resnet18', '--num_classes=0'], '--num_classes'),
        (['fold'], "'fold'"),
        (
            [
                'student',
                '--checkpoint=/no/such.pth',
                '--config=configs/drpl_vit.py:variant=micro,preset=deit',
            ],
            '/no/such.pth',
        ),
        (['to-timm', '--workdir=/no/run', '--out=x.safetensors'], '/no/run'),
    ],
)
def test_bad_convert_input_exits_2_naming_it(args, needle):
  proc = run_module('drpl_jax.convert', *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and needle in last, last
