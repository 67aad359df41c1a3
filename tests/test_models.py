"""Behaviour of the DRPL-ViT model (drpl_jax/models/)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drpl_jax.models import (
    ConvConfig,
    ModelConfig,
    RPEConfig,
    DRPLViT,
    create_model,
    param_names,
)
from drpl_jax.models.attention import Attention
from drpl_jax.models.layers import LeFF
from drpl_jax.models.rpe import irpe_bucket_ids


def tiny(**changes) -> ModelConfig:
  """A 2-block, 32-wide model on 16x16 images (4x4 grid), layer norms."""
  base = ModelConfig(
      num_classes=3,
      image_size=16,
      patch_size=4,
      width=32,
      depth=2,
      num_heads=2,
      conv=ConvConfig(norm='layer'),
  )
  return base.replace(**changes)


def images(batch=2, size=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def randomize_rpe(model: DRPLViT, seed: int = 0) -> None:
  """iRPE tables start at zero; give them values so they matter."""
  key = jax.random.key(seed)
  for block in model.blocks:
    for name in ('rpe_q', 'rpe_k', 'rpe_v', 'rpe_bias'):
      mod = getattr(block.attn, name)
      if mod is None:
        continue
      key, sub = jax.random.split(key)
      mod.table[...] = jax.random.normal(sub, mod.table.shape)


def test_distilled_train_pair_and_eval_mean():
  model = create_model(tiny(), rngs=nnx.Rngs(0))
  x = images()
  cls, dist = model(x, train=True)
  mean = model(x, train=False)
  assert cls.shape == dist.shape == mean.shape == (2, 3)
  assert cls.dtype == jnp.float32
  assert not np.allclose(cls, dist)  # two different heads
  np.testing.assert_allclose(mean, (cls + dist) / 2, rtol=1e-5, atol=1e-6)


def test_not_distilled_returns_one_array_in_both_modes():
  model = create_model(tiny(distilled=False), rngs=nnx.Rngs(0))
  assert model.dist_token is None and model.head_dist is None
  x = images()
  train_out, eval_out = model(x, train=True), model(x)
  assert isinstance(train_out, jax.Array) and train_out.shape == (2, 3)
  np.testing.assert_allclose(train_out, eval_out, rtol=1e-6)


@pytest.mark.parametrize(
    'rpe',
    [
        RPEConfig(kind='none'),
        RPEConfig(kind='bias'),
        RPEConfig(kind='irpe', on_q=True, on_k=True),
        RPEConfig(kind='irpe', on_k=True, shared_heads=False),
    ],
)
def test_fused_and_explicit_attention_agree(rpe):
  model = create_model(tiny(rpe=rpe), rngs=nnx.Rngs(1))
  randomize_rpe(model)
  x = images()
  fused = model(x)  # jax.nn.dot_product_attention
  feats, attn = model.forward_features(x, return_attention=True)  # explicit
  explicit = model.logits(feats)
  np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
  assert len(attn) == 2
  for probs in attn:
    assert probs.shape == (2, 2, 18, 18)  # [B, heads, L, L]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_attention_irpe_logits_follow_the_definition():
  """softmax(q.k*s + (s q_i).rK[b] + (s k_j).rQ[b]) with s = hd**-0.5."""
  cfg = tiny(rpe=RPEConfig(kind='irpe', on_q=True, on_k=True))
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  attn.rpe_k.table[...] = jax.random.normal(jax.random.key(1), (50, 16))
  attn.rpe_q.table[...] = jax.random.normal(jax.random.key(2), (50, 16))
  x = jax.random.normal(jax.random.key(3), (1, 18, 32))
  _, probs = attn(x, (4, 4), train=False, return_attention=True)
  q = np.asarray(attn.q(x)).reshape(18, 2, 16)
  k = np.asarray(attn.k(x)).reshape(18, 2, 16)
  rk, rq = np.asarray(attn.rpe_k.table[...]), np.asarray(attn.rpe_q.table[...])
  ids = irpe_bucket_ids(4, 4, 2, 1.9)
  s = 16**-0.5
  logits = np.einsum('ihd,jhd->hij', q, k) * s
  logits += np.einsum('ihd,ijd->hij', q * s, rk[ids])
  logits += np.einsum('jhd,ijd->hij', k * s, rq[ids])
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs[0], want, rtol=1e-4, atol=1e-6)


def test_rpe_changes_the_output():
  x = images()
  base = create_model(tiny(rpe=RPEConfig(kind='none')), rngs=nnx.Rngs(1))
  for rpe in (
      RPEConfig(kind='bias'),
      RPEConfig(kind='irpe', on_k=True, on_v=True),
  ):
    model = create_model(tiny(rpe=rpe), rngs=nnx.Rngs(1))
    # Same init stream except for RPE tables: with zero iRPE tables the
    # model equals the one without RPE; random tables change it.
    if rpe.kind == 'irpe':
      np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-5)
    randomize_rpe(model)
    assert not np.allclose(model(x), base(x), atol=1e-3)


def test_irpe_on_values_uses_value_tables():
  model = create_model(
      tiny(rpe=RPEConfig(on_k=False, on_v=True)), rngs=nnx.Rngs(1)
  )
  x = images()
  before = model(x)
  randomize_rpe(model)
  feats, attn = model.forward_features(x, return_attention=True)
  after = model.logits(feats)
  assert not np.allclose(before, after, atol=1e-3)
  np.testing.assert_allclose(model(x), after, rtol=1e-6)
  assert len(attn) == 2


def _leff(prefix='shared', norm='layer'):
  cfg = tiny(conv=ConvConfig(norm=norm, prefix=prefix))
  return LeFF(cfg, rngs=nnx.Rngs(0)), cfg


def _tokens(seed=0, batch=2):
  return jax.random.normal(jax.random.key(seed), (batch, 2 + 16, 32))


@pytest.mark.parametrize('prefix', ['shared', 'identity'])
def test_leff_prefix_tokens_skip_the_depthwise_conv(prefix):
  leff, _ = _leff(prefix)
  x = _tokens()
  out = leff(x, (4, 4), train=False, rngs=None)
  assert out.shape == x.shape
  leff.dwconv.kernel[...] = leff.dwconv.kernel[...] * 3.0 + 1.0
  leff.dwconv.bias[...] = leff.dwconv.bias[...] + 0.5
  changed = leff(x, (4, 4), train=False, rngs=None)
  np.testing.assert_array_equal(out[:, :2], changed[:, :2])
  assert not np.allclose(out[:, 2:], changed[:, 2:], atol=1e-3)
  if prefix == 'identity':
    np.testing.assert_array_equal(out[:, :2], x[:, :2])
  else:
    assert not np.allclose(out[:, :2], x[:, :2])


@pytest.mark.parametrize('norm', ['layer', 'batch'])
def test_leff_patch_change_reaches_only_its_neighbourhood(norm):
  leff, _ = _leff(norm=norm)
  x = _tokens()
  r, c = 1, 2  # the patch that changes, on a 4x4 grid
  y = x.at[:, 2 + r * 4 + c].add(1.0)
  # BatchNorm in eval mode: running statistics, tokens stay independent.
  diff = np.abs(
      np.asarray(
          leff(y, (4, 4), train=False, rngs=None)
          - leff(x, (4, 4), train=False, rngs=None)
      )
  )
  changed = diff.max(axis=(0, 2)) > 1e-6
  assert not changed[:2].any()  # prefix tokens
  grid = changed[2:].reshape(4, 4)
  want = np.zeros((4, 4), bool)
  want[r - 1 : r + 2, c - 1 : c + 2] = True  # the 3x3 neighbourhood
  np.testing.assert_array_equal(grid, want)


def test_leff_batch_norm_updates_statistics_only_in_training():
  leff, _ = _leff(norm='batch')
  x = _tokens() * 3.0 + 1.0
  mean0 = np.asarray(leff.dw_norm.mean[...])
  leff(x, (4, 4), train=False, rngs=None)
  np.testing.assert_array_equal(leff.dw_norm.mean[...], mean0)
  leff(x, (4, 4), train=True, rngs=None)
  assert not np.allclose(leff.dw_norm.mean[...], mean0)
  assert not np.allclose(leff.expand_norm.var[...], 1.0)


def test_drop_path_needs_rngs_and_is_stochastic_only_in_training():
  model = create_model(
      tiny(drop_path_rate=0.5, distilled=False), rngs=nnx.Rngs(0)
  )
  rates = [b.drop_path_rate for b in model.blocks]
  np.testing.assert_allclose(rates, [0.0, 0.5])  # linear over depth
  x = images(batch=8)
  with pytest.raises(ValueError, match='rngs'):
    model(x, train=True)
  a = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  b = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(model(x), model(x))


def test_dropout_rates_need_rngs():
  model = create_model(
      tiny(dropout_rate=0.2, attn_dropout_rate=0.2), rngs=nnx.Rngs(0)
  )
  x = images()
  with pytest.raises(ValueError, match='rngs'):
    model(x, train=True)
  cls, dist = model(x, train=True, rngs=nnx.Rngs(dropout=0))
  assert np.isfinite(cls).all() and np.isfinite(dist).all()


@pytest.mark.parametrize(
    'rpe',
    [
        RPEConfig(kind='none'),
        RPEConfig(kind='bias'),
        RPEConfig(kind='irpe', on_q=True, on_k=True),
    ],
    ids=['none', 'bias', 'irpe'],
)
def test_attention_implementation_switch(rpe):
  """The explicit (heads-folded) path, JAX's fused one and auto agree."""
  x = images()
  models = {
      impl: create_model(tiny(rpe=rpe, attention_impl=impl), rngs=nnx.Rngs(0))
      for impl in ('', 'xla', 'explicit')
  }
  for model in models.values():
    randomize_rpe(model)
  assert models['xla'].blocks[0].attn.implementation == 'xla'
  assert models[''].blocks[0].attn.implementation is None
  # Auto picks the explicit path on the CPU, JAX's fused call elsewhere.
  assert models[''].blocks[0].attn._use_explicit() == (
      jax.default_backend() == 'cpu'
  )
  assert models['explicit'].blocks[0].attn._use_explicit()
  assert not models['xla'].blocks[0].attn._use_explicit()

  def loss_and_grads(model):
    loss = lambda m: jnp.sum(jnp.sin(m(x)))
    return nnx.value_and_grad(loss)(model)

  ref_loss, ref_grads = loss_and_grads(models['xla'])
  for impl in ('', 'explicit'):
    np.testing.assert_allclose(
        models[impl](x), models['xla'](x), rtol=1e-5, atol=1e-6
    )
    loss, grads = loss_and_grads(models[impl])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        nnx.state(grads),
        nnx.state(ref_grads),
    )


