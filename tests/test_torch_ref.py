"""The PyTorch twin of DRPL-ViT (drpl_jax/pytorch/twin/) against the Flax model.

Random models are made in each framework and converted to the other; the
two must give the same logits (eval and train mode), the same loss and
gradients, and the same AdamW step. Parameters are randomised to O(1)
activations (norm scales and biases, BatchNorm statistics, RPE tables), so
every component contributes to the logits and a mistake shows.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from drpl_jax.models import ModelConfig, create_model, param_names
from drpl_jax.train import losses
from drpl_jax.train import optim

torch = pytest.importorskip('torch')
torch_ref = pytest.importorskip('drpl_jax.pytorch.twin')
convert = pytest.importorskip('drpl_jax.pytorch.twin.convert')
train = pytest.importorskip('drpl_jax.pytorch.twin.train')
pytestmark = pytest.mark.torch

RPE = {
    'irpe_k': dict(kind='irpe'),
    'irpe_qkv_heads': dict(
        kind='irpe', on_q=True, on_k=True, on_v=True, shared_heads=False
    ),
    'bias': dict(kind='bias'),
    'none': dict(kind='none'),
}
CONV = {
    'leff_batch': dict(kind='leff', norm='batch'),
    'leff_layer': dict(kind='leff', norm='layer'),
    'mlp': dict(kind='mlp'),
}
# (rpe, conv, distilled, extra switches): every value of every switch, plus
# the conv stem, layer scale, CeiT's identity prefix, no pos_embed/qkv bias.
CASES = [
    ('irpe_k', 'leff_batch', True, {}),
    ('irpe_qkv_heads', 'leff_layer', False, {}),
    ('bias', 'mlp', True, {'stem': 'conv', 'stem_channels': 16}),
    (
        'none',
        'leff_batch',
        False,
        {'layer_scale_init': 0.5, 'conv_prefix': 'identity'},
    ),
    ('irpe_qkv_heads', 'mlp', True, {'qkv_bias': False}),
    ('bias', 'leff_layer', False, {}),
    ('none', 'mlp', True, {'abs_pos_embed': False}),
    (
        'irpe_k',
        'leff_batch',
        False,
        {'stem': 'conv', 'stem_channels': 8, 'layer_scale_init': 0.3},
    ),
]


def _case_id(case) -> str:
  r, c, d, e = case
  return f'{r}-{c}-{"distilled" if d else "plain"}' + ''.join(
      f'-{k}' for k in e
  )


def params(cases: list, fast: int) -> list:
  """The first `fast` cases run by default, the rest are marked slow.

  CASES[:4] already cover every value of every switch; the others add
  combinations (eager Flax ops compile per shape, seconds each on 2 cores).
  """
  return [
      pytest.param(
          c, id=_case_id(c), marks=() if i < fast else pytest.mark.slow
      )
      for i, c in enumerate(cases)
  ]


def micro(rpe: str, conv: str, distilled: bool, extra: dict) -> ModelConfig:
  """The micro variant on 32 px images with patch 8 (a 4x4 grid)."""
  extra = dict(extra)
  conv_cfg = dict(CONV[conv], prefix=extra.pop('conv_prefix', 'shared'))
  return ModelConfig.from_config(
      dict(
          variant='micro',
          num_classes=3,
          image_size=32,
          patch_size=8,
          distilled=distilled,
          rpe=RPE[rpe],
          conv=conv_cfg,
          **extra,
      )
  )


def flat_vars(model) -> list:
  """(path, Variable) of every parameter and BatchNorm statistic."""
  return [
      item
      for kind in (nnx.Param, nnx.BatchStat)
      for item in nnx.to_flat_state(nnx.state(model, kind))
  ]


def _fan_in_normal(rng, shape, fan_in):
  return rng.normal(0.0, fan_in**-0.5, shape)


def randomize_flax(model, seed: int = 0) -> None:
  """Random O(1) values for every Flax parameter and BatchNorm statistic."""
  rng = np.random.default_rng(seed)
  for path, var in flat_vars(model):
    leaf, shape = str(path[-1]), var.shape
    if leaf == 'kernel':
      value = _fan_in_normal(rng, shape, int(np.prod(shape[:-1])))
    elif leaf in ('scale', 'gamma'):
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'var':
      value = rng.uniform(0.5, 2.0, shape)
    else:  # biases, BN means, tokens, pos_embed, RPE tables
      value = rng.normal(0.0, 0.3, shape)
    var[...] = jnp.asarray(value, var.dtype)


def randomize_torch(model, seed: int = 0) -> None:
  """Random O(1) values for every PyTorch parameter and BN buffer."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      leaf = name.rpartition('.')[2]
      if leaf == 'num_batches_tracked':
        continue
      if leaf == 'weight' and t.ndim >= 2:
        fan_in = int(np.prod(t.shape[1:]))
        t.copy_(torch.randn(t.shape, generator=gen) * fan_in**-0.5)
      elif leaf in ('weight', 'gamma'):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif leaf == 'running_var':
        t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
      else:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def batch(size: int = 4, image: int = 32, seed: int = 0) -> np.ndarray:
  return (
      np.random.RandomState(seed)
      .randn(size, image, image, 3)
      .astype(np.float32)
  )


