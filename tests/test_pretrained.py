"""Importing official iRPE, CeiT and big_vision checkpoints; to-timm.

No network: each test builds a tiny checkpoint with the official key names
and layouts (read from the reference code) from a model whose outputs are
computed independently (timm, the PyTorch twin, or the official formulas
written out below), imports it and compares outputs.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DEIT_OVERRIDES, randomize_torch_model, tiny_demo_config
from conftest import run_module
from drpl_jax import pretrained
from drpl_jax.models import ModelConfig, count_params, create_model
from drpl_jax.pretrained import to_timm
from drpl_jax.pytorch import convert

torch = pytest.importorskip('torch')
vision_transformer = pytest.importorskip('timm.models.vision_transformer')
deit = pytest.importorskip('timm.models.deit')
timm_layers = pytest.importorskip('timm.layers')

pytestmark = pytest.mark.torch
W, HEADS = 32, 2  # width and heads of every tiny model here
HD = W // HEADS


def sd_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(h=32, w=32, batch=2, seed=1):
  return (
      np.random.default_rng(seed)
      .standard_normal((batch, h, w, 3))
      .astype(np.float32)
  )


def torch_forward(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def config(**changes):
  d = dict(
      width=W,
      num_heads=HEADS,
      depth=2,
      patch_size=8,
      image_size=32,
      num_classes=4,
      distilled=False,
      rpe=dict(kind='none'),
      conv=dict(kind='mlp'),
  )
  d.update(changes)
  return ModelConfig.from_config(d)


# --- Official iRPE, written out from the paper's code's formulas ----------


def official_bucket_ids(gh, gw, skip, ratio):
  """get_bucket_ids_2d of irpe.py (product method), independently."""
  a, b, g = ratio, 2 * ratio, 8 * ratio
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
  pos = np.stack([rows.ravel(), cols.ravel()], -1)
  diff = pos[:, None] - pos[None, :]  # pos1 - pos2

  def piecewise(rel):
    out = rel.copy()
    far = np.abs(rel) > a
    y = np.sign(rel[far]) * np.minimum(
        np.round(a + np.log(np.abs(rel[far]) / a) / math.log(g / a) * (b - a)),
        b,
    )
    out[far] = y.astype(np.int64)
    return out

  s = 2 * int(b) + 1
  ids = (
      (piecewise(diff[..., 0]) + int(b)) * s
      + piecewise(diff[..., 1])
      + (int(b))
  )
  n = gh * gw
  out = np.full((skip + n, skip + n), s * s, np.int64)
  out[skip:, skip:] = ids
  return torch.from_numpy(out)


class _Table(torch.nn.Module):

  def __init__(self, shape):
    super().__init__()
    self.lookup_table_weight = torch.nn.Parameter(torch.zeros(shape))


class OfficialRPEAttention(torch.nn.Module):
  """RPEAttention of rpe_vision_transformer.py (contextual product iRPE)."""

  def __init__(self, attn, parts, shared, grid, ratio=1.9):
    super().__init__()
    self.qkv, self.proj = attn.qkv, attn.proj
    n = 1 if shared else HEADS
    nb = (2 * int(2 * ratio) + 1) ** 2 + 1
    for part in 'qkv':
      if part in parts:
        shape = (n, nb, HD) if part == 'v' else (n, HD, nb)
        setattr(self, f'rpe_{part}', _Table(shape))
    self.grid, self.ratio = grid, ratio

  def _ctx(self, x, table, ids):  # ret[b,h,i,j] = x_i . W[:, ids[i, j]]
    lookup = torch.einsum('bhld,hdn->bhln', x, table.expand(HEADS, -1, -1))
    return torch.gather(lookup, -1, ids.expand(*lookup.shape[:2], -1, -1))

  def forward(self, x, **unused):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = HD**-0.5
    q = q * scale
    ids = official_bucket_ids(
        *self.grid, n - self.grid[0] * self.grid[1], self.ratio
    )
    attn = q @ k.transpose(-2, -1)
    if hasattr(self, 'rpe_k'):
      attn = attn + self._ctx(q, self.rpe_k.lookup_table_weight, ids)
    if hasattr(self, 'rpe_q'):
      attn = attn + self._ctx(
          k * scale, self.rpe_q.lookup_table_weight, ids
      ).transpose(2, 3)
    attn = attn.softmax(-1)
    out = attn @ v
    if hasattr(self, 'rpe_v'):
      table = self.rpe_v.lookup_table_weight.expand(HEADS, -1, -1)
      out = out + torch.einsum('bhij,hijd->bhid', attn, table[:, ids])
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def official_irpe_model(parts, shared, img=(32, 32), pos=True):
  torch.manual_seed(0)
  model = vision_transformer.VisionTransformer(
      img_size=img,
      patch_size=8,
      embed_dim=W,
      depth=2,
      num_heads=HEADS,
      num_classes=4,
      pos_embed='learn' if pos else 'none',
  )
  grid = (img[0] // 8, img[1] // 8)
  for block in model.blocks:
    block.attn = OfficialRPEAttention(block.attn, parts, shared, grid)
  return randomize_torch_model(model)


@pytest.mark.parametrize(
    'parts,shared,img',
    [
        ('qkv', True, (32, 32)),  # the released _shared_qkv models, in small
        ('qkv', False, (32, 48)),  # per-head tables, a non-square grid
        ('qk', True, (32, 32)),  # the released _shared_qk model, in small
    ],
)
def test_official_irpe_matches_the_official_formulas(parts, shared, img):
  square = img[0] == img[1]
  ref = official_irpe_model(parts, shared, img, pos=square)
  sd = sd_numpy(ref)
  assert sd['blocks.1.attn.rpe_k.lookup_table_weight'].shape == (
      1 if shared else HEADS,
      HD,
      50,
  )
  cfg = config(
      abs_pos_embed=square,
      rpe=dict(
          kind='irpe',
          on_q=True,
          on_k=True,
          on_v='v' in parts,
          shared_heads=shared,
      ),
  )
  model, report = convert.student_from_timm(sd, cfg)
  assert report['format'] == 'irpe' and report['fresh'] == []
  assert 'blocks.0.attn.rpe_q.table' in report['loaded']
  x = images(*img)
  want = torch_forward(ref, x)
  np.testing.assert_allclose(model(jnp.asarray(x)), want, atol=1e-4)
  # The q table's grid rows must be reversed: loaded as stored, the
  # function differs (so the test above can fail).
  w = sd['blocks.0.attn.rpe_q.lookup_table_weight'].transpose(0, 2, 1)
  table = model.blocks[0].attn.rpe_q.table
  np.testing.assert_array_equal(
      table[...][..., -1, :], w[..., -1, :] if not shared else w[0, -1]
  )
  table[...] = jnp.asarray(w[0] if shared else w)
  assert np.abs(model(jnp.asarray(x)) - want).max() > 1e-3


def test_irpe_tables_into_a_model_without_them_are_reported():
  sd = sd_numpy(official_irpe_model('k', True))
  _, report = convert.student_from_timm(sd, config())
  assert report['ignored'] == [
      'blocks.0.attn.rpe_k.lookup_table_weight',
      'blocks.1.attn.rpe_k.lookup_table_weight',
  ]
  assert 'no iRPE on k' in report['ignored_reasons'][report['ignored'][0]]
  with pytest.raises(
      ValueError,
      match=r'rpe_k\.lookup_table_weight '
      r'\(3, 16, 50\).*got \(3, 50, 16\), need \(50, 16\)',
  ):
    bad = dict(
        sd,
        **{
            'blocks.0.attn.rpe_k.lookup_table_weight': np.zeros(
                (3, HD, 50), np.float32
            )
        },
    )
    convert.student_from_timm(bad, config(rpe=dict(kind='irpe')))


# --- CeiT ------------------------------------------------------------------


def ceit_state_from_twin(twin, depth=2):
  """The twin's weights under ceit_model.py's names, plus a random LCA."""
  from drpl_jax.pytorch.twin.model import DRPLViTTorch  # noqa: F401

  sd = sd_numpy(twin)
  out = {}
  ren = {
      'patch_embed.stem_conv.': 'i2t.backbone.conv.',
      'patch_embed.stem_norm.': 'i2t.backbone.bn.',
      'patch_embed.proj.': 'i2t.proj.',
      'ffn.expand.': 'leff.conv1.',
      'ffn.dwconv.': 'leff.conv2.',
      'ffn.project.': 'leff.conv3.',
      'ffn.expand_norm.': 'leff.bn1.',
      'ffn.dw_norm.': 'leff.bn2.',
      'ffn.project_norm.': 'leff.bn3.',
  }
  for key, value in sd.items():
    if '.attn.' in key and key.split('.')[-2] in 'qkv':
      continue
    new = key
    for a, b in ren.items():
      new = new.replace(a, b)
    if new.endswith(('conv1.weight', 'conv3.weight')) and value.ndim == 2:
      value = value[:, :, None, None]  # a linear layer as a 1x1 conv
    out[new] = value
  for i in range(depth):
    a = f'blocks.{i}.attn.'
    out[a + 'qkv.weight'] = np.concatenate(
        [sd[f'{a}{x}.weight'] for x in 'qkv']
    )
    out[a + 'qkv.bias'] = np.concatenate([sd[f'{a}{x}.bias'] for x in 'qkv'])
  rng = np.random.default_rng(0)
  for name, shape in (
      ('lca.norm1.weight', (W,)),
      ('lca.attn.qkv.weight', (3 * W, W)),
      ('lca.attn.proj.weight', (W, W)),
      ('lca.feedforward.fc1.weight', (4 * W, W)),
      ('pos_layer_embed', (1, depth, W)),
  ):
    out[name] = rng.standard_normal(shape).astype(np.float32)
  return out


def test_official_ceit_imports_stem_leff_and_batchnorm_statistics():
  from drpl_jax.pytorch.twin.model import DRPLViTTorch

  cfg = config(
      stem='conv',
      stem_channels=8,
      patch_size=16,
      image_size=64,
      conv=dict(kind='leff', prefix='identity'),
  )
  torch.manual_seed(0)
  twin = randomize_torch_model(DRPLViTTorch(cfg))
  sd = ceit_state_from_twin(twin)
  assert sd['blocks.0.leff.conv1.weight'].shape == (4 * W, W, 1, 1)
  assert sd['i2t.backbone.conv.weight'].shape == (8, 3, 7, 7)
  model, report = convert.student_from_timm(sd, cfg)
  assert report['format'] == 'ceit' and report['fresh'] == []
  assert 'blocks.1.ffn.dw_norm.var' in report['loaded']
  reasons = report['ignored_reasons']
  assert 'LCA' in reasons['lca.attn.qkv.weight']
  assert 'LCA' in reasons['pos_layer_embed']
  assert 'i2t.backbone.bn.num_batches_tracked' in reasons
  assert any('lca' in n for n in report['notes'])
  x = images(64, 64)
  with torch.no_grad():
    want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(model(jnp.asarray(x)), want, atol=1e-4)
  # The official 64-channel stem into the 32-channel one is named.
  with pytest.raises(
      ValueError,
      match=r'i2t\.backbone\.conv\.weight '
      r'\(8, 3, 7, 7\).*need \(7, 7, 3, 4\)',
  ):
    convert.student_from_timm(sd, cfg.replace(stem_channels=4))


def test_ceit_tiny_parameter_count_matches_the_official_architecture():
  """CeiT-T = ours (stem conv, LeFF, 1000 classes) + LCA + pos_layer_embed.

  The official count, 6.4M, needs the 64-channel image-to-tokens stem.
  """
  cfg = ModelConfig.from_config(
      dict(
          variant='ti',
          stem='conv',
          distilled=False,
          num_classes=1000,
          rpe=dict(kind='none'),
          conv=dict(kind='leff', prefix='identity'),
      )
  )
  assert cfg.stem_channels == 64
  ours = count_params(
      nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
  )
  d = cfg.width
  lca = (
      4 * d
      + (3 * d * d + 3 * d)
      + (d * d + d)
      + (4 * d * d + 4 * d)
      + (4 * d * d + d)
  )  # norms, attention, MLP
  total = ours + lca + cfg.depth * d  # + pos_layer_embed
  assert total == 6_356_904
  assert round(total / 1e6, 1) == 6.4


# --- big_vision / vision_transformer .npz ---------------------------------


def npz_from_timm(sd, big_vision=False, depth=2):
  """A timm ViT state dict in the flax layout of the official releases."""
  p = 'params/' if big_vision else ''
  out = {
      p
      + 'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
      p + 'embedding/bias': sd['patch_embed.proj.bias'],
      p + 'cls': sd['cls_token'],
      p + 'Transformer/encoder_norm/scale': sd['norm.weight'],
      p + 'Transformer/encoder_norm/bias': sd['norm.bias'],
      p + 'head/kernel': sd['head.weight'].T,
      p + 'head/bias': sd['head.bias'],
  }
  if big_vision:
    out[p + 'pos_embedding'] = sd['pos_embed']
  else:
    out['Transformer/posembed_input/pos_embedding'] = sd['pos_embed']
  mha, ln2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
  blocks = []
  for i in range(depth):
    t, b = f'blocks.{i}.', {}
    b['LayerNorm_0/scale'], b['LayerNorm_0/bias'] = (
        sd[t + 'norm1.weight'],
        sd[t + 'norm1.bias'],
    )
    b[f'LayerNorm_{ln2}/scale'] = sd[t + 'norm2.weight']
    b[f'LayerNorm_{ln2}/bias'] = sd[t + 'norm2.bias']
    qkv_w = np.split(sd[t + 'attn.qkv.weight'], 3)
    qkv_b = np.split(sd[t + 'attn.qkv.bias'], 3)
    m = f'MultiHeadDotProductAttention_{mha}/'
    for name, w_, b_ in zip(('query', 'key', 'value'), qkv_w, qkv_b):
      b[m + name + '/kernel'] = w_.T.reshape(W, HEADS, HD)
      b[m + name + '/bias'] = b_.reshape(HEADS, HD)
    b[m + 'out/kernel'] = sd[t + 'attn.proj.weight'].T.reshape(HEADS, HD, W)
    b[m + 'out/bias'] = sd[t + 'attn.proj.bias']
    for j in range(2):
      d_ = f'MlpBlock_{mlp}/Dense_{j}/'
      b[d_ + 'kernel'] = sd[f'{t}mlp.fc{j + 1}.weight'].T
      b[d_ + 'bias'] = sd[f'{t}mlp.fc{j + 1}.bias']
    blocks.append(b)
  for i, b in enumerate(blocks):
    for k, v in b.items():
      if big_vision:  # scanned: one stacked array per name
        out[f'{p}Transformer/encoderblock/{k}'] = np.stack(
            [bb[k] for bb in blocks]
        )
      else:
        out[f'Transformer/encoderblock_{i}/{k}'] = v
  return out


def timm_vit(img=32, classes=4, **kw):
  torch.manual_seed(0)
  return randomize_torch_model(
      vision_transformer.VisionTransformer(
          img_size=img,
          patch_size=8,
          embed_dim=W,
          depth=2,
          num_heads=HEADS,
          num_classes=classes,
          **kw,
      )
  )


@pytest.mark.parametrize('big_vision', [False, True])
def test_npz_imports_and_matches_timm(tmp_path, big_vision):
  ref = timm_vit(no_embed_class=big_vision)
  path = tmp_path / 'vit.npz'
  np.savez(path, **npz_from_timm(sd_numpy(ref), big_vision))
  # The layout is the official one: timm's own npz loader reads it back.
  check = timm_vit(no_embed_class=big_vision)
  for t in check.parameters():
    t.data.zero_()
  vision_transformer._load_weights(check, str(path))
  x = images()
  want = torch_forward(ref, x)
  np.testing.assert_allclose(torch_forward(check, x), want, atol=1e-5)
  model, report = convert.student_from_timm(str(path), config())
  assert report['format'] == 'big_vision' and report['fresh'] == []
  np.testing.assert_allclose(model(jnp.asarray(x)), want, atol=1e-4)


def test_npz_resized_resolution_and_wrong_shapes_are_named(tmp_path):
  ref = timm_vit()
  sd = sd_numpy(ref)
  path = tmp_path / 'vit.npz'
  npz = npz_from_timm(sd)
  np.savez(path, **npz)
  model, report = convert.student_from_timm(str(path), config(image_size=48))
  assert report['resized']['pos_embed']['grid_to'] == [6, 6]
  big = timm_vit(img=48)
  sd48 = dict(
      sd,
      pos_embed=timm_layers.resample_abs_pos_embed(
          torch.from_numpy(sd['pos_embed']), [6, 6], num_prefix_tokens=1
      ).numpy(),
  )
  big.load_state_dict({k: torch.from_numpy(v) for k, v in sd48.items()})
  x = images(48, 48)
  np.testing.assert_allclose(
      model(jnp.asarray(x)), torch_forward(big, x), atol=1e-4
  )
  key = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'
  np.savez(path, **dict(npz, **{key: npz[key][:, :64]}))
  with pytest.raises(
      ValueError,
      match=rf'{key} \(32, 64\)\).*got \(32, 64\), need \(32, 128\)',
  ):
    convert.student_from_timm(str(path), config())
  truncated = tmp_path / 'cut.npz'
  truncated.write_bytes(path.read_bytes()[:2000])
  with pytest.raises(ValueError, match=r'cut\.npz: not a readable \.npz'):
    convert.student_from_timm(str(truncated), config())


# --- 1000 classes into 4, and back to timm --------------------------------


def test_1000_class_checkpoint_into_4_classes_compares_features(tmp_path):
  torch.manual_seed(0)
  ref = randomize_torch_model(
      deit.VisionTransformerDistilled(
          img_size=32,
          patch_size=16,
          embed_dim=64,
          depth=4,
          num_heads=2,
          num_classes=1000,
      )
  )
  path = tmp_path / 'deit_in1k.safetensors'
  from safetensors.torch import save_file

  save_file(ref.state_dict(), str(path))
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
  assert out['format'] == 'timm'
  assert 'head.kernel' in out['report']['fresh']
  assert out['parity']['compared'] == 'features'
  assert out['parity']['max_abs_diff'] < 1e-4
  assert out['parity']['max_abs_value'] > 0.5
  assert '--num_classes 1000' in out['parity']['note']


def test_to_timm_loads_strictly_and_gives_the_same_logits():
  torch.manual_seed(0)
  src = randomize_torch_model(
      deit.VisionTransformerDistilled(
          img_size=32,
          patch_size=8,
          embed_dim=W,
          depth=2,
          num_heads=HEADS,
          num_classes=4,
      )
  )
  model, _ = convert.student_from_timm(sd_numpy(src), config(distilled=True))
  state = to_timm.timm_state_dict(model)
  back = deit.VisionTransformerDistilled(
      img_size=32,
      patch_size=8,
      embed_dim=W,
      depth=2,
      num_heads=HEADS,
      num_classes=4,
  )
  back.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=True
  )
  x = images()
  np.testing.assert_allclose(
      torch_forward(back.eval(), x), model(jnp.asarray(x)), atol=1e-5
  )
  assert (
      to_timm.timm_model_name(
          ModelConfig.from_config(dict(variant='s', distilled=True))
      )
      == 'deit_small_distilled_patch16_224'
  )
  with pytest.raises(ValueError, match='PyTorch twin'):
    to_timm.timm_state_dict(
        create_model(config(rpe=dict(kind='irpe')), rngs=nnx.Rngs(0))
    )


def test_init_from_ceit_file_loads_batchnorm_statistics(tmp_path):
  """config.init_from: the detected format; BatchNorm statistics in rest."""
  import ml_collections
  from safetensors.numpy import save_file
  from drpl_jax.train import student_init
  from drpl_jax.pytorch.twin.model import DRPLViTTorch

  cfg = config(
      stem='conv',
      stem_channels=8,
      patch_size=16,
      image_size=64,
      conv=dict(kind='leff', prefix='identity'),
  )
  torch.manual_seed(0)
  sd = ceit_state_from_twin(randomize_torch_model(DRPLViTTorch(cfg)))
  path = tmp_path / 'ceit.safetensors'
  save_file(sd, str(path))
  config_ = ml_collections.ConfigDict(
      dict(
          init_from=str(path),
          model=dict(
              width=W,
              num_heads=HEADS,
              depth=2,
              patch_size=16,
              image_size=64,
              num_classes=4,
              distilled=False,
              rpe=dict(kind='none'),
              stem='conv',
              stem_channels=8,
              conv=dict(kind='leff', prefix='identity'),
          ),
      )
  )
  _, p, rest = nnx.split(create_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  new_p, new_rest, report = student_init.init_from_checkpoint(config_, p, rest)
  assert report['format'] == 'ceit' and report['fresh'] == []
  flat = {
      '.'.join(map(str, k)): np.asarray(v[...])
      for k, v in nnx.to_flat_state(new_rest)
  }
  np.testing.assert_array_equal(
      flat['blocks.1.ffn.dw_norm.var'], sd['blocks.1.leff.bn2.running_var']
  )
  np.testing.assert_array_equal(
      flat['patch_embed.stem_norm.mean'], sd['i2t.backbone.bn.running_mean']
  )


def test_formats_are_detected_and_remote_paths_read_through_epath(
    tmp_path, monkeypatch
):
  from drpl_jax.pretrained import formats

  sd = sd_numpy(timm_vit())
  assert pretrained.detect_format(sd) == 'timm'
  assert pretrained.detect_format(npz_from_timm(sd)) == 'big_vision'
  with pytest.raises(
      ValueError, match=r'not a checkpoint of a known format.*conv1\.weight'
  ):
    pretrained.detect_format({'conv1.weight': np.zeros(3)})
  path = tmp_path / 'vit.safetensors'
  from safetensors.numpy import save_file

  save_file(sd, str(path))
  # A gs:// path takes the epath route (a local temporary copy); here the
  # route is taken for a local file, which epath also opens.
  monkeypatch.setattr(formats, '_is_remote', lambda p: True)
  got = pretrained.read_checkpoint(str(path))
  np.testing.assert_array_equal(got['pos_embed'], sd['pos_embed'])
  path.write_bytes(path.read_bytes()[:500])  # truncated
  with pytest.raises(ValueError, match=r'vit\.safetensors: not a readable'):
    pretrained.read_checkpoint(str(path))
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    pretrained.read_checkpoint(str(tmp_path / 'nope.npz'))


def test_cli_to_timm_writes_a_trained_run_timm_loads_strictly(
    demo_data_dir, tmp_path, capsys
):
  """A one-step deit run -> to-timm -> timm strict load, same logits."""
  from drpl_jax.evaluation import predict
  from drpl_jax.train import loop as train

  config_ = tiny_demo_config(demo_data_dir, 1, **DEIT_OVERRIDES)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config_, workdir)
  capsys.readouterr()  # the run's own console lines
  out = str(tmp_path / 'deit.safetensors')
  proc = run_module(
      'drpl_jax.convert', 'to-timm', '--workdir', workdir, '--out', out
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout)
  assert result['target'] == 'timm' and result['step'] == 1
  model = predict.restore_model(workdir).model()
  cfg = model.config
  from safetensors.torch import load_file

  ref = deit.VisionTransformerDistilled(
      img_size=cfg.image_size,
      patch_size=cfg.patch_size,
      embed_dim=cfg.width,
      depth=cfg.depth,
      num_heads=cfg.num_heads,
      num_classes=cfg.num_classes,
  )
  ref.load_state_dict(load_file(out), strict=True)
  x = images(cfg.image_size, cfg.image_size)
  np.testing.assert_allclose(
      torch_forward(ref.eval(), x), model(jnp.asarray(x)), atol=1e-4
  )


@pytest.mark.slow
def test_to_timm_deit_tiny_loads_into_timm_create_model():
  import timm

  cfg = ModelConfig.from_config(
      dict(
          variant='ti',
          distilled=True,
          rpe=dict(kind='none'),
          conv=dict(kind='mlp'),
      )
  )
  model = create_model(cfg, rngs=nnx.Rngs(0))
  name = to_timm.timm_model_name(cfg)
  assert name == 'deit_tiny_distilled_patch16_224'
  ref = timm.create_model(name, pretrained=False, num_classes=4)
  ref.load_state_dict(
      {
          k: torch.from_numpy(v)
          for k, v in to_timm.timm_state_dict(model).items()
      },
      strict=True,
  )
  x = images(224, 224, batch=1)
  np.testing.assert_allclose(
      torch_forward(ref.eval(), x), model(jnp.asarray(x)), atol=1e-4
  )