def test_attention_implementation_checks():
  with pytest.raises(ValueError, match='attention_impl'):
    tiny(attention_impl='cudnn')  # needs bf16/fp16 compute
  with pytest.raises(ValueError, match='attention_impl'):
    tiny(attention_impl='flash')


def test_fused_qkv_matches_three_linears():
  """One matmul against the q, k, v kernels side by side = three Linears."""
  for cfg in (tiny(), tiny(qkv_bias=False)):
    attn = Attention(cfg, rngs=nnx.Rngs(3))
    if attn.q.bias is not None:
      for i, m in enumerate((attn.q, attn.k, attn.v)):
        m.bias[...] = jax.random.normal(jax.random.key(i), m.bias.shape)
    x = jax.random.normal(jax.random.key(9), (2, 5, cfg.width))
    for got, layer in zip(attn._qkv(x), (attn.q, attn.k, attn.v)):
      np.testing.assert_allclose(got, layer(x), rtol=1e-5, atol=1e-6)


def test_bad_images_are_clear_errors():
  model = create_model(tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    model(jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match='divisible'):
    model(jnp.zeros((1, 18, 18, 3)))
  with pytest.raises(ValueError, match='resize'):
    model(jnp.zeros((1, 24, 24, 3)))


def test_resize_interpolates_pos_embed_and_bias_tables():
  cfg = tiny(image_size=32, patch_size=8, rpe=RPEConfig(kind='bias'))
  model = create_model(cfg, rngs=nnx.Rngs(0))
  pos = model.pos_embed[...]
  prefix = np.asarray(pos[:, :2])
  model.pos_embed[...] = pos.at[:, 2:].set(0.7)  # a constant grid
  model.resize(48)
  assert model.config.image_size == 48 and model.config.grid_size == 6
  new = np.asarray(model.pos_embed[...])
  assert new.shape == (1, 2 + 36, 32)
  np.testing.assert_array_equal(new[:, :2], prefix)
  np.testing.assert_allclose(new[:, 2:], 0.7, rtol=1e-6)
  for block in model.blocks:
    assert block.attn.rpe_bias.table.shape == (11 * 11, 2)
  out = model(images(size=48))
  assert out.shape == (2, 3) and np.isfinite(out).all()
  with pytest.raises(ValueError, match='resize'):
    model(images(size=32))


def test_resize_keeps_irpe_tables():
  model = create_model(tiny(image_size=32, patch_size=8), rngs=nnx.Rngs(0))
  randomize_rpe(model)
  table = np.asarray(model.blocks[0].attn.rpe_k.table[...])
  model.resize(48)
  np.testing.assert_array_equal(model.blocks[0].attn.rpe_k.table[...], table)
  _, attn = model.forward_features(images(size=48), return_attention=True)
  assert attn[0].shape == (2, 2, 38, 38)  # buckets follow the 6x6 grid


def test_jit_traces_once():
  model = create_model(tiny(), rngs=nnx.Rngs(0))
  traces = []

  @nnx.jit
  def forward(m, x):
    traces.append(1)
    return m(x)

  for seed in range(3):
    forward(model, images(seed=seed))
  assert len(traces) == 1

  # No Rngs streams live in the module: all randomness comes from the call.
  assert not nnx.to_flat_state(nnx.state(model, nnx.RngState))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure_traces = []

  @jax.jit
  def pure(params, rest, x):
    pure_traces.append(1)
    m = nnx.merge(graphdef, params, rest)
    cls, dist = m(x, train=True)
    return cls, dist, nnx.state(m, nnx.BatchStat)

  for seed in range(3):
    pure(params, rest, images(seed=seed))
  assert len(pure_traces) == 1


def test_functional_grad_step_with_batch_norm_and_drop_path():
  """The train-step pattern: split once, merge inside jit(grad(...)).

  In flax 0.12 nnx.merge reuses the Variables of the given state, so the
  loss must merge with copy=True for BatchNorm to update inside grad.
  """
  cfg = tiny(conv=ConvConfig(norm='batch'), drop_path_rate=0.2)
  model = create_model(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest, x, key):
    m = nnx.merge(graphdef, params, rest, copy=True)
    cls, dist = m(x, train=True, rngs=nnx.Rngs(dropout=key))
    return jnp.mean(cls**2) + jnp.mean(dist**2), nnx.state(m, nnx.BatchStat)

  grads, stats = jax.jit(jax.grad(loss_fn, has_aux=True))(
      params, rest, images() * 2.0 + 1.0, jax.random.key(0)
  )
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads['blocks'][0]['ffn']['dwconv']['kernel'][...]).max() > 0
  new_mean = stats['blocks'][0]['ffn']['dw_norm']['mean'][...]
  assert not np.allclose(new_mean, 0.0)
  np.testing.assert_array_equal(model.blocks[0].ffn.dw_norm.mean[...], 0.0)


