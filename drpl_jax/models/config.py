"""Typed model configuration for DRPL-ViT.

The ml_collections config flows once into these frozen dataclasses
(`ModelConfig.from_config`); layers only ever see the dataclass, never the
global config or the device mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

RPE_KINDS = ('irpe', 'bias', 'none')
CONV_KINDS = ('leff', 'mlp')
CONV_NORMS = ('batch', 'layer')
CONV_PREFIX = ('shared', 'identity')
STEMS = ('patch', 'conv')
DTYPES = ('float32', 'bfloat16', 'float16')
# '' = auto: the explicit path on the CPU, elsewhere
# jax.nn.dot_product_attention's own choice; 'xla' and 'cudnn' are
# dot_product_attention backends; 'explicit' = softmax(q k^T) v written out
# with heads folded into the batch.
ATTENTION_IMPLS = ('', 'xla', 'cudnn', 'explicit')
MATERIALIZE_MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class Variant:
  """Width, depth and heads of one model size."""

  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0


# DeiT sizes (Touvron et al. 2021) plus a tiny one for tests and the demo.
VARIANTS: dict[str, Variant] = {
    'micro': Variant(width=64, depth=4, num_heads=2),
    'ti': Variant(width=192, depth=12, num_heads=3),
    's': Variant(width=384, depth=12, num_heads=6),
    'b': Variant(width=768, depth=12, num_heads=12),
}


@dataclasses.dataclass(frozen=True)
class RPEConfig:
  """Relative position encoding of each attention layer.

  kind: 'irpe' (Wu et al. 2021: contextual, product method, piecewise
    buckets), 'bias' (Swin-style learned table plus BEiT-style prefix
    entries) or 'none'.
  ratio: iRPE bucket ratio; alpha, beta, gamma = 1, 2, 8 times ratio.
  on_q, on_k, on_v: where iRPE is applied (keys by default).
  shared_heads: one iRPE table for all heads (default) or one per head.
  """

  kind: str = 'irpe'
  ratio: float = 1.9
  on_q: bool = False
  on_k: bool = True
  on_v: bool = False
  shared_heads: bool = True

  def __post_init__(self):
    _check_choices(self, 'rpe.', kind=RPE_KINDS)
    if self.kind == 'irpe' and not (self.on_q or self.on_k or self.on_v):
      raise ValueError(
          'rpe.kind=irpe needs at least one of rpe.on_q, rpe.on_k, rpe.on_v'
      )
    if self.ratio <= 0:
      raise ValueError(f'rpe.ratio must be > 0, got {self.ratio}')


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """The feed-forward part of each encoder block.

  kind: 'leff' (CeiT locally-enhanced feed-forward with a depthwise conv on
    the patch grid) or 'mlp' (plain ViT MLP).
  kernel_size: depthwise kernel (odd).
  norm: norm inside the LeFF branch, 'batch' (CeiT) or 'layer'.
  prefix: how the prefix (cls, dist) tokens pass a LeFF: 'shared' (through
    the expand and project layers, skipping only the depthwise stage) or
    'identity' (unchanged, as CeiT's cls token).
  """

  kind: str = 'leff'
  kernel_size: int = 3
  norm: str = 'batch'
  prefix: str = 'shared'

  def __post_init__(self):
    _check_choices(
        self, 'conv.', kind=CONV_KINDS, norm=CONV_NORMS, prefix=CONV_PREFIX
    )
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(
          f'conv.kernel_size must be a positive odd number, got '
          f'{self.kernel_size}'
      )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines one DRPL-ViT.

  Presets of the paper's ablations are combinations of `distilled`,
  `rpe.kind` and `conv.kind` (see configs/drpl_vit.py).
  """

  num_classes: int = 4
  image_size: int = 224
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  distilled: bool = True
  abs_pos_embed: bool = True
  stem: str = 'patch'
  # CeiT's image-to-tokens stem width (ceit_model.Image2Tokens: 64).
  stem_channels: int = 64
  rpe: RPEConfig = dataclasses.field(default_factory=RPEConfig)
  conv: ConvConfig = dataclasses.field(default_factory=ConvConfig)
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attn_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  # Backend of the fused attention ('' = JAX default, 'cudnn' = the fused
  # cuDNN kernel on NVIDIA GPUs; needs dtype bfloat16/float16).
  attention_impl: str = ''
  # Materialisation fences for XLA:CPU in training (models/fence.py):
  # 'auto' = on when JAX's default backend is the CPU, 'on', 'off'.
  materialize: str = 'auto'

  def __post_init__(self):
    _check_choices(
        self,
        '',
        stem=STEMS,
        dtype=DTYPES,
        param_dtype=DTYPES,
        attention_impl=ATTENTION_IMPLS,
        materialize=MATERIALIZE_MODES,
    )
    if self.attention_impl == 'cudnn' and self.dtype == 'float32':
      raise ValueError(
          "model.attention_impl='cudnn' needs dtype "
          "'bfloat16' or 'float16', got 'float32'"
      )
    if self.num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {self.num_classes}')
    if self.width % self.num_heads:
      raise ValueError(
          f'width {self.width} is not divisible by num_heads '
          f'{self.num_heads}'
      )
    if self.image_size % self.patch_size:
      raise ValueError(
          f'image_size {self.image_size} is not divisible by '
          f'patch_size {self.patch_size}'
      )
    if self.stem == 'conv' and self.patch_size % 4:
      raise ValueError(
          'stem=conv downsamples by 4 before its patch conv, '
          f'so patch_size must be a multiple of 4, got '
          f'{self.patch_size}'
      )
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(
          f'drop_path_rate must be in [0, 1), got {self.drop_path_rate}'
      )

  @property
  def grid_size(self) -> int:
    """Patches per side of the (square) token grid."""
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    """1 (cls) or 2 (cls, dist)."""
    return 2 if self.distilled else 1

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """Builds a ModelConfig from a (ml_collections) mapping.

    `variant` (micro/ti/s/b), when given, fills width, depth, num_heads and
    mlp_ratio; explicit keys override it. Unknown keys are an error that
    names them.
    """
    if isinstance(cfg, ModelConfig):
      return cfg
    d = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
    variant = d.pop('variant', None)
    kwargs: dict[str, Any] = {}
    if variant:
      if variant not in VARIANTS:
        raise ValueError(
            f'model.variant={variant!r} is not one of {sorted(VARIANTS)}'
        )
      kwargs.update(dataclasses.asdict(VARIANTS[variant]))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f'unknown model config keys: {unknown}')
    for key, sub in (('rpe', RPEConfig), ('conv', ConvConfig)):
      if key in d and not isinstance(d[key], sub):
        sub_d = dict(d[key])
        sub_known = {f.name for f in dataclasses.fields(sub)}
        bad = sorted(set(sub_d) - sub_known)
        if bad:
          raise ValueError(f'unknown model.{key} config keys: {bad}')
        d[key] = sub(**sub_d)
    for key, value in d.items():
      if value is not None or key == 'layer_scale_init':
        kwargs[key] = value
    if kwargs.get('layer_scale_init') in (0, 0.0):
      kwargs['layer_scale_init'] = None
    return cls(**kwargs)


def _check_choices(
    config: Any, section: str, /, **choices: tuple[str, ...]
) -> None:
  """Each named field of `config` must be one of its choices."""
  for name, allowed in choices.items():
    value = getattr(config, name)
    if value not in allowed:
      raise ValueError(
          f'model.{section}{name}={value!r} is not one of {list(allowed)}'
      )
