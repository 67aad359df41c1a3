"""Building blocks of DRPL-ViT: norms, linear layers, MLP, LeFF, patch stem.

Numerics follow PyTorch/timm so imported weights give the same outputs: exact
(erf) GELU, LayerNorm eps 1e-6 (DeiT), BatchNorm eps 1e-5 and momentum 0.1 in
PyTorch's convention (0.9 in Flax's), explicit symmetric conv padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from drpl_jax.models import fence
from drpl_jax.models.config import ConvConfig, ModelConfig

Array = jax.Array
Grid = tuple[int, int]  # the patch-token grid: (rows, columns)

LN_EPS = 1e-6  # DeiT / timm ViT
BN_EPS = 1e-5  # PyTorch default
BN_MOMENTUM = 0.9  # Flax convention; PyTorch momentum 0.1

trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)


def jnp_dtype(name: str) -> jnp.dtype:
  """Maps a config dtype string ('float32', 'bfloat16', ...) to a dtype."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f'unknown dtype {name!r}') from e


def precision(cfg: ModelConfig) -> dict[str, jnp.dtype]:
  """A layer's `dtype` (compute) and `param_dtype` keywords from `cfg`."""
  return {
      'dtype': jnp_dtype(cfg.dtype),
      'param_dtype': jnp_dtype(cfg.param_dtype),
  }


def gelu(x: Array) -> Array:
  """Exact (erf) GELU, as torch.nn.GELU()."""
  return jax.nn.gelu(x, approximate=False)