def test_bfloat16_compute_with_float32_params():
  cfg = tiny(rpe=RPEConfig(kind='irpe', on_q=True, on_k=True, on_v=True))
  model32 = create_model(cfg, rngs=nnx.Rngs(0))
  model16 = create_model(cfg.replace(dtype='bfloat16'), rngs=nnx.Rngs(0))
  randomize_rpe(model32)
  randomize_rpe(model16)
  for var in jax.tree.leaves(nnx.state(model16, nnx.Param)):
    assert var.dtype == jnp.float32
  x = images()
  feats, _ = model16.forward_features(x)
  assert feats.dtype == jnp.bfloat16
  tokens, _ = model16.embed(x)
  assert tokens.dtype == jnp.bfloat16
  out16, out32 = model16(x), model32(x)
  assert out16.dtype == jnp.float32  # logits are returned in float32
  assert np.isfinite(out16).all()
  np.testing.assert_allclose(out16, out32, atol=0.1)
  _, attn = model16.forward_features(x, return_attention=True)
  np.testing.assert_allclose(attn[0].sum(-1), 1.0, rtol=1e-3)


def test_conv_stem_gives_the_patch_stem_grid():
  patch = create_model(tiny(image_size=32, patch_size=8), rngs=nnx.Rngs(0))
  conv = create_model(
      tiny(image_size=32, patch_size=8, stem='conv', stem_channels=8),
      rngs=nnx.Rngs(0),
  )
  x = images(size=32)
  tokens_p, grid_p = patch.embed(x)
  tokens_c, grid_c = conv.embed(x)
  assert grid_p == grid_c == (4, 4)
  assert tokens_p.shape == tokens_c.shape == (2, 18, 32)
  names = param_names(conv)
  assert 'patch_embed.stem_conv.kernel' in names
  assert conv.patch_embed.proj.kernel.shape == (2, 2, 8, 32)
  stats = np.asarray(conv.patch_embed.stem_norm.mean[...])
  cls, _ = conv(x, train=True)
  assert np.isfinite(cls).all()
  assert not np.allclose(conv.patch_embed.stem_norm.mean[...], stats)


