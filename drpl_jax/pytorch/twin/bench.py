"""The PyTorch side of `python -m drpl_jax.bench compare`.

Builds the twin from a converted state dict, returns its train-step and
inference callables (eager or `torch.compile`d), and counts its FLOPs with
`torch.utils.flop_counter`. Timing and memory are measured by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from drpl_jax.models.config import ModelConfig
from drpl_jax.pytorch.twin import train as ttrain
from drpl_jax.pytorch.twin.model import DRPLViTTorch


def sync(x: Any) -> Any:
  """Waits for queued CUDA work (a no-op on CPU); returns x."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return x


def twin_from_state(
    model_cfg: ModelConfig, state: dict[str, torch.Tensor], device: str
) -> DRPLViTTorch:
  """A DRPLViTTorch holding `state` (strictly loaded), on `device`."""
  twin = DRPLViTTorch(model_cfg)
  twin.load_state_dict(state, strict=True)
  return twin.to(device)


def loss_for(config, model_cfg: ModelConfig) -> ttrain.TotalLoss:
  """`loss(outputs, labels, teacher_logits)` as configured (torch)."""
  return ttrain.TotalLoss(
      distill_kind=config.distill.kind if model_cfg.distilled else 'none',
      alpha=config.distill.alpha,
      tau=config.distill.tau,
      label_smoothing=config.loss.label_smoothing,
  )


def step_calls(
    config,
    model_cfg: ModelConfig,
    state: dict,
    batch: dict[str, np.ndarray],
    device: str,
    compile_model: bool,
) -> dict[str, Callable[[], Any]]:
  """{'train': one AdamW step, 'inference': one eval forward} closures.

  Both normalise the uint8 NHWC batch inside, like the JAX step; each sets
  the twin's mode itself, so the two may be called in any order.
  """
  data = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
  teacher = data.get('teacher_logits')
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  twin = twin_from_state(model_cfg, state, device)
  model = torch.compile(twin) if compile_model else twin
  opt = config.optim
  optimizer = ttrain.make_optimizer(
      twin,
      lr=opt.base_lr * config.batch_size / 512,
      weight_decay=opt.weight_decay,
      b1=opt.b1,
      b2=opt.b2,
  )
  step = ttrain.make_train_step(
      model,
      optimizer,
      loss_fn=loss_for(config, model_cfg),
      mean=mean,
      std=std,
      grad_clip=opt.grad_clip,
  )

  def train():
    twin.train()
    return step(data['image'], data['label'], teacher)

  def inference():
    twin.eval()
    with torch.inference_mode():
      return model(ttrain.normalize(data['image'], mean, std))

  return {'train': train, 'inference': inference}


def conv_backward_flops(
    grad_out_shape, x_shape, w_shape, *args, **kwargs
) -> int:
  """Grouped-conv aware FLOPs of aten.convolution_backward (not transposed).

  torch's own formula ignores `groups`, so it counts a depthwise conv's
  backward as a dense conv (C times too many). Each of grad_input and
  grad_weight costs what the forward does: 2 * out elements * in/g * kh * kw.
  """
  del x_shape, kwargs
  output_mask = args[7]
  forward = 2 * int(np.prod(grad_out_shape)) * int(np.prod(w_shape[1:]))
  return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(
    model_cfg: ModelConfig,
    state: dict,
    batch: dict[str, np.ndarray],
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, int]:
  """FLOPs per batch: {'inference': forward, 'train': forward + backward}.

  Counted by FlopCounterMode on the eager twin (CPU) with the math attention
  backend, which decomposes into counted matmuls (the fused CPU kernel has
  no FLOP formula). Gathers, norms and elementwise ops are not counted, as
  usual for model FLOPs; conv backward uses `conv_backward_flops`.
  """
  twin = twin_from_state(model_cfg, state, 'cpu')
  x = ttrain.normalize(torch.from_numpy(batch['image']), (0.5,) * 3, (0.5,) * 3)
  labels = torch.from_numpy(batch['label'])
  teacher = batch.get('teacher_logits')
  teacher = None if teacher is None else torch.from_numpy(teacher)
  fixed = {torch.ops.aten.convolution_backward: conv_backward_flops}
  out = {}
  with sdpa_kernel(SDPBackend.MATH):
    twin.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
      twin(x)
    out['inference'] = counter.get_total_flops()
    twin.train()
    with FlopCounterMode(display=False, custom_mapping=fixed) as counter:
      loss_fn(twin(x), labels, teacher).backward()
    out['train'] = counter.get_total_flops()
  return out
