"""A PyTorch twin of DRPL-ViT and weight converters in both directions.

Needs the `torch` extra. Importing `drpl_jax` (or `drpl_jax.models`) never
imports torch; only this package does.

  model = create_model(cfg, rngs=nnx.Rngs(0))          # Flax
  twin = flax_to_torch(model)                           # PyTorch, eval mode
  back = torch_to_flax(twin)                            # Flax again
  torch.save(state_dict_from_flax(model), 'drpl.pth')   # a torch checkpoint
"""

from drpl_jax.pytorch.twin.convert import (
    flax_to_torch,
    load_torch_state_dict,
    state_dict_from_flax,
    torch_arrays,
    torch_name,
    torch_to_flax,
)
from drpl_jax.pytorch.twin.model import DRPLViTTorch
from drpl_jax.pytorch.twin.train import (
    TotalLoss,
    make_optimizer,
    make_train_step,
)

__all__ = [
    'DRPLViTTorch',
    'TotalLoss',
    'flax_to_torch',
    'load_torch_state_dict',
    'make_optimizer',
    'make_train_step',
    'state_dict_from_flax',
    'torch_arrays',
    'torch_name',
    'torch_to_flax',
]
