"""Parameter counts and the pinned parameter-name API of DRPL-ViT.

Parameter names are an API (weight importers, checkpoints and sharding rules
key on them): the expected names below are literal, so a rename fails here.
All models are built with nnx.eval_shape, so nothing is allocated.
"""

import numpy as np
import pytest
from flax import nnx

from drpl_jax.models import (
    VARIANTS,
    ConvConfig,
    ModelConfig,
    RPEConfig,
    count_params,
    create_model,
    param_names,
    param_shapes,
)

PRESETS = {  # preset: (distilled, rpe.kind, conv.kind), as configs/drpl_vit.py
    'vit': (False, 'none', 'mlp'),
    'deit': (True, 'none', 'mlp'),
    'deit_rpe': (True, 'irpe', 'mlp'),
    'deit_conv': (True, 'none', 'leff'),
    'drpl': (True, 'irpe', 'leff'),
}


def preset_config(variant: str, preset: str, **changes) -> ModelConfig:
  distilled, rpe, conv = PRESETS[preset]
  return ModelConfig.from_config(
      dict(
          variant=variant,
          distilled=distilled,
          rpe=dict(kind=rpe),
          conv=dict(kind=conv),
          **changes,
      )
  )


def abstract_model(cfg: ModelConfig):
  return nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))


def expected_shapes(
    d, heads, depth, classes, distilled, irpe, leff, grid=14, patch=16
):
  """The literal parameter names of a preset, with their shapes."""
  hd, e, prefix = d // heads, 4 * d, 2 if distilled else 1
  out = {
      'patch_embed.proj.kernel': (patch, patch, 3, d),
      'patch_embed.proj.bias': (d,),
      'cls_token': (1, 1, d),
      'pos_embed': (1, prefix + grid * grid, d),
      'norm.scale': (d,),
      'norm.bias': (d,),
      'head.kernel': (d, classes),
      'head.bias': (classes,),
  }
  if distilled:
    out.update(
        {
            'dist_token': (1, 1, d),
            'head_dist.kernel': (d, classes),
            'head_dist.bias': (classes,),
        }
    )
  block = {
      'norm1.scale': (d,),
      'norm1.bias': (d,),
      'attn.q.kernel': (d, d),
      'attn.q.bias': (d,),
      'attn.k.kernel': (d, d),
      'attn.k.bias': (d,),
      'attn.v.kernel': (d, d),
      'attn.v.bias': (d,),
      'attn.proj.kernel': (d, d),
      'attn.proj.bias': (d,),
      'norm2.scale': (d,),
      'norm2.bias': (d,),
  }
  if irpe:
    block['attn.rpe_k.table'] = (50, hd)
  if leff:
    block.update(
        {
            'ffn.expand.kernel': (d, e),
            'ffn.expand.bias': (e,),
            'ffn.expand_norm.scale': (e,),
            'ffn.expand_norm.bias': (e,),
            'ffn.dwconv.kernel': (3, 3, 1, e),
            'ffn.dwconv.bias': (e,),
            'ffn.dw_norm.scale': (e,),
            'ffn.dw_norm.bias': (e,),
            'ffn.project.kernel': (e, d),
            'ffn.project.bias': (d,),
            'ffn.project_norm.scale': (d,),
            'ffn.project_norm.bias': (d,),
        }
    )
  else:
    block.update(
        {
            'ffn.fc1.kernel': (d, e),
            'ffn.fc1.bias': (e,),
            'ffn.fc2.kernel': (e, d),
            'ffn.fc2.bias': (d,),
        }
    )
  for i in range(depth):
    out.update({f'blocks.{i}.{k}': v for k, v in block.items()})
  return out


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_micro_parameter_names_and_shapes(preset):
  distilled, rpe, conv = PRESETS[preset]
  model = abstract_model(preset_config('micro', preset))
  want = expected_shapes(64, 2, 4, 4, distilled, rpe == 'irpe', conv == 'leff')
  assert param_shapes(model) == want
  assert param_names(model) == sorted(want)


