"""Tests of the relative position encodings (drpl_jax/models/rpe.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drpl_jax.models import rpe
from drpl_jax.models.resample import resample_grid


@pytest.mark.parametrize(
    'ratio, xs, expected',
    [
        # ratio 1.9: alpha 1.9, beta 3.8, gamma 15.2, ln(gamma/alpha) = ln 8.
        # x=2: 1.9 + ln(2/1.9)/ln8*1.9 = 1.947 -> 2;  x=3: 2.317 -> 2;
        # x=4: 2.580 -> 3;  x=5: 2.784 -> 3;  x=8: 3.213 -> 3;
        # x=14: 3.725 -> round 4 -> min(3.8) -> int 3;  x=20: 4.05 -> 3.
        (1.9, [0, 1, 2, 3, 4, 5, 8, 14, 20], [0, 1, 2, 2, 3, 3, 3, 3, 3]),
        # ratio 1: alpha 1, beta 2, gamma 8.
        # x=2: 1 + ln2/ln8 = 1.333 -> 1;  x=3: 1.528 -> 2;  x=5: 1.774 -> 2;
        # x=8: 2.0 -> 2;  x=20: 2.44 -> 2 (capped at beta).
        (1.0, [0, 1, 2, 3, 5, 8, 20], [0, 1, 1, 2, 2, 2, 2]),
    ],
)
def test_piecewise_index_hand_computed(ratio, xs, expected):
  alpha, beta, gamma = rpe.irpe_params(ratio)
  got = rpe.piecewise_index(np.array(xs), alpha, beta, gamma)
  np.testing.assert_array_equal(got, expected)
  neg = rpe.piecewise_index(-np.array(xs), alpha, beta, gamma)
  np.testing.assert_array_equal(neg, -np.array(expected))
  assert got.dtype == np.int64


def test_irpe_params_and_bucket_counts():
  assert rpe.irpe_params(1.9) == pytest.approx((1.9, 3.8, 15.2))
  assert rpe.irpe_num_buckets(1.9) == 50  # 7 x 7 + 1 prefix bucket
  assert rpe.irpe_num_buckets(1.0) == 26  # 5 x 5 + 1


def test_bucket_matrix_properties():
  gh, gw, p, ratio = 5, 7, 2, 1.9
  ids = rpe.irpe_bucket_ids(gh, gw, p, ratio)
  n = gh * gw
  assert ids.shape == (p + n, p + n)
  # Every pair with a prefix token uses the one extra bucket (49).
  assert (ids[:p, :] == 49).all() and (ids[:, :p] == 49).all()
  patch = ids[p:, p:]
  assert patch.min() >= 0 and patch.max() < 49
  # b(i, j) depends only on the displacement pos_i - pos_j.
  pos = [(r, c) for r in range(gh) for c in range(gw)]
  by_disp = {}
  for i, j in itertools.product(range(n), range(n)):
    d = (pos[i][0] - pos[j][0], pos[i][1] - pos[j][1])
    assert by_disp.setdefault(d, patch[i, j]) == patch[i, j]
  # Zero displacement is the centre bucket (3 * 7 + 3); neighbours differ.
  assert by_disp[(0, 0)] == 24
  near = [by_disp[(dy, dx)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
  assert len(set(near)) == 9
  # The piecewise index is odd, so b(i, j) and b(j, i) mirror each other.
  np.testing.assert_array_equal(patch + patch.T, 48)
  # Far displacements share buckets: the 9x13 displacements map to <= 49.
  assert len(set(by_disp.values())) <= 49


def test_bucket_ids_cover_all_buckets_on_a_large_grid():
  ids = rpe.irpe_bucket_ids(14, 14, 2, 1.9)
  assert set(np.unique(ids)) == set(range(50))


def test_bucket_ids_are_cached_and_read_only():
  a = rpe.irpe_bucket_ids(4, 4, 2, 1.9)
  assert a is rpe.irpe_bucket_ids(4, 4, 2, 1.9)
  with pytest.raises(ValueError):
    a[0, 0] = 1
  assert rpe.irpe_bucket_ids(4, 4, 1, 1.9).shape == (17, 17)


def _random_irpe(shared, heads=2, hd=4, seed=0):
  mod = rpe.IRPE(heads, hd, 1.9, shared, jnp.float32)
  assert (mod.table[...] == 0).all()  # zero init, as the reference code
  mod.table[...] = jax.random.normal(jax.random.key(seed), mod.table.shape)
  return mod


def _table_for_head(table, h):
  return table if table.ndim == 2 else table[h]


@pytest.mark.parametrize('shared', [True, False])
def test_irpe_terms_match_brute_force(shared):
  grid, p, b, heads, hd = (3, 2), 2, 2, 2, 4
  n = p + grid[0] * grid[1]
  mod = _random_irpe(shared, heads, hd)
  table = np.asarray(mod.table[...])
  assert table.shape == ((50, hd) if shared else (heads, 50, hd))
  ids = rpe.irpe_bucket_ids(*grid, p, 1.9)
  rng = np.random.RandomState(1)
  x = rng.randn(b, n, heads, hd).astype(np.float32)
  probs = rng.rand(b, heads, n, n).astype(np.float32)
  key_bias = np.asarray(mod.key_bias(jnp.asarray(x), grid, p))
  query_bias = np.asarray(mod.query_bias(jnp.asarray(x), grid, p))
  value = np.asarray(mod.value_term(jnp.asarray(probs), grid, p))
  want_k = np.zeros((b, heads, n, n), np.float32)
  want_q = np.zeros_like(want_k)
  want_v = np.zeros((b, n, heads, hd), np.float32)
  for bb, h, i, j in itertools.product(
      range(b), range(heads), range(n), range(n)
  ):
    r = _table_for_head(table, h)[ids[i, j]]
    want_k[bb, h, i, j] = x[bb, i, h] @ r
    want_q[bb, h, i, j] = x[bb, j, h] @ r
    want_v[bb, i, h] += probs[bb, h, i, j] * r
  np.testing.assert_allclose(key_bias, want_k, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(query_bias, want_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, want_v, rtol=1e-5, atol=1e-5)


def _bias_module(gh=3, gw=4, heads=2):
  return rpe.RPEBias(gh, gw, heads, jnp.float32, rngs=nnx.Rngs(0))


def test_rpe_bias_translation_invariant_and_prefix_entries():
  gh, gw, heads, p = 3, 4, 2, 2
  mod = _bias_module(gh, gw, heads)
  assert mod.table.shape == ((2 * gh - 1) * (2 * gw - 1), heads)
  assert mod.prefix.shape == (3, heads)
  bias = np.asarray(mod((gh, gw), p))
  assert bias.shape == (heads, p + gh * gw, p + gh * gw)

  def tok(r, c):
    return p + r * gw + c

  checked = 0
  for r1, c1, r2, c2 in itertools.product(
      range(gh), range(gw), range(gh), range(gw)
  ):
    for dr, dc in ((1, 0), (0, 1), (1, 1)):
      if r1 + dr < gh and r2 + dr < gh and c1 + dc < gw and c2 + dc < gw:
        np.testing.assert_array_equal(
            bias[:, tok(r1, c1), tok(r2, c2)],
            bias[:, tok(r1 + dr, c1 + dc), tok(r2 + dr, c2 + dc)],
        )
        checked += 1
  assert checked > 100
  # Distinct displacements read distinct table entries.
  idx = rpe.bias_index(gh, gw, p)
  assert len(np.unique(idx[p:, p:])) == (2 * gh - 1) * (2 * gw - 1)
  prefix = np.asarray(mod.prefix[...])
  np.testing.assert_array_equal(
      bias[:, :p, p:],
      np.broadcast_to(prefix[0][:, None, None], (heads, p, gh * gw)),
  )
  np.testing.assert_array_equal(
      bias[:, p:, :p],
      np.broadcast_to(prefix[1][:, None, None], (heads, gh * gw, p)),
  )
  np.testing.assert_array_equal(
      bias[:, :p, :p], np.broadcast_to(prefix[2][:, None, None], (heads, p, p))
  )


def test_rpe_bias_zero_displacement_entry():
  gh, gw = 3, 4
  mod = _bias_module(gh, gw)
  bias = np.asarray(mod((gh, gw), 1))
  centre = (gh - 1) * (2 * gw - 1) + (gw - 1)
  for t in range(1, 1 + gh * gw):
    np.testing.assert_array_equal(bias[:, t, t], mod.table[...][centre])


def test_rpe_bias_wrong_grid_is_a_clear_error():
  mod = _bias_module(3, 3)
  with pytest.raises(ValueError, match='resize'):
    mod((4, 4), 2)


def test_rpe_bias_resize_follows_grid():
  mod = _bias_module(3, 3, heads=2)
  mod.table[...] = jnp.full(mod.table.shape, 0.25)
  prefix = np.asarray(mod.prefix[...])
  mod.resize(5, 6)
  assert mod.table.shape == (9 * 11, 2)
  np.testing.assert_allclose(mod.table[...], 0.25, rtol=1e-6)
  np.testing.assert_array_equal(mod.prefix[...], prefix)
  assert mod((5, 6), 2).shape == (2, 32, 32)


def test_resample_grid_constant_and_identity():
  const = jnp.full((4, 4, 3), -1.5)
  np.testing.assert_allclose(resample_grid(const, (7, 5)), -1.5, rtol=1e-6)
  x = jax.random.normal(jax.random.key(0), (4, 4, 3))
  assert resample_grid(x, (4, 4)) is x
  with pytest.raises(ValueError):
    resample_grid(x[0], (2, 2))


@pytest.mark.torch
def test_resample_grid_matches_timm_interpolation():
  torch = pytest.importorskip('torch')
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  x = np.random.RandomState(0).randn(5, 5, 3).astype(np.float32)
  for hw in ((8, 8), (3, 3), (5, 9)):
    got = np.asarray(resample_grid(jnp.asarray(x), hw))
    want = (
        F.interpolate(
            torch.from_numpy(x).permute(2, 0, 1)[None],
            size=hw,
            mode='bicubic',
            antialias=True,
            align_corners=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
