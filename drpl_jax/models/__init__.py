"""DRPL-ViT in Flax NNX: configs, the model and parameter helpers.

Imports neither TensorFlow nor TFDS nor clu.
"""

from drpl_jax.models.config import (
    ConvConfig,
    ModelConfig,
    RPEConfig,
    VARIANTS,
    Variant,
)
from drpl_jax.models.vit import (
    DRPLViT,
    count_params,
    create_model,
    param_names,
    param_shapes,
)

__all__ = [
    'ConvConfig',
    'DRPLViT',
    'ModelConfig',
    'RPEConfig',
    'VARIANTS',
    'Variant',
    'count_params',
    'create_model',
    'param_names',
    'param_shapes',
]