def nchw(x: np.ndarray) -> 'torch.Tensor':
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def as_list(out) -> list[np.ndarray]:
  if isinstance(out, (tuple, list)):
    return [
        np.asarray(o.detach().numpy() if hasattr(o, 'detach') else o)
        for o in out
    ]
  return [np.asarray(out.detach().numpy() if hasattr(out, 'detach') else out)]


def assert_same_logits(flax_model, torch_model, x: np.ndarray) -> None:
  """Eval mode, then train mode (BatchNorm with batch statistics)."""
  torch_model.eval()
  with torch.no_grad():
    want = as_list(torch_model(nchw(x)))
  got = as_list(flax_model(jnp.asarray(x), train=False))
  assert len(got) == len(want) == 1
  assert np.abs(want[0]).max() > 0.1  # the logits carry signal
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  # Train mode: (cls, dist) for distilled models; BN uses batch statistics.
  torch_model.train()
  with torch.no_grad():
    want = as_list(torch_model(nchw(x)))
  got = as_list(flax_model(jnp.asarray(x), train=True))
  assert len(got) == len(want) == (2 if flax_model.config.distilled else 1)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', params(CASES, fast=4))
def test_flax_model_converted_to_torch_gives_the_same_logits(case):
  cfg = micro(*case)
  model = create_model(cfg, rngs=nnx.Rngs(1))
  randomize_flax(model, seed=1)
  twin = torch_ref.flax_to_torch(model)
  assert not twin.training  # converted for inference
  assert_same_logits(model, twin, batch())


@pytest.mark.parametrize('case', params(CASES, fast=4))
def test_torch_model_converted_to_flax_gives_the_same_logits(case):
  cfg = micro(*case)
  torch.manual_seed(2)
  twin = torch_ref.DRPLViTTorch(cfg)
  randomize_torch(twin, seed=2)
  model = torch_ref.torch_to_flax(twin)
  assert_same_logits(model, twin, batch(seed=1))


@pytest.mark.parametrize('case', params(CASES, fast=4))
def test_round_trip_flax_torch_flax_is_exact(case):
  cfg = micro(*case)
  model = create_model(cfg, rngs=nnx.Rngs(3))
  randomize_flax(model, seed=3)
  back = torch_ref.torch_to_flax(
      torch_ref.flax_to_torch(model), rngs=nnx.Rngs(99)
  )
  want = flat_vars(model)
  got = dict(flat_vars(back))
  assert len(got) == len(want)
  for path, var in want:
    np.testing.assert_array_equal(got[path][...], var[...], err_msg=path)
  assert param_names(back) == param_names(model)


