r"""DRPL-ViT on chest X-rays: the paper's model and its ablations.

Presets (the paper's ablation table as configs, not code forks):
  vit        no distillation, no RPE, plain MLP (ViT/DeiT baseline).
  deit       + distillation token and head (DeiT distilled).
  deit_rpe   deit + iRPE relative position encoding.
  deit_conv  deit + LeFF convolution in every encoder block.
  drpl       all three (default).

Arguments (comma separated `key=value`):
  variant=micro|ti|s|b   model size (default s; micro with runlocal).
  preset=...             one of the presets above (default drpl).
  runlocal               a small run for a CPU (micro-sized budget); an
                         explicit variant= is kept.

The config is built by drpl_jax/config/base.py: its typed sections come
from the dataclasses, so every field of ModelConfig, DataConfig (with
AugmentConfig), TeacherConfig, OptimConfig and StepConfig is a `--config.`
key.

Launch:
  python -m drpl_jax.main \
      --config=configs/drpl_vit.py:variant=s,preset=drpl \
      --config.data.manual_dir=/data/COVID-19_Radiography_Dataset \
      --workdir=/tmp/drpl_s
"""

import ml_collections

from drpl_jax.config import base

PRESETS = base.PRESETS
parse_arg = base.parse_arg


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """Returns the training config for `variant=...,preset=...[,runlocal]`."""
  return base.drpl_vit(arg)
