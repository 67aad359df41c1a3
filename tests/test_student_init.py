"""Starting the student from timm / DeiT weights (drpl_jax.pretrained.mapping).

timm models are built directly (pretrained=False), tiny, with randomised
parameters so that a swapped or mis-transposed tensor changes the logits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DEIT_OVERRIDES, randomize_torch_model, tiny_demo_config
from conftest import run_module
from drpl_jax.models import ModelConfig, create_model, param_shapes
from drpl_jax.parallel import sharding
from drpl_jax.pytorch import convert
from drpl_jax.pytorch import torch_io
from drpl_jax.train import loop as train
from drpl_jax.train import optim
from drpl_jax.train import student_init

torch = pytest.importorskip('torch')
deit = pytest.importorskip('timm.models.deit')
vision_transformer = pytest.importorskip('timm.models.vision_transformer')
timm_layers = pytest.importorskip('timm.layers')

pytestmark = pytest.mark.torch

PRESETS = {  # as configs/drpl_vit.py
    'vit': dict(distilled=False, rpe=dict(kind='none'), conv=dict(kind='mlp')),
    'deit': dict(distilled=True, rpe=dict(kind='none'), conv=dict(kind='mlp')),
    'drpl': dict(distilled=True, rpe=dict(kind='irpe'), conv=dict(kind='leff')),
}


def model_config(preset='deit', **changes) -> ModelConfig:
  d = dict(
      variant='micro',
      depth=2,
      image_size=32,
      patch_size=8,
      num_classes=4,
      **PRESETS[preset],
  )
  return ModelConfig.from_config({**d, **changes})


def timm_deit(num_classes=4, img_size=32, depth=2, seed=0):
  torch.manual_seed(seed)
  return randomize_torch_model(
      deit.VisionTransformerDistilled(
          img_size=img_size,
          patch_size=8,
          embed_dim=64,
          depth=depth,
          num_heads=2,
          num_classes=num_classes,
      ),
      seed,
  )


def timm_vit(num_classes=4, img_size=32, seed=0):
  torch.manual_seed(seed)
  return randomize_torch_model(
      vision_transformer.VisionTransformer(
          img_size=img_size,
          patch_size=8,
          embed_dim=64,
          depth=2,
          num_heads=2,
          num_classes=num_classes,
      ),
      seed,
  )


def numpy_state(model):
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def images(size=32, batch=3, seed=1):
  return (
      np.random.default_rng(seed)
      .standard_normal((batch, size, size, 3))
      .astype(np.float32)
  )


def torch_forward(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def params(model):
  """Our flat parameter name -> numpy value."""
  return {
      '.'.join(map(str, p)): np.asarray(v[...])
      for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def test_distilled_deit_matches_timm_both_heads():
  ref = timm_deit()
  model, report = convert.student_from_timm(
      numpy_state(ref), model_config('deit')
  )
  assert report['fresh'] == [] and report['ignored'] == []
  assert set(report['loaded']) == set(param_shapes(model))
  x = images()
  want = torch_forward(ref, x)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(model(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  # Each head separately: timm's distilled-training mode returns both.
  ref.set_distilled_training(True)
  ref.train()
  with torch.no_grad():
    cls_want, dist_want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  cls_got, dist_got = model(jnp.asarray(x), train=True)
  np.testing.assert_allclose(cls_got, cls_want.numpy(), atol=1e-5)
  np.testing.assert_allclose(dist_got, dist_want.numpy(), atol=1e-5)
  assert np.abs(cls_want.numpy() - dist_want.numpy()).max() > 0.1


def test_qkv_split_and_transposes():
  ref = timm_deit()
  sd = numpy_state(ref)
  model, _ = convert.student_from_timm(sd, model_config('deit'))
  p = params(model)
  qkv = sd['blocks.1.attn.qkv.weight']  # [3D, D]
  np.testing.assert_array_equal(p['blocks.1.attn.q.kernel'], qkv[:64].T)
  np.testing.assert_array_equal(p['blocks.1.attn.k.kernel'], qkv[64:128].T)
  np.testing.assert_array_equal(
      p['blocks.1.attn.v.bias'], sd['blocks.1.attn.qkv.bias'][128:]
  )
  np.testing.assert_array_equal(
      p['patch_embed.proj.kernel'],
      sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
  )


def test_vit_into_distilled_model_gets_fresh_dist_token():
  ref = timm_vit()
  sd = numpy_state(ref)
  cfg = model_config('deit')
  model, report = convert.student_from_timm(sd, cfg, rngs=nnx.Rngs(7))
  assert report['fresh'] == ['dist_token', 'head_dist.bias', 'head_dist.kernel']
  assert any('dist' in n and 'cls token position' in n for n in report['notes'])
  fresh = params(create_model(cfg, rngs=nnx.Rngs(7)))
  p = params(model)
  np.testing.assert_array_equal(p['dist_token'], fresh['dist_token'])
  np.testing.assert_array_equal(
      p['head_dist.kernel'], fresh['head_dist.kernel']
  )
  pos, src = p['pos_embed'], sd['pos_embed']
  assert pos.shape == (1, 2 + 16, 64) and src.shape == (1, 1 + 16, 64)
  np.testing.assert_array_equal(pos[0, 0], src[0, 0])
  np.testing.assert_array_equal(pos[0, 1], src[0, 0])  # dist <- cls
  np.testing.assert_array_equal(pos[0, 2:], src[0, 1:])
  np.testing.assert_array_equal(p['head.kernel'], sd['head.weight'].T)


def test_vit_into_vit_preset_matches_timm():
  ref = timm_vit()
  model, report = convert.student_from_timm(
      numpy_state(ref), model_config('vit')
  )
  assert report['fresh'] == []
  x = images()
  np.testing.assert_allclose(
      model(jnp.asarray(x)), torch_forward(ref, x), atol=1e-5
  )


def test_deit3_style_layer_scale_and_no_embed_class():
  """timm no_embed_class + layer scale (DeiT III) map and match timm."""
  torch.manual_seed(0)
  ref = randomize_torch_model(
      vision_transformer.VisionTransformer(
          img_size=32,
          patch_size=8,
          embed_dim=64,
          depth=2,
          num_heads=2,
          num_classes=4,
          init_values=1e-2,
          no_embed_class=True,
      )
  )
  sd = numpy_state(ref)
  assert sd['pos_embed'].shape == (1, 16, 64)
  model, report = convert.student_from_timm(
      sd, model_config('vit', layer_scale_init=0.1)
  )
  assert report['fresh'] == []
  assert 'blocks.1.ls2.gamma' in report['loaded']
  assert any('no_embed_class' in n for n in report['notes'])
  x = images()
  np.testing.assert_allclose(
      model(jnp.asarray(x)), torch_forward(ref, x), atol=1e-5
  )
  # Layer scale the source lacks starts fresh; one the model lacks is an
  # unmatched key, not silently dropped.
  _, report = convert.student_from_timm(
      numpy_state(timm_vit()), model_config('vit', layer_scale_init=0.1)
  )
  assert 'blocks.0.ls1.gamma' in report['fresh']
  with pytest.raises(ValueError, match=r'unmatched.*blocks\.0\.ls1\.gamma'):
    convert.student_from_timm(sd, model_config('vit'))


def test_distilled_source_into_vit_preset_drops_dist():
  sd = numpy_state(timm_deit())
  model, report = convert.student_from_timm(sd, model_config('vit'))
  assert report['ignored'] == [
      'dist_token',
      'head_dist.bias',
      'head_dist.weight',
  ]
  pos = params(model)['pos_embed']
  np.testing.assert_array_equal(pos[0, 0], sd['pos_embed'][0, 0])
  np.testing.assert_array_equal(pos[0, 1:], sd['pos_embed'][0, 2:])


def test_drpl_preset_keeps_rpe_and_leff_fresh():
  sd = numpy_state(timm_deit())
  cfg = model_config('drpl')
  model, report = convert.student_from_timm(sd, cfg)
  fresh_suffixes = {
      'attn.rpe_k.table',
      'ffn.expand_norm.scale',
      'ffn.expand_norm.bias',
      'ffn.dwconv.kernel',
      'ffn.dwconv.bias',
      'ffn.dw_norm.scale',
      'ffn.dw_norm.bias',
      'ffn.project_norm.scale',
      'ffn.project_norm.bias',
  }
  fresh_suffixes |= {
      f'ffn.{n}.{s}'
      for n in ('expand_norm', 'dw_norm', 'project_norm')
      for s in ('mean', 'var')
  }  # BatchNorm statistics
  assert set(report['fresh']) == {
      f'blocks.{i}.{s}' for i in range(2) for s in fresh_suffixes
  }
  assert 'blocks.1.ffn.expand.kernel' in report['loaded']
  assert 'blocks.1.ffn.project.bias' in report['loaded']
  assert any('LeFF' in n for n in report['notes'])
  assert any('rpe' in n for n in report['notes'])
  p = params(model)
  np.testing.assert_array_equal(
      p['blocks.1.ffn.expand.kernel'], sd['blocks.1.mlp.fc1.weight'].T
  )
  np.testing.assert_array_equal(
      p['blocks.0.ffn.project.bias'], sd['blocks.0.mlp.fc2.bias']
  )
  fresh = params(create_model(cfg, rngs=nnx.Rngs(0)))
  np.testing.assert_array_equal(
      p['blocks.0.ffn.dwconv.kernel'], fresh['blocks.0.ffn.dwconv.kernel']
  )
  out = model(jnp.asarray(images()))
  assert out.shape == (3, 4) and np.isfinite(out).all()


@pytest.mark.parametrize('new_size', [48, 16])
def test_pos_embed_resize_matches_timm_and_keeps_prefix(new_size):
  sd = numpy_state(timm_deit())
  cfg = model_config('deit', image_size=new_size)
  model, report = convert.student_from_timm(sd, cfg)
  g = new_size // 8
  assert report['resized']['pos_embed']['grid_from'] == [4, 4]
  assert report['resized']['pos_embed']['grid_to'] == [g, g]
  pos = params(model)['pos_embed']
  assert pos.shape == (1, 2 + g * g, 64)
  np.testing.assert_array_equal(pos[:, :2], sd['pos_embed'][:, :2])
  want = timm_layers.resample_abs_pos_embed(
      torch.from_numpy(sd['pos_embed']), [g, g], num_prefix_tokens=2
  )
  want = want.numpy()
  np.testing.assert_allclose(pos, want, atol=1e-5)
  out = model(jnp.asarray(images(size=new_size)))
  assert out.shape == (3, 4)


def test_class_count_mismatch_drops_heads():
  sd = numpy_state(timm_deit(num_classes=10))
  cfg = model_config('deit')
  model, report = convert.student_from_timm(sd, cfg)
  assert report['fresh'] == [
      'head.bias',
      'head.kernel',
      'head_dist.bias',
      'head_dist.kernel',
  ]
  assert report['ignored'] == [
      'head.bias',
      'head.weight',
      'head_dist.bias',
      'head_dist.weight',
  ]
  assert params(model)['head.kernel'].shape == (64, 4)
  with pytest.raises(ValueError, match='10 classes'):
    convert.student_from_timm(sd, cfg, strict_head=True)


def test_extra_missing_and_misshaped_keys_are_named():
  sd = numpy_state(timm_deit())
  cfg = model_config('deit')
  extra = dict(
      sd,
      **{
          'blocks.0.attn.q_norm.weight': np.ones(32, np.float32),
          'fc_norm.weight': np.ones(64, np.float32),
      },
  )
  with pytest.raises(
      ValueError,
      match=r'unmatched source keys.*'
      r'blocks\.0\.attn\.q_norm\.weight.*fc_norm\.weight',
  ):
    convert.student_from_timm(extra, cfg)
  missing = dict(sd)
  del missing['blocks.1.mlp.fc2.bias']
  with pytest.raises(
      ValueError, match=r'missing source keys.*blocks\.1\.mlp\.fc2\.bias'
  ):
    convert.student_from_timm(missing, cfg)
  bad = dict(sd, **{'blocks.0.mlp.fc1.weight': np.zeros((128, 64), np.float32)})
  with pytest.raises(
      ValueError,
      match=r'blocks\.0\.mlp\.fc1\.weight \(128, 64\).*need \(64, 256\)',
  ):
    convert.student_from_timm(bad, cfg)
  with pytest.raises(ValueError, match='3 blocks but model.depth=2'):
    convert.student_from_timm(numpy_state(timm_deit(depth=3)), cfg)
  with pytest.raises(ValueError, match='not a checkpoint of a known format'):
    convert.student_from_timm({'conv1.weight': np.zeros((8, 3, 7, 7))}, cfg)


def test_pth_deit_release_and_safetensors_files_load(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  ref = timm_deit()
  cfg = model_config('deit')
  pth, release = tmp_path / 'deit.pth', tmp_path / 'deit_release.pth'
  torch.save(ref.state_dict(), pth)
  torch.save({'model': ref.state_dict(), 'epoch': 3}, release)
  st = tmp_path / 'deit.safetensors'
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, st)
  bf16 = tmp_path / 'deit_bf16.safetensors'
  save_file(
      {
          k: v.to(torch.bfloat16).contiguous()
          for k, v in ref.state_dict().items()
      },
      bf16,
  )
  want = params(convert.student_from_timm(numpy_state(ref), cfg)[0])
  for path in (pth, release, st):
    model, report = convert.student_from_timm(str(path), cfg)
    assert report['source'] == str(path) and report['fresh'] == []
    got = params(model)
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  model, _ = convert.student_from_timm(str(bf16), cfg)
  np.testing.assert_allclose(
      params(model)['head.kernel'], want['head.kernel'], rtol=1e-2, atol=1e-2
  )


def _train_config(path, preset='deit', **model_changes):
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  config = drpl_vit.get_config(f'variant=micro,preset={preset}')
  config.model.image_size = 32
  config.model.patch_size = 16
  for key, value in model_changes.items():
    config.model[key] = value
  config.init_from = str(path)
  return config


def test_init_from_checkpoint_keeps_tree_dtypes_and_shardings(tmp_path):
  torch.manual_seed(0)
  ref = randomize_torch_model(
      deit.VisionTransformerDistilled(
          img_size=32,
          patch_size=16,
          embed_dim=64,
          depth=4,
          num_heads=2,
          num_classes=4,
      )
  )
  path = tmp_path / 'deit_micro.pth'
  torch.save(ref.state_dict(), path)
  config = _train_config(path)
  config.optim.ema_decay = 0.999
  model_cfg = train.model_config_from(config)
  tx, _ = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      model_cfg.depth,
  )
  mesh = sharding.create_mesh((-1, 1))
  _, state, _ = train.create_train_state(config, model_cfg, tx, mesh)
  fresh_rest = jax.tree.map(np.asarray, state.rest)
  new_params, new_rest, report = student_init.init_from_checkpoint(
      config, state.params, state.rest
  )
  assert report['fresh'] == []
  for old, new in ((state.params, new_params), (state.rest, new_rest)):
    assert jax.tree.structure(old) == jax.tree.structure(new)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      assert a.dtype == b.dtype and a.shape == b.shape
      assert a.sharding == b.sharding
  flat = {
      '.'.join(map(str, p)): np.asarray(v[...])
      for p, v in nnx.to_flat_state(new_params)
  }
  sd = ref.state_dict()
  np.testing.assert_array_equal(
      flat['blocks.3.attn.proj.kernel'],
      sd['blocks.3.attn.proj.weight'].numpy().T,
  )
  np.testing.assert_array_equal(flat['pos_embed'], sd['pos_embed'].numpy())
  jax.tree.map(
      np.testing.assert_array_equal,
      fresh_rest,
      jax.tree.map(np.asarray, new_rest),
  )
  # The whole train state: the EMA starts equal to the loaded parameters,
  # in buffers of its own (the jitted step donates the state).
  loaded, _ = student_init.init_train_state(config, state)
  assert jax.tree.structure(loaded) == jax.tree.structure(state)
  for p_leaf, e_leaf, new_leaf in zip(
      jax.tree.leaves(loaded.params),
      jax.tree.leaves(loaded.ema),
      jax.tree.leaves(new_params),
  ):
    np.testing.assert_array_equal(e_leaf, new_leaf)
    np.testing.assert_array_equal(p_leaf, new_leaf)
    assert e_leaf is not p_leaf and e_leaf.sharding == p_leaf.sharding
  assert loaded.opt_state is state.opt_state


def test_init_from_checkpoint_bfloat16_params_and_missing_file(tmp_path):
  sd = numpy_state(timm_deit())
  path = tmp_path / 'deit.safetensors'
  torch_io.save_safetensors(sd, path)
  config = _train_config(
      path, 'drpl', depth=2, patch_size=8, param_dtype='bfloat16'
  )
  cfg = ModelConfig.from_config(config.model)
  _, p, rest = nnx.split(create_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  new_p, _, report = student_init.init_from_checkpoint(config, p, rest)
  assert jax.tree.structure(new_p) == jax.tree.structure(p)
  assert {x.dtype for x in jax.tree.leaves(new_p)} == {jnp.dtype(jnp.bfloat16)}
  assert 'blocks.0.attn.rpe_k.table' in report['fresh']
  config.init_from = str(tmp_path / 'nope.pth')
  with pytest.raises(FileNotFoundError, match=r'config\.init_from=.*nope'):
    student_init.init_from_checkpoint(config, p, rest)


def test_cli_student_prints_report_and_parity(tmp_path):
  torch.manual_seed(0)
  ref = randomize_torch_model(
      deit.VisionTransformerDistilled(
          img_size=32,
          patch_size=16,
          embed_dim=64,
          depth=4,
          num_heads=2,
          num_classes=4,
      )
  )
  path = tmp_path / 'deit_micro.safetensors'
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  save_file(ref.state_dict(), path)
  proc = run_module(
      'drpl_jax.convert',
      'student',
      '--checkpoint',
      str(path),
      '--config=configs/drpl_vit.py:variant=micro,preset=deit',
      '--image_size',
      '32',
      '--num_classes',
      '4',
      '--parity',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout)
  assert out['command'] == 'student' and out['image_size'] == 32
  assert out['report']['fresh'] == [] and out['report']['loaded']
  assert out['parity']['max_abs_diff'] < 1e-5
  assert out['parity']['max_abs_logit'] > 0.1
  assert out['format'] == 'timm' and out['parity']['compared'] == 'logits'
  # Parity is refused (clearly) where the functions cannot agree, and the
  # import report is printed all the same.
  proc = run_module(
      'drpl_jax.convert',
      'student',
      '--checkpoint',
      str(path),
      '--config=configs/drpl_vit.py:variant=micro,preset=drpl',
      '--image_size',
      '32',
      '--parity',
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  out = json.loads(proc.stdout)
  assert 'rpe.kind' in out['parity']['error'] and out['report']['loaded']


@pytest.mark.slow
def test_deit_tiny_224_parity():
  import timm  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  ref = randomize_torch_model(
      timm.create_model(
          'deit_tiny_distilled_patch16_224', pretrained=False, num_classes=4
      )
  )
  cfg = ModelConfig.from_config(dict(variant='ti', **PRESETS['deit']))
  sd = numpy_state(ref)
  model, report = convert.student_from_timm(sd, cfg)
  assert report['fresh'] == []
  parity = convert.student_parity_report(sd, model, batch=2)
  assert parity['max_abs_diff'] < 1e-4, parity


def test_training_starts_from_init_from(demo_data_dir, tmp_path):
  """config.init_from loads the timm weights into the run's initial state."""
  src = timm_deit(num_classes=10, img_size=32, depth=2)
  path = tmp_path / 'deit.safetensors'
  torch_io.save_safetensors(
      {k: v.detach().numpy() for k, v in src.state_dict().items()}, str(path)
  )
  config = tiny_demo_config(demo_data_dir, 1, **DEIT_OVERRIDES)
  config.optim.base_lr = 0.0  # the state after one step is the loaded one
  config.optim.weight_decay = 0.0
  config.init_from = str(path)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  from drpl_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  params = evaluate.Evaluator(config, workdir).state.params
  want = src.state_dict()['blocks.1.mlp.fc2.weight'].detach().numpy().T
  np.testing.assert_allclose(
      np.asarray(params['blocks'][1]['ffn']['fc2']['kernel']), want, rtol=1e-6
  )
  np.testing.assert_allclose(
      np.asarray(params['cls_token']),
      src.state_dict()['cls_token'].detach().numpy(),
      rtol=1e-6,
  )