def test_layer_scale_starts_at_its_init_value():
  model = create_model(tiny(layer_scale_init=1e-5), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.blocks[1].ls2.gamma[...], 1e-5)
  ref = create_model(tiny(layer_scale_init=None), rngs=nnx.Rngs(0))
  # Tiny residual branches: the output stays close to the skip path only.
  x = images()
  assert not np.allclose(model(x), ref(x), atol=1e-4)


def test_create_model_from_mapping_and_project_config():
  from conftest import config_module  # pylint: disable=g-import-not-at-top

  drpl_vit = config_module('drpl_vit')
  for preset in ('vit', 'deit', 'deit_rpe', 'deit_conv', 'drpl'):
    cfg = drpl_vit.get_config(f'variant=micro,preset={preset},runlocal')
    model = nnx.eval_shape(
        lambda c=cfg: create_model(c.model, rngs=nnx.Rngs(0))
    )
    assert model.config.num_classes == cfg.model.num_classes
    assert model.config.distilled == (preset != 'vit')
  with pytest.raises(ValueError, match='unknown model config keys'):
    create_model({'variant': 'micro', 'widht': 3}, rngs=nnx.Rngs(0))


@pytest.mark.torch
def test_deit_preset_matches_timm_forward():
  torch = pytest.importorskip('torch')
  deit = pytest.importorskip('timm.models.deit')
  torch.manual_seed(0)
  ref = deit.VisionTransformerDistilled(
      img_size=16,
      patch_size=4,
      embed_dim=32,
      depth=2,
      num_heads=2,
      num_classes=3,
  ).eval()
  with torch.no_grad():  # O(1) activations, so GELU/LN details matter
    for name, t in ref.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        t.add_(0.3 * torch.randn_like(t))
      elif t.ndim == 2:
        t.normal_(0.0, t.shape[1] ** -0.5)
  cfg = tiny(rpe=RPEConfig(kind='none'), conv=ConvConfig(kind='mlp'))
  model = create_model(cfg, rngs=nnx.Rngs(0))
  _load_timm(model, {k: v.numpy() for k, v in ref.state_dict().items()})
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = model(jnp.asarray(x))
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _load_timm(model, sd):
  """A minimal timm DeiT -> DRPL-ViT mapping, for the parity test only."""

  def put(path, value):
    obj = model
    *parents, leaf = path.split('.')
    for part in parents:
      obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    var = getattr(obj, leaf)
    assert var.shape == value.shape, path
    var[...] = jnp.asarray(value)

  put(
      'patch_embed.proj.kernel',
      sd.pop('patch_embed.proj.weight').transpose(2, 3, 1, 0),
  )
  put('patch_embed.proj.bias', sd.pop('patch_embed.proj.bias'))
  for name in ('cls_token', 'dist_token', 'pos_embed'):
    put(name, sd.pop(name))
  for key in list(sd):
    value = sd.pop(key)
    path, kind = key.rsplit('.', 1)
    path = path.replace('mlp.', 'ffn.')
    if key.endswith('qkv.weight') or key.endswith('qkv.bias'):
      base = path.replace('qkv', '')
      for part, chunk in zip('qkv', np.split(value, 3)):
        put(
            base + part + ('.kernel' if kind == 'weight' else '.bias'),
            chunk.T if kind == 'weight' else chunk,
        )
    elif kind == 'weight' and value.ndim == 2:
      put(path + '.kernel', value.T)
    elif kind == 'weight':
      put(path + '.scale', value)
    else:
      put(path + '.bias', value)