def test_state_dict_names_shapes_and_layouts():
  cfg = micro(
      'irpe_qkv_heads',
      'leff_batch',
      True,
      {'stem': 'conv', 'stem_channels': 16, 'layer_scale_init': 0.1},
  )
  model = create_model(cfg, rngs=nnx.Rngs(0))
  randomize_flax(model)
  sd = torch_ref.state_dict_from_flax(model)
  twin = torch_ref.DRPLViTTorch(cfg)
  assert set(sd) == set(twin.state_dict())
  for key, value in twin.state_dict().items():
    assert sd[key].shape == value.shape, key
  # Linear [in, out] -> [out, in]; conv [kh, kw, in, out] -> [out, in, kh, kw].
  q = np.asarray(model.blocks[0].attn.q.kernel[...])
  np.testing.assert_array_equal(sd['blocks.0.attn.q.weight'].numpy(), q.T)
  dw = np.asarray(model.blocks[1].ffn.dwconv.kernel[...])  # [3, 3, 1, E]
  np.testing.assert_array_equal(
      sd['blocks.1.ffn.dwconv.weight'].numpy(), dw.transpose(3, 2, 0, 1)
  )
  np.testing.assert_array_equal(
      sd['blocks.2.ffn.dw_norm.running_var'].numpy(),
      np.asarray(model.blocks[2].ffn.dw_norm.var[...]),
  )
  np.testing.assert_array_equal(
      sd['blocks.0.attn.rpe_v.table'].numpy(),
      np.asarray(model.blocks[0].attn.rpe_v.table[...]),
  )
  assert sd['blocks.0.norm1.weight'].shape == (64,)
  assert int(sd['patch_embed.stem_norm.num_batches_tracked']) == 0


def test_conversion_errors_name_the_keys():
  cfg = micro('irpe_k', 'leff_batch', True, {})
  twin = torch_ref.DRPLViTTorch(cfg)
  sd = twin.state_dict()
  model = create_model(cfg, rngs=nnx.Rngs(0))
  bad = dict(sd)
  del bad['blocks.1.attn.rpe_k.table']
  bad['blocks.1.attn.extra'] = torch.zeros(3)
  with pytest.raises(ValueError, match=r'rpe_k\.table.*attn\.extra'):
    torch_ref.load_torch_state_dict(model, bad)
  bad = dict(sd)
  bad['head.weight'] = torch.zeros(5, 64)
  with pytest.raises(ValueError, match='head.weight'):
    torch_ref.load_torch_state_dict(model, bad)
  # A state dict of another configuration (no dist token) is refused.
  plain = torch_ref.DRPLViTTorch(cfg.replace(distilled=False))
  with pytest.raises(ValueError, match='dist_token'):
    torch_ref.load_torch_state_dict(model, plain.state_dict())
  # num_batches_tracked is the only key that may be left over.
  torch_ref.load_torch_state_dict(model, sd)


def test_twin_initial_distributions_match_flax():
  """Same init families: trunc-normal .02, lecun-normal convs, zeros, ones."""
  cfg = ModelConfig.from_config(
      dict(
          variant='micro',
          num_classes=3,
          image_size=64,
          patch_size=8,
          rpe=dict(kind='bias'),
          conv=dict(kind='leff', norm='batch'),
      )
  )
  flax_model = create_model(cfg, rngs=nnx.Rngs(0))
  flax_sd = {
      **convert.torch_arrays(nnx.state(flax_model, nnx.Param)),
      **convert.torch_arrays(nnx.state(flax_model, nnx.BatchStat)),
  }
  torch.manual_seed(0)
  torch_sd = torch_ref.DRPLViTTorch(cfg).state_dict()
  for key, value in flax_sd.items():
    t = torch_sd[key].numpy()
    if value.std() == 0:  # zeros (biases, iRPE tables), ones (norms)
      np.testing.assert_array_equal(t, value, err_msg=key)
      continue
    if value.size < 256:  # tokens, prefix bias entries: trunc-normal .02
      assert 0 < np.abs(t).max() <= 0.04 + 1e-7, key
      assert 0 < np.abs(value).max() <= 0.04 + 1e-7, key
      continue
    np.testing.assert_allclose(t.std(), value.std(), rtol=0.15, err_msg=key)
    # Both are truncated at two standard deviations of the normal.
    assert np.abs(t).max() <= np.abs(value).max() * 1.05 + 1e-6, key
  assert float(torch_sd['blocks.0.attn.q.weight'].std()) == pytest.approx(
      0.02 * 0.88, rel=0.1
  )


def _flax_loss(graphdef, rest, x, labels, teacher, cfg):
  kind = 'hard' if cfg.distilled else 'none'

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    outputs = model(x, train=True)
    loss, _ = losses.total_loss(
        outputs, labels, teacher, distill_kind=kind, label_smoothing=0.1
    )
    return loss, nnx.state(model, nnx.BatchStat)

  return loss_fn


