"""torchvision ResNet (v1.5: stride in the 3x3 conv) as a Flax NNX module.

Attribute names mirror torchvision's state dict (`conv1`, `bn1`,
`layer1.0.conv1`, `layer1.0.downsample.0`, `fc`) so weights map
mechanically; see `drpl_jax.teacher.weights`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drpl_jax.teacher import common


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Block type and blocks per stage of one torchvision ResNet."""

  bottleneck: bool
  layers: tuple[int, int, int, int]
  classifier: ClassVar[str] = 'fc'

  @property
  def expansion(self) -> int:
    return 4 if self.bottleneck else 1


class _ResidualBlock(nnx.Module):
  """relu(bn_n(conv_n(...relu(bn1(conv1(x)))...)) + shortcut(x)).

  A subclass lists its convolutions in `CONVS`, one (kernel, whether it
  carries the block's stride, output width in units of `planes`) per conv;
  they are named `conv{i}` / `bn{i}` as in torchvision, and `downsample` is
  the projection shortcut when the shape changes.
  """

  CONVS: ClassVar[tuple[tuple[int, bool, int], ...]]

  def __init__(
      self,
      inplanes: int,
      planes: int,
      stride: int,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, rngs=rngs)
    width = inplanes
    for i, (kernel, strided, factor) in enumerate(self.CONVS, start=1):
      out = planes * factor
      conv_stride = stride if strided else 1
      setattr(
          self,
          f'conv{i}',
          common.conv(width, out, kernel, stride=conv_stride, **kw),
      )
      setattr(self, f'bn{i}', common.batch_norm(out, **kw))
      width = out
    self.downsample = common.projection(inplanes, width, stride, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = x
    for i in range(1, len(self.CONVS) + 1):
      if i > 1:
        out = jax.nn.relu(out)
      out = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(out))
    if self.downsample is not None:
      x = common.apply_conv_bn(self.downsample, x, relu=False)
    return jax.nn.relu(out + x)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs with a residual (ResNet-18/34)."""

  CONVS = ((3, True, 1), (3, False, 1))


class Bottleneck(_ResidualBlock):
  """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4 (ResNet-50+)."""

  CONVS = ((1, False, 1), (3, True, 1), (1, False, 4))


class ResNet(common.TeacherCNN):
  """A torchvision ResNet in inference mode; takes images in [0, 1]."""

  def __init__(
      self, spec: ResNetSpec, cfg: common.TeacherConfig, *, rngs: nnx.Rngs
  ):
    super().__init__(cfg)
    dtype = jnp.dtype(cfg.dtype)
    kw = dict(dtype=dtype, rngs=rngs)
    self.conv1 = common.conv(3, 64, 7, stride=2, padding=3, **kw)
    self.bn1 = common.batch_norm(64, **kw)
    block = Bottleneck if spec.bottleneck else BasicBlock
    inplanes = 64
    for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), spec.layers)):
      blocks = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block(inplanes, planes, stride, **kw))
        inplanes = planes * spec.expansion
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    self.fc = common.linear(inplanes, cfg.num_classes, **kw)

  def trunk(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = common.max_pool_3x3_s2(x)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for blk in stage:
        x = blk(x)
    return x

  def head(self) -> nnx.Linear:
    return self.fc