@pytest.mark.torch
def test_conv_stem_matches_pytorch_layers():
  torch = pytest.importorskip('torch')
  nn = torch.nn
  torch.manual_seed(0)
  ref = nn.Sequential(
      nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
      nn.BatchNorm2d(8),
      nn.MaxPool2d(3, stride=2, padding=1),
      nn.Conv2d(8, 32, 2, stride=2),
  ).eval()
  with torch.no_grad():
    ref[1].running_mean.normal_()
    ref[1].running_var.uniform_(0.5, 2.0)
    ref[1].weight.normal_()
    ref[1].bias.normal_()
  model = create_model(
      tiny(image_size=32, patch_size=8, stem='conv', stem_channels=8),
      rngs=nnx.Rngs(0),
  )
  pe = model.patch_embed
  t = {k: v.numpy() for k, v in ref.state_dict().items()}
  pe.stem_conv.kernel[...] = t['0.weight'].transpose(2, 3, 1, 0)
  pe.stem_norm.scale[...] = t['1.weight']
  pe.stem_norm.bias[...] = t['1.bias']
  pe.stem_norm.mean[...] = t['1.running_mean']
  pe.stem_norm.var[...] = t['1.running_var']
  pe.proj.kernel[...] = t['3.weight'].transpose(2, 3, 1, 0)
  pe.proj.bias[...] = t['3.bias']
  x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  got = pe(jnp.asarray(x), train=False)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def _depthwise_inputs(rng, k):
  """x [2, 7, 6, 12], a k x k depthwise kernel and a bias, float32."""
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 12)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, 12)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
  return x, kernel, bias


