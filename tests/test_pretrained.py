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

from drpl_jax import convert
from drpl_jax import pretrained
from drpl_jax.models import ModelConfig, count_params, create_model
from drpl_jax.pretrained import to_timm

torch = pytest.importorskip('torch')
vision_transformer = pytest.importorskip('timm.models.vision_transformer')
deit = pytest.importorskip('timm.models.deit')
timm_layers = pytest.importorskip('timm.layers')

pytestmark = pytest.mark.torch
W, HEADS = 32, 2  # width and heads of every tiny model here
HD = W // HEADS


def randomize(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'token' in name:
        t.add_(0.3 * torch.randn(t.shape, generator=g))
      elif 'pos_' in name or 'lookup_table' in name:
        t.normal_(0.0, 0.5, generator=g)
      elif t.ndim >= 2:
        t.normal_(0.0, int(np.prod(t.shape[1:])) ** -0.5, generator=g)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.normal_(0.0, 0.2, generator=g)
      elif name.endswith('running_var'):
        b.uniform_(0.5, 1.5, generator=g)
  return model.eval()


def sd_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(h=32, w=32, batch=2, seed=1):
  return np.random.default_rng(seed).standard_normal(
      (batch, h, w, 3)).astype(np.float32)


def torch_forward(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def config(**changes):
  d = dict(width=W, num_heads=HEADS, depth=2, patch_size=8, image_size=32,
           num_classes=4, distilled=False, rpe=dict(kind='none'),
           conv=dict(kind='mlp'))
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
        np.round(a + np.log(np.abs(rel[far]) / a) / math.log(g / a) *
                 (b - a)), b)
    out[far] = y.astype(np.int64)
    return out

  s = 2 * int(b) + 1
  ids = (piecewise(diff[..., 0]) + int(b)) * s + piecewise(diff[..., 1]) + (
      int(b))
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
    lookup = torch.einsum('bhld,hdn->bhln', x,
                          table.expand(HEADS, -1, -1))
    return torch.gather(lookup, -1, ids.expand(*lookup.shape[:2], -1, -1))

  def forward(self, x, **unused):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = HD ** -0.5
    q = q * scale
    ids = official_bucket_ids(*self.grid, n - self.grid[0] * self.grid[1],
                              self.ratio)
    attn = q @ k.transpose(-2, -1)
    if hasattr(self, 'rpe_k'):
      attn = attn + self._ctx(q, self.rpe_k.lookup_table_weight, ids)
    if hasattr(self, 'rpe_q'):
      attn = attn + self._ctx(k * scale, self.rpe_q.lookup_table_weight,
                              ids).transpose(2, 3)
    attn = attn.softmax(-1)
    out = attn @ v
    if hasattr(self, 'rpe_v'):
      table = self.rpe_v.lookup_table_weight.expand(HEADS, -1, -1)
      out = out + torch.einsum('bhij,hijd->bhid', attn, table[:, ids])
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def official_irpe_model(parts, shared, img=(32, 32), pos=True):
  torch.manual_seed(0)
  model = vision_transformer.VisionTransformer(
      img_size=img, patch_size=8, embed_dim=W, depth=2, num_heads=HEADS,
      num_classes=4, pos_embed='learn' if pos else 'none')
  grid = (img[0] // 8, img[1] // 8)
  for block in model.blocks:
    block.attn = OfficialRPEAttention(block.attn, parts, shared, grid)
  return randomize(model)


@pytest.mark.parametrize('parts,shared,img', [
    ('qkv', True, (32, 32)),  # the released _shared_qkv models, in small
    ('qk', False, (32, 48)),  # per-head tables, a non-square grid
])
def test_official_irpe_matches_the_official_formulas(parts, shared, img):
  square = img[0] == img[1]
  ref = official_irpe_model(parts, shared, img, pos=square)
  sd = sd_numpy(ref)
  assert sd['blocks.1.attn.rpe_k.lookup_table_weight'].shape == (
      1 if shared else HEADS, HD, 50)
  cfg = config(abs_pos_embed=square, rpe=dict(
      kind='irpe', on_q=True, on_k=True, on_v='v' in parts,
      shared_heads=shared))
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
  np.testing.assert_array_equal(table[...][..., -1, :], w[..., -1, :]
                                if not shared else w[0, -1])
  table[...] = jnp.asarray(w[0] if shared else w)
  assert np.abs(model(jnp.asarray(x)) - want).max() > 1e-3


def test_irpe_tables_into_a_model_without_them_are_reported():
  sd = sd_numpy(official_irpe_model('k', True))
  _, report = convert.student_from_timm(sd, config())
  assert report['ignored'] == ['blocks.0.attn.rpe_k.lookup_table_weight',
                               'blocks.1.attn.rpe_k.lookup_table_weight']
  assert 'no iRPE on k' in report['ignored_reasons'][report['ignored'][0]]
  with pytest.raises(ValueError, match=r'rpe_k\.lookup_table_weight '
                     r'\(3, 16, 50\).*got \(3, 50, 16\), need \(50, 16\)'):
    bad = dict(sd, **{'blocks.0.attn.rpe_k.lookup_table_weight':
                      np.zeros((3, HD, 50), np.float32)})
    convert.student_from_timm(bad, config(rpe=dict(kind='irpe')))
