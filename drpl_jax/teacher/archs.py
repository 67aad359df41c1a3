"""The table of supported teacher architectures and the teacher factory."""

from __future__ import annotations

import functools

from flax import nnx

from drpl_jax.teacher.common import TeacherConfig
from drpl_jax.teacher.densenet import DenseNet, DenseNetSpec
from drpl_jax.teacher.regnet import RegNet, RegNetSpec
from drpl_jax.teacher.resnet import ResNet, ResNetSpec

ArchSpec = ResNetSpec | DenseNetSpec | RegNetSpec

# torchvision's configurations. RegNetY rows are what torchvision's
# `BlockParams.from_init_params(depth, w_0, w_a, w_m, group_width,
# se_ratio=0.25)` yields for each model (checked against torchvision in
# tests/test_teacher_convert.py).
TEACHER_ARCHS: dict[str, ArchSpec] = {
    'resnet18': ResNetSpec(bottleneck=False, layers=(2, 2, 2, 2)),
    'resnet34': ResNetSpec(bottleneck=False, layers=(3, 4, 6, 3)),
    'resnet50': ResNetSpec(bottleneck=True, layers=(3, 4, 6, 3)),
    'resnet101': ResNetSpec(bottleneck=True, layers=(3, 4, 23, 3)),
    'resnet152': ResNetSpec(bottleneck=True, layers=(3, 8, 36, 3)),
    'densenet121': DenseNetSpec(32, (6, 12, 24, 16), 64),
    'densenet161': DenseNetSpec(48, (6, 12, 36, 24), 96),
    'densenet169': DenseNetSpec(32, (6, 12, 32, 32), 64),
    'densenet201': DenseNetSpec(32, (6, 12, 48, 32), 64),
    **{
        f'regnet_y_{name}': RegNetSpec(depths, widths, (group_width,) * 4)
        for name, (depths, widths, group_width) in {
            # torchvision's RegNetY: blocks and widths of the 4 stages, and
            # the group width that all four share.
            '400mf': ((1, 3, 6, 6), (48, 104, 208, 440), 8),
            '800mf': ((1, 3, 8, 2), (64, 144, 320, 784), 16),
            '1_6gf': ((2, 6, 17, 2), (48, 120, 336, 888), 24),
            '3_2gf': ((2, 5, 13, 1), (72, 216, 576, 1512), 24),
            '8gf': ((2, 4, 10, 1), (224, 448, 896, 2016), 56),
            '16gf': ((2, 4, 11, 1), (224, 448, 1232, 3024), 112),
            '32gf': ((2, 5, 12, 1), (232, 696, 1392, 3712), 232),
            '128gf': ((2, 7, 17, 1), (528, 1056, 2904, 7392), 264),
        }.items()
    },
}

Teacher = ResNet | DenseNet | RegNet


def arch_spec(arch: str) -> ArchSpec:
  """The table entry of `arch`, with an error listing the known names."""
  if arch not in TEACHER_ARCHS:
    raise ValueError(
        f'unknown teacher arch {arch!r}; known: {sorted(TEACHER_ARCHS)}'
    )
  return TEACHER_ARCHS[arch]


def create_teacher(cfg: TeacherConfig, *, rngs: nnx.Rngs) -> Teacher:
  """Builds the Flax teacher for `cfg.arch` (random weights, eval mode).

  The module maps [B, H, W, 3] images in [0, 1] to [B, num_classes] float32
  logits with BatchNorm running averages and no gradient; it normalises and
  resizes its input itself (see `common.preprocess`). Load real weights with
  `load_torch_weights` or use `drpl_jax.teacher.load.torch_teacher`.
  """
  spec = arch_spec(cfg.arch)
  if isinstance(spec, ResNetSpec):
    return ResNet(spec, cfg, rngs=rngs)
  if isinstance(spec, DenseNetSpec):
    return DenseNet(spec, cfg, rngs=rngs)
  return RegNet(spec, cfg, rngs=rngs)


@functools.lru_cache(maxsize=16)
def _abstract_split(cfg: TeacherConfig) -> tuple[nnx.GraphDef, nnx.State]:
  module = nnx.eval_shape(lambda: create_teacher(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(module)


def abstract_teacher(cfg: TeacherConfig) -> Teacher:
  """The teacher of `cfg` with shapes but no values (`jax.ShapeDtypeStruct`).

  For filling from a checkpoint without a random init first. Tracing the
  constructor takes seconds for the deep members, so the result is cached
  per config; every call returns fresh, independent variables.
  """
  graphdef, state = _abstract_split(cfg)
  return nnx.merge(graphdef, state, copy=True)
