"""torchvision DenseNet (BC, pre-activation) as a Flax NNX module.

Attribute names mirror torchvision's state dict
(`features.conv0`, `features.denseblock1.denselayer1.norm1`,
`features.transition1.conv`, `features.norm5`, `classifier`). Each dense
layer is BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the concatenation of all
earlier feature maps, in torchvision's order [block input, layer 1, ...].
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drpl_jax.teacher import common


@dataclasses.dataclass(frozen=True)
class DenseNetSpec:
  """Growth rate, layers per block and stem width of one DenseNet."""

  growth_rate: int
  block_config: tuple[int, int, int, int]
  num_init_features: int
  bn_size: int = 4
  classifier: ClassVar[str] = 'classifier'


class DenseLayer(nnx.Module):
  """norm1-relu-conv1 (1x1 to bn_size*growth) then norm2-relu-conv2 (3x3)."""

  def __init__(
      self,
      in_features: int,
      growth_rate: int,
      bn_size: int,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, rngs=rngs)
    inner = bn_size * growth_rate
    self.norm1 = common.batch_norm(in_features, **kw)
    self.conv1 = common.conv(in_features, inner, 1, **kw)
    self.norm2 = common.batch_norm(inner, **kw)
    self.conv2 = common.conv(inner, growth_rate, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv1(jax.nn.relu(self.norm1(x)))
    return self.conv2(jax.nn.relu(self.norm2(x)))


class DenseBlock(nnx.Module):
  """`num_layers` dense layers named denselayer1..N; output concatenated."""

  def __init__(
      self,
      num_layers: int,
      in_features: int,
      growth_rate: int,
      bn_size: int,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.num_layers = num_layers
    for i in range(num_layers):
      layer = DenseLayer(
          in_features + i * growth_rate,
          growth_rate,
          bn_size,
          dtype=dtype,
          rngs=rngs,
      )
      setattr(self, f'denselayer{i + 1}', layer)

  def __call__(self, x: jax.Array) -> jax.Array:
    features = [x]
    for i in range(self.num_layers):
      layer = getattr(self, f'denselayer{i + 1}')
      features.append(layer(jnp.concatenate(features, axis=-1)))
    return jnp.concatenate(features, axis=-1)  # [B, H, W, C_in + L * growth]


class Transition(nnx.Module):
  """norm-relu-conv1x1 (halves the channels) then avg-pool 2x2/2."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    self.norm = common.batch_norm(in_features, dtype=dtype, rngs=rngs)
    self.conv = common.conv(
        in_features, out_features, 1, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(jax.nn.relu(self.norm(x)))
    # PyTorch AvgPool2d(2, 2): no padding, odd trailing row/column dropped.
    return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding='VALID')


class DenseNetFeatures(nnx.Module):
  """torchvision's `DenseNet.features` (stem, blocks, transitions, norm5)."""

  def __init__(self, spec: DenseNetSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    width = spec.num_init_features
    self.conv0 = common.conv(3, width, 7, stride=2, padding=3, **kw)
    self.norm0 = common.batch_norm(width, **kw)
    self.num_blocks = len(spec.block_config)
    for i, num_layers in enumerate(spec.block_config):
      block = DenseBlock(
          num_layers, width, spec.growth_rate, spec.bn_size, **kw
      )
      setattr(self, f'denseblock{i + 1}', block)
      width += num_layers * spec.growth_rate
      if i != self.num_blocks - 1:
        setattr(self, f'transition{i + 1}', Transition(width, width // 2, **kw))
        width //= 2
    self.norm5 = common.batch_norm(width, **kw)
    self.out_features = width

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.norm0(self.conv0(x)))
    x = common.max_pool_3x3_s2(x)
    for i in range(self.num_blocks):
      x = getattr(self, f'denseblock{i + 1}')(x)
      if i != self.num_blocks - 1:
        x = getattr(self, f'transition{i + 1}')(x)
    return self.norm5(x)


class DenseNet(common.TeacherCNN):
  """A torchvision DenseNet in inference mode; takes images in [0, 1]."""

  def __init__(
      self, spec: DenseNetSpec, cfg: common.TeacherConfig, *, rngs: nnx.Rngs
  ):
    super().__init__(cfg)
    dtype = jnp.dtype(cfg.dtype)
    self.features = DenseNetFeatures(spec, dtype=dtype, rngs=rngs)
    self.classifier = common.linear(
        self.features.out_features, cfg.num_classes, dtype=dtype, rngs=rngs
    )

  def trunk(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.features(x))  # final BN + ReLU before pooling.

  def head(self) -> nnx.Linear:
    return self.classifier
