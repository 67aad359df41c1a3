"""torchvision RegNetY (`regnet_y_*`) as a Flax NNX module.

Stem: 3x3/2 conv to 32 channels, BN, ReLU. Four stages of residual
bottleneck blocks (1x1, grouped 3x3 carrying the stride, squeeze-excite,
1x1), bottleneck multiplier 1, SE width round(0.25 * block input width).
Attribute names mirror torchvision's state dict (`stem.0`,
`trunk_output.block1.block1-0.f.a.0`, `...f.se.fc1`, `...proj.1`, `fc`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from drpl_jax.teacher import common


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
  """Per-stage depths, widths and group widths of one RegNetY.

  These are the outputs of torchvision's `BlockParams.from_init_params`
  (quantised widths, then `_adjust_widths_groups_compatibilty`), listed so
  that no torch is needed; a test checks them against torchvision.
  """

  depths: tuple[int, int, int, int]
  widths: tuple[int, int, int, int]
  group_widths: tuple[int, int, int, int]
  se_ratio: float = 0.25
  bottleneck_multiplier: float = 1.0
  stem_width: int = 32
  classifier: ClassVar[str] = 'fc'


class SqueezeExcitation(nnx.Module):
  """Global pool, 1x1 conv (bias) + ReLU, 1x1 conv (bias) + sigmoid, scale."""

  def __init__(
      self, channels: int, squeeze: int, *, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    kw = dict(use_bias=True, dtype=dtype, rngs=rngs)
    self.fc1 = common.conv(channels, squeeze, 1, **kw)
    self.fc2 = common.conv(squeeze, channels, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    s = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    s = jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))))
    return x * s


class BottleneckTransform(nnx.Module):
  """a: 1x1, b: grouped 3x3 (stride), se, c: 1x1 without activation."""

  def __init__(
      self,
      width_in: int,
      width_out: int,
      stride: int,
      group_width: int,
      spec: RegNetSpec,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, rngs=rngs)
    w_b = int(round(width_out * spec.bottleneck_multiplier))
    groups = w_b // group_width
    self.a = common.conv_bn(width_in, w_b, 1, **kw)
    self.b = common.conv_bn(w_b, w_b, 3, stride=stride, groups=groups, **kw)
    # The SE width is relative to the block's input width (torchvision).
    squeeze = int(round(spec.se_ratio * width_in))
    self.se = SqueezeExcitation(w_b, squeeze, **kw) if spec.se_ratio else None
    self.c = common.conv_bn(w_b, width_out, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = common.apply_conv_bn(self.a, x, relu=True)
    x = common.apply_conv_bn(self.b, x, relu=True)
    if self.se is not None:
      x = self.se(x)
    return common.apply_conv_bn(self.c, x, relu=False)


class ResBottleneckBlock(nnx.Module):
  """relu(proj(x) + f(x)); proj is a 1x1 conv + BN when the shape changes."""

  def __init__(self, f: BottleneckTransform, proj: nnx.List | None):
    self.proj = proj
    self.f = f

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x
    if self.proj is not None:
      shortcut = common.apply_conv_bn(self.proj, x, relu=False)
    return jax.nn.relu(shortcut + self.f(x))


class AnyStage(nnx.Module):
  """One stage: blocks named `block{stage}-{i}` as in torchvision."""

  def __init__(
      self,
      stage: int,
      width_in: int,
      width_out: int,
      depth: int,
      group_width: int,
      spec: RegNetSpec,
      *,
      dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, rngs=rngs)
    self.block_names = tuple(f'block{stage}-{i}' for i in range(depth))
    for i, name in enumerate(self.block_names):
      # The first block changes the width and halves the resolution.
      w_in, stride = (width_in, 2) if i == 0 else (width_out, 1)
      proj = common.projection(w_in, width_out, stride, **kw)
      f = BottleneckTransform(w_in, width_out, stride, group_width, spec, **kw)
      setattr(self, name, ResBottleneckBlock(f, proj))

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.block_names:
      x = getattr(self, name)(x)
    return x


class TrunkOutput(nnx.Module):
  """The four stages, named block1..block4."""

  def __init__(self, spec: RegNetSpec, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    width = spec.stem_width
    self.num_stages = len(spec.depths)
    stages = zip(spec.depths, spec.widths, spec.group_widths)
    for i, (depth, width_out, group_width) in enumerate(stages):
      setattr(
          self,
          f'block{i + 1}',
          AnyStage(
              i + 1,
              width,
              width_out,
              depth,
              group_width,
              spec,
              dtype=dtype,
              rngs=rngs,
          ),
      )
      width = width_out

  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_stages):
      x = getattr(self, f'block{i + 1}')(x)
    return x


class RegNet(common.TeacherCNN):
  """A torchvision RegNetY in inference mode; takes images in [0, 1]."""

  def __init__(
      self, spec: RegNetSpec, cfg: common.TeacherConfig, *, rngs: nnx.Rngs
  ):
    super().__init__(cfg)
    kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    self.stem = common.conv_bn(3, spec.stem_width, 3, stride=2, **kw)
    self.trunk_output = TrunkOutput(spec, **kw)
    self.fc = common.linear(spec.widths[-1], cfg.num_classes, **kw)

  def trunk(self, x: jax.Array) -> jax.Array:
    return self.trunk_output(common.apply_conv_bn(self.stem, x, relu=True))

  def head(self) -> nnx.Linear:
    return self.fc