@pytest.mark.parametrize(
    'variant, d, heads', [('ti', 192, 3), ('s', 384, 6), ('b', 768, 12)]
)
def test_drpl_parameter_names_and_shapes(variant, d, heads):
  model = abstract_model(preset_config(variant, 'drpl'))
  want = expected_shapes(d, heads, 12, 4, True, True, True)
  assert param_shapes(model) == want
  assert count_params(model) == sum(int(np.prod(s)) for s in want.values())


@pytest.mark.parametrize(
    'variant, classes, want',
    [
        ('s', 1000, 22_436_432),  # timm deit_small_distilled_patch16_224
        ('s', 4, 21_669_512),
        ('ti', 1000, 5_910_800),  # timm deit_tiny_distilled_patch16_224
    ],
)
def test_deit_parameter_counts_match_timm(variant, classes, want):
  model = abstract_model(preset_config(variant, 'deit', num_classes=classes))
  assert count_params(model) == want


def test_variants_table():
  assert (VARIANTS['ti'].width, VARIANTS['ti'].num_heads) == (192, 3)
  assert (VARIANTS['s'].width, VARIANTS['s'].num_heads) == (384, 6)
  assert (VARIANTS['b'].width, VARIANTS['b'].num_heads) == (768, 12)
  assert {v.depth for k, v in VARIANTS.items() if k != 'micro'} == {12}


def test_optional_parameter_names():
  cfg = ModelConfig.from_config(
      dict(
          variant='micro',
          image_size=64,
          patch_size=16,
          stem='conv',
          stem_channels=24,
          layer_scale_init=0.1,
          rpe=dict(
              kind='irpe', on_q=True, on_k=True, on_v=True, shared_heads=False
          ),
      )
  )
  shapes = param_shapes(abstract_model(cfg))
  assert shapes['patch_embed.stem_conv.kernel'] == (7, 7, 3, 24)
  assert 'patch_embed.stem_conv.bias' not in shapes
  assert shapes['patch_embed.stem_norm.scale'] == (24,)
  assert shapes['patch_embed.stem_norm.bias'] == (24,)
  assert shapes['patch_embed.proj.kernel'] == (4, 4, 24, 64)
  for name in ('rpe_q', 'rpe_k', 'rpe_v'):
    assert shapes[f'blocks.3.attn.{name}.table'] == (2, 50, 32)
  assert shapes['blocks.0.ls1.gamma'] == (64,)
  assert shapes['blocks.0.ls2.gamma'] == (64,)

  bias = param_shapes(
      abstract_model(
          ModelConfig.from_config(
              dict(
                  variant='micro',
                  image_size=64,
                  patch_size=16,
                  rpe=dict(kind='bias'),
              )
          )
      )
  )
  assert bias['blocks.0.attn.rpe_bias.table'] == (7 * 7, 2)
  assert bias['blocks.0.attn.rpe_bias.prefix'] == (3, 2)
  assert not any('rpe_k' in k for k in bias)


def test_batch_norm_statistics_names():
  model = abstract_model(preset_config('micro', 'drpl'))
  flat = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
  names = {'.'.join(str(p) for p in path) for path, _ in flat}
  want = {
      f'blocks.{i}.ffn.{n}.{s}'
      for i in range(4)
      for n in ('expand_norm', 'dw_norm', 'project_norm')
      for s in ('mean', 'var')
  }
  assert names == want
  layer = abstract_model(
      preset_config('micro', 'drpl').replace(conv=ConvConfig(norm='layer'))
  )
  assert not nnx.to_flat_state(nnx.state(layer, nnx.BatchStat))


def test_param_dtype_and_count_agree():
  cfg = preset_config('micro', 'drpl', param_dtype='bfloat16', dtype='bfloat16')
  model = abstract_model(cfg)
  leaves = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert {str(v.dtype) for v in leaves} == {'bfloat16'}
  assert count_params(model) == sum(int(np.prod(v.shape)) for v in leaves)
  assert cfg.rpe == RPEConfig()