def test_depthwise_conv_equals_grouped_conv():
  """The shift-and-add depthwise conv is exactly nnx.Conv's grouped conv."""
  from drpl_jax.models import layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for k in (3, 5):
    x, kernel, bias = _depthwise_inputs(rng, k)
    ref = (
        jax.lax.conv_general_dilated(
            x,
            kernel,
            (1, 1),
            ((k // 2, k // 2),) * 2,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=12,
        )
        + bias
    )
    np.testing.assert_allclose(
        layers.depthwise_conv(x, kernel, bias), ref, rtol=1e-5, atol=1e-5
    )


def test_depthwise_conv_fused_gradient_matches_autodiff():
  """The custom backward (variadic reductions of all taps) equals autodiff's."""
  from drpl_jax.models import layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  for k in (3, 5):
    x, kernel, bias = _depthwise_inputs(rng, k)
    target = jnp.asarray(rng.normal(size=(2, 7, 6, 12)), jnp.float32)

    def loss(x, kernel, bias, fused, target=target):
      out = layers.depthwise_conv(x, kernel, bias, fused_grad=fused)
      return jnp.sum(jnp.sin(out) * target)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    want, got = grad(x, kernel, bias, False), grad(x, kernel, bias, True)
    np.testing.assert_allclose(
        layers.depthwise_conv(x, kernel, bias, fused_grad=True),
        layers.depthwise_conv(x, kernel, bias),
        rtol=1e-6,
    )
    for name, w, g in zip(('x', 'kernel', 'bias'), want, got):
      assert g.shape == w.shape and g.dtype == w.dtype, name
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_conv_stem_trains_under_jit():
  """jit(grad) through the conv stem's max-pool (it once failed to linearize)."""
  cfg = ModelConfig(
      num_classes=3,
      image_size=32,
      patch_size=8,
      width=32,
      depth=1,
      num_heads=2,
      stem='conv',
      rpe=RPEConfig(kind='none'),
      conv=ConvConfig(kind='mlp'),
  )
  model = create_model(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.ones((2, 32, 32, 3))

  def loss(p, r):
    r = jax.tree.map(lambda v: v, r)
    out = nnx.merge(graphdef, p, r)(x, train=True)
    return jnp.mean(out[0] ** 2 + out[1] ** 2)

  grads = jax.jit(jax.grad(loss))(params, rest)
  norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads))
  assert np.isfinite(norm) and norm > 0