@pytest.mark.parametrize('case', params(CASES[:4], fast=2))
def test_one_training_step_matches(case):
  """Same weights and batch: same loss, gradients, AdamW step, BN stats."""
  cfg = micro(*case)
  model = create_model(cfg, rngs=nnx.Rngs(4))
  randomize_flax(model, seed=4)
  twin = torch_ref.flax_to_torch(model).train()
  x, labels = batch(seed=4), np.array([0, 1, 2, 1])
  teacher = np.random.RandomState(5).randn(4, 3).astype(np.float32)
  lr, wd = 1e-3, 0.5  # a large decay: a wrong decay mask shows

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_fn = _flax_loss(
      graphdef,
      rest,
      jnp.asarray(x),
      jnp.asarray(labels),
      jnp.asarray(teacher),
      cfg,
  )
  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params
  )
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(lr, weight_decay=wd, mask=optim.decay_mask),
  )
  updates, _ = tx.update(grads, tx.init(params), params)
  new_params = optax.apply_updates(params, updates)

  kind = 'hard' if cfg.distilled else 'none'
  out = twin(nchw(x))
  t_loss = train.TotalLoss(distill_kind=kind, label_smoothing=0.1)(
      out, torch.from_numpy(labels), torch.from_numpy(teacher)
  )
  t_loss.backward()
  np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-5)

  # Gradients, to a tolerance relative to the largest one: some are zero in
  # exact arithmetic (key biases: softmax ignores per-query constants; a
  # bias right before a train-mode BatchNorm) and only rounding noise.
  flax_grads = convert.torch_arrays(grads)
  torch_grads = {n: p.grad.numpy().copy() for n, p in twin.named_parameters()}
  assert set(flax_grads) == set(torch_grads)
  scale = max(np.abs(g).max() for g in torch_grads.values())
  for name, g in torch_grads.items():
    np.testing.assert_allclose(
        flax_grads[name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name
    )

  torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
  opt = train.make_optimizer(twin, lr=lr, weight_decay=wd)
  opt.step()
  # Adam's first step is lr * g / (|g| + eps): compared where the gradient
  # is not rounding noise (there its sign is arbitrary in both frameworks).
  flax_new = convert.torch_arrays(new_params)
  for name, p in twin.named_parameters():
    signal = np.abs(torch_grads[name]) > 1e-4 * scale
    np.testing.assert_allclose(
        flax_new[name][signal],
        p.detach().numpy()[signal],
        rtol=1e-5,
        atol=lr * 1e-2,
        err_msg=name,
    )
  _check_batch_norm_statistics(stats, twin)


def _check_batch_norm_statistics(stats, twin) -> None:
  """Running means agree after the train-mode forward (for running
  variances see test_batch_norm_running_variance_convention)."""
  flax_stats = convert.torch_arrays(stats)
  buffers = dict(twin.named_buffers())
  means = [k for k in flax_stats if k.endswith('running_mean')]
  for name in means:
    np.testing.assert_allclose(
        flax_stats[name],
        buffers[name].numpy(),
        rtol=1e-5,
        atol=1e-6,
        err_msg=name,
    )


def test_batch_norm_running_variance_convention():
  """PyTorch updates running_var with the unbiased batch variance, Flax
  with the biased one: after one train-mode forward they differ exactly by
  n / (n - 1) in the batch term (documented in DRPLViTTorch)."""
  cfg = micro('none', 'leff_batch', True, {})
  model = create_model(cfg, rngs=nnx.Rngs(0))
  randomize_flax(model)
  twin = torch_ref.flax_to_torch(model).train()
  v0 = np.asarray(model.blocks[0].ffn.dw_norm.var[...])
  x = batch(size=2)
  model(jnp.asarray(x), train=True)
  with torch.no_grad():
    twin(nchw(x))
  flax_var = np.asarray(model.blocks[0].ffn.dw_norm.var[...])
  torch_var = twin.blocks[0].ffn.dw_norm.running_var.numpy()
  n = 2 * 4 * 4  # batch x grid: the values each channel is normalised over
  batch_var = (flax_var - 0.9 * v0) / 0.1
  np.testing.assert_allclose(
      torch_var, 0.9 * v0 + 0.1 * batch_var * n / (n - 1), rtol=1e-4
  )


def test_attention_maps_heads_and_input_errors_match_flax():
  cfg = micro('irpe_qkv_heads', 'leff_batch', True, {})
  model = create_model(cfg, rngs=nnx.Rngs(6))
  randomize_flax(model, seed=6)
  twin = torch_ref.flax_to_torch(model)
  x = batch(size=2, seed=6)
  with torch.no_grad():
    feats, attn = twin.forward_features(nchw(x), return_attention=True)
    logits = twin.logits(feats)
    cls, dist = twin.heads(nchw(x))
  feats, want_attn = model.forward_features(
      jnp.asarray(x), return_attention=True
  )
  want_logits = model.logits(feats)
  np.testing.assert_allclose(logits.numpy(), want_logits, rtol=1e-5, atol=1e-5)
  assert len(attn) == len(want_attn) == 4
  for got, want in zip(attn, want_attn):
    assert got.shape == (2, 2, 18, 18)  # [B, heads, L, L]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
  want_cls, want_dist = model.heads(jnp.asarray(x))
  np.testing.assert_allclose(cls.numpy(), want_cls, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dist.numpy(), want_dist, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'NCHW \[B, 3, H, W\]'):
    twin(torch.from_numpy(x))  # NHWC by mistake
  with pytest.raises(ValueError, match='image_size 32'):
    twin(torch.zeros(1, 3, 48, 48))


def test_bfloat16_compute_twin_returns_float32_logits():
  cfg = micro('irpe_k', 'leff_layer', True, {})
  model = create_model(cfg, rngs=nnx.Rngs(7))
  randomize_flax(model, seed=7)
  twin32 = torch_ref.flax_to_torch(model)
  twin16 = torch_ref.DRPLViTTorch(cfg.replace(dtype='bfloat16'))
  twin16.load_state_dict(twin32.state_dict())
  twin16.eval()
  x = nchw(batch(size=2))
  with torch.no_grad():
    out16, out32 = twin16(x), twin32(x)
  assert out16.dtype == torch.float32
  assert twin16.cls_token.dtype == torch.float32  # param_dtype float32
  assert not torch.equal(out16, out32)  # bf16 arithmetic happened
  np.testing.assert_allclose(out16.numpy(), out32.numpy(), atol=0.1)


def test_importing_drpl_jax_does_not_import_torch():
  code = (
      'import sys, drpl_jax, drpl_jax.models, drpl_jax.train.losses, '
      'drpl_jax.train.step; '
      'assert "torch" not in sys.modules, "torch imported"'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_twin_drop_path_and_dropout_act_only_in_training():
  cfg = micro('irpe_k', 'leff_layer', False, {}).replace(
      drop_path_rate=0.5, dropout_rate=0.1, attn_dropout_rate=0.1
  )
  twin = torch_ref.DRPLViTTorch(cfg)
  rates = [b.drop_path_rate for b in twin.blocks]
  np.testing.assert_allclose(rates, np.linspace(0, 0.5, 4))  # as Flax
  x = nchw(batch(size=8))
  twin.train()
  torch.manual_seed(0)
  a = twin(x)
  torch.manual_seed(1)
  b = twin(x)
  assert not torch.allclose(a, b)
  twin.eval()
  torch.testing.assert_close(twin(x), twin(x), rtol=0, atol=0)


def test_bfloat16_parameters_convert_both_ways_exactly():
  cfg = micro('irpe_k', 'leff_batch', True, {}).replace(
      param_dtype='bfloat16', dtype='bfloat16'
  )
  model = create_model(cfg, rngs=nnx.Rngs(8))
  twin = torch_ref.flax_to_torch(model)
  assert twin.blocks[0].attn.q.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      twin.blocks[0].attn.q.weight.detach().float().numpy(),
      np.asarray(model.blocks[0].attn.q.kernel[...], np.float32).T,
  )
  with torch.no_grad():
    out = twin(nchw(batch(size=2)))
  assert out.dtype == torch.float32 and torch.isfinite(out).all()
  back = torch_ref.torch_to_flax(twin)
  for (path, want), (_, got) in zip(flat_vars(model), flat_vars(back)):
    assert got.dtype == want.dtype, path
    np.testing.assert_array_equal(
        np.asarray(got[...], np.float32), np.asarray(want[...], np.float32)
    )