def linear(
    in_features: int,
    out_features: int,
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> nnx.Linear:
  """A Linear with timm's ViT init (trunc-normal .02 weights, zero bias)."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=trunc_normal_02,
      bias_init=nnx.initializers.zeros_init(),
      rngs=rngs,
      **precision(cfg),
  )


def _norm_options(cfg: ModelConfig, rngs: nnx.Rngs) -> dict:
  """What every norm shares: two-pass (PyTorch-exact) variance, precision."""
  return {'use_fast_variance': False, 'rngs': rngs, **precision(cfg)}


def layer_norm(
    num_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs
) -> nnx.LayerNorm:
  """LayerNorm with eps 1e-6; statistics are computed in float32."""
  return nnx.LayerNorm(num_features, epsilon=LN_EPS, **_norm_options(cfg, rngs))


def batch_norm(
    num_features: int, cfg: ModelConfig, *, rngs: nnx.Rngs
) -> nnx.BatchNorm:
  """BatchNorm over all axes but the last, PyTorch eps and momentum."""
  return nnx.BatchNorm(
      num_features,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      **_norm_options(cfg, rngs),
  )


def apply_norm(norm: nnx.Module, x: Array, train: bool) -> Array:
  """Calls a LayerNorm or a BatchNorm (batch statistics iff `train`)."""
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=not train)
  return norm(x)


def draw_key(rngs: nnx.Rngs | None, what: str) -> Array:
  """A fresh key from the `dropout` stream, or a clear error without one."""
  if rngs is None:
    raise ValueError(
        f'{what} is active (train=True with a rate > 0) but no rngs were '
        'given: call model(images, train=True, '
        'rngs=nnx.Rngs(dropout=key)).'
    )
  return rngs.dropout()


def dropout(x: Array, rate: float, train: bool, rngs: nnx.Rngs | None) -> Array:
  """Inverted dropout; identity when not training or rate == 0."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(draw_key(rngs, 'dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(
    x: Array, rate: float, train: bool, rngs: nnx.Rngs | None
) -> Array:
  """Stochastic depth (timm): drops the whole residual branch per sample."""
  if not train or rate == 0.0:
    return x
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jax.random.bernoulli(draw_key(rngs, 'drop_path'), 1.0 - rate, shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LayerScale(nnx.Module):
  """Per-channel learned scale of a residual branch (CaiT)."""

  def __init__(self, dim: int, init: float, cfg: ModelConfig):
    self.gamma = nnx.Param(jnp.full((dim,), init, jnp_dtype(cfg.param_dtype)))

  def __call__(self, x: Array) -> Array:
    return x * self.gamma[...].astype(x.dtype)


class Mlp(nnx.Module):
  """The plain ViT feed-forward: fc1 -> GELU -> fc2, dropout after each."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    hidden = int(cfg.width * cfg.mlp_ratio)
    self.fc1 = linear(cfg.width, hidden, cfg, rngs=rngs)
    self.fc2 = linear(hidden, cfg.width, cfg, rngs=rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(
      self, x: Array, grid: Grid, *, train: bool, rngs: nnx.Rngs | None
  ) -> Array:
    del grid  # a per-token layer
    x = dropout(gelu(self.fc1(x)), self.dropout_rate, train, rngs)
    return dropout(self.fc2(x), self.dropout_rate, train, rngs)


def _shift_add(x: Array, kernel: Array) -> Array:
  """sum_ij pad(x)[:, i:i+H, j:j+W] * kernel[i, j, 0]: [B, H, W, C]."""
  k = kernel.shape[0]
  p = k // 2
  h, w = x.shape[1:3]
  kernel = kernel.astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H+2p, W+2p, C]
  out = xp[:, :h, :w] * kernel[0, 0, 0]
  for i in range(k):
    for j in range(k):
      if i or j:
        out = out + xp[:, i : i + h, j : j + w] * kernel[i, j, 0]
  return out


def depthwise_conv(
    x: Array, kernel: Array, bias: Array, *, fused_grad: bool = False
) -> Array:
  """Stride-1 depthwise conv with symmetric zero padding k//2.

  x [B, H, W, C], kernel [k, k, 1, C] (nnx.Conv's layout with
  feature_group_count=C), bias [C]. Written as k*k shifted multiply-adds: the
  same result as `lax.conv_general_dilated(..., feature_group_count=C)` but
  faster forward+backward on CPU, where XLA has no depthwise kernel,
  and fused into a few elementwise passes on GPU/TPU. `fused_grad` uses
  `_depthwise_conv_fused` (same values; a faster backward on XLA:CPU).
  """
  if fused_grad:
    return _depthwise_conv_fused(x, kernel, bias)
  return _shift_add(x, kernel) + bias.astype(x.dtype)


@jax.custom_vjp
def _depthwise_conv_fused(x: Array, kernel: Array, bias: Array) -> Array:
  """`depthwise_conv` whose kernel and bias gradients are one reduction.

  Autodiff of the shifted multiply-adds gives k*k separate reductions over
  [B, H, W] (one per tap), each reading x and the output gradient again;
  on XLA:CPU these took a quarter of the Ti/DRPL train step. Here all taps
  and the bias are summed by one variadic `lax.reduce` (one pass, float32
  accumulation, over the positions and then the batch), faster than the
  per-tap reductions (docs/performance.md). The input gradient is the same
  shifted multiply-add with the kernel flipped.
  """
  return _shift_add(x, kernel) + bias.astype(x.dtype)


def _dw_fwd(x: Array, kernel: Array, bias: Array):
  return _depthwise_conv_fused(x, kernel, bias), (x, kernel, bias)


def _dw_bwd(res, g: Array):
  x, kernel, bias = res
  k = kernel.shape[0]
  p = k // 2
  h, w = x.shape[1:3]
  dx = _shift_add(g, kernel[::-1, ::-1]).astype(x.dtype)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # [B, H+2p, W+2p, C]
  b, c = x.shape[0], x.shape[-1]
  g32 = g.astype(jnp.float32)
  terms = [
      (xp[:, i : i + h, j : j + w].astype(jnp.float32) * g32).reshape(
          b, h * w, c
      )
      for i in range(k)
      for j in range(k)
  ]
  terms.append(g32.reshape(b, h * w, c))
  add = lambda s, t: tuple(u + v for u, v in zip(s, t))
  zeros = (jnp.float32(0),) * len(terms)
  # Over the positions first, then the batch: XLA:CPU's reduction of all
  # three leading axes at once is slower (docs/performance.md).
  sums = jax.lax.reduce(tuple(terms), zeros, add, (1,))  # [B, C] each
  sums = jax.lax.reduce(sums, zeros, add, (0,))  # k*k + 1 arrays of [C]
  dkernel = jnp.stack(sums[:-1]).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel, sums[-1].astype(bias.dtype)


_depthwise_conv_fused.defvjp(_dw_fwd, _dw_bwd)


class LeFF(nnx.Module):
  """CeiT's locally-enhanced feed-forward on the patch grid.

  Patch tokens: expand -> norm -> GELU -> depthwise kxk conv -> norm -> GELU
  -> project -> norm. Prefix tokens either share expand/project and skip the
  depthwise stage (`prefix='shared'`) or pass unchanged (`'identity'`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    conv: ConvConfig = cfg.conv
    dim, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    norm = batch_norm if conv.norm == 'batch' else layer_norm
    pad = conv.kernel_size // 2
    self.expand = linear(dim, hidden, cfg, rngs=rngs)
    self.expand_norm = norm(hidden, cfg, rngs=rngs)
    self.dwconv = nnx.Conv(
        hidden,
        hidden,
        (conv.kernel_size, conv.kernel_size),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=hidden,
        use_bias=True,
        rngs=rngs,
        **precision(cfg),
    )
    self.dw_norm = norm(hidden, cfg, rngs=rngs)
    self.project = linear(hidden, dim, cfg, rngs=rngs)
    self.project_norm = norm(dim, cfg, rngs=rngs)
    self.num_prefix = cfg.num_prefix_tokens
    self.prefix_mode = conv.prefix
    self.dropout_rate = cfg.dropout_rate
    self.materialize = cfg.materialize

  def __call__(
      self, x: Array, grid: Grid, *, train: bool, rngs: nnx.Rngs | None
  ) -> Array:
    p = self.num_prefix
    prefix = x[:, :p]
    # Tokens that go through expand/project: all, or patches only.
    tokens = x if self.prefix_mode == 'shared' else x[:, p:]
    n_pre = p if self.prefix_mode == 'shared' else 0
    h = gelu(apply_norm(self.expand_norm, self.expand(tokens), train))
    h_pre, h_grid = h[:, :n_pre], h[:, n_pre:]
    b, n, e = h_grid.shape
    gh, gw = grid
    if gh * gw != n:
      raise ValueError(f'LeFF got {n} patch tokens for a {gh}x{gw} grid')
    h_grid = h_grid.reshape(b, gh, gw, e)  # [B, Gh, Gw, E]
    fences = fence.enabled(self.materialize)
    h_grid = depthwise_conv(
        h_grid,
        self.dwconv.kernel[...],
        self.dwconv.bias[...],
        fused_grad=fences,
    )
    if fences:
      # Keeps XLA:CPU from pulling the norms and GELUs around the conv into
      # each of its k*k shifted taps, forward and backward.
      h_grid = fence.fence(h_grid)
    h_grid = gelu(apply_norm(self.dw_norm, h_grid, train))
    h_grid = h_grid.reshape(b, n, e)  # [B, N, E]
    h = jnp.concatenate([h_pre, h_grid], axis=1)
    out = apply_norm(self.project_norm, self.project(h), train)
    out = dropout(out, self.dropout_rate, train, rngs)
    if self.prefix_mode == 'identity':
      out = jnp.concatenate([prefix.astype(out.dtype), out], axis=1)
    return out


def max_pool_3x3_s2(x: Array) -> Array:
  """3x3 stride-2 max-pool with explicit padding 1 (PyTorch MaxPool2d)."""
  # A Python scalar init: a traced array init makes jit(grad(.)) fail to
  # linearize reduce_window ("Linearization failed").
  return jax.lax.reduce_window(
      x,
      -jnp.inf,
      jax.lax.max,
      (1, 3, 3, 1),
      (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)),
  )


class PatchEmbed(nnx.Module):
  """Images [B, H, W, 3] -> patch features [B, H/p, W/p, D].

  stem='patch': one conv with kernel = stride = patch. stem='conv': CeiT's
  image-to-tokens stem, 7x7/2 conv (pad 3, no bias) -> BatchNorm -> 3x3/2
  max-pool (pad 1) -> conv with kernel = stride = patch / 4.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, pdtype = jnp_dtype(cfg.dtype), jnp_dtype(cfg.param_dtype)
    in_ch, patch = 3, cfg.patch_size
    if cfg.stem == 'conv':
      self.stem_conv = nnx.Conv(
          3,
          cfg.stem_channels,
          (7, 7),
          strides=(2, 2),
          padding=((3, 3), (3, 3)),
          use_bias=False,
          dtype=dtype,
          param_dtype=pdtype,
          rngs=rngs,
      )
      self.stem_norm = batch_norm(cfg.stem_channels, cfg, rngs=rngs)
      in_ch, patch = cfg.stem_channels, cfg.patch_size // 4
    self.proj = nnx.Conv(
        in_ch,
        cfg.width,
        (patch, patch),
        strides=(patch, patch),
        padding='VALID',
        dtype=dtype,
        param_dtype=pdtype,
        rngs=rngs,
    )
    self.stem = cfg.stem

  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.stem == 'conv':
      x = self.stem_norm(self.stem_conv(x), use_running_average=not train)
      x = max_pool_3x3_s2(x)
    return self.proj(x)
