"""The DRPL-ViT training objective and one AdamW step in PyTorch.

`TotalLoss` mirrors `drpl_jax.train.losses.total_loss` (label-smoothed
cross-entropy, DeiT hard or soft distillation, optional class weights) and
`make_optimizer` the optimizer of `drpl_jax.train.optim` (AdamW with
decoupled weight decay on matrices and conv kernels only, global-norm
clipping), so a step in either framework from the
same weights and batch gives the same loss and gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from drpl_jax.train.losses import check_distill_kind
from drpl_jax.train.optim import decays

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
) -> torch.Tensor:
  """Softmax CE against labels [B] or probabilities [B, C], as the JAX loss.

  Example i is weighted by `targets_i . class_weights` (un-smoothed) and
  the loss is normalised by the sum of the weights.
  """
  logits = logits.float()
  num_classes = logits.shape[-1]
  if targets.ndim == 1:
    targets = F.one_hot(targets.long(), num_classes).float()
  targets = targets.float()
  weights = torch.ones(logits.shape[0], device=logits.device)
  if class_weights is not None:
    weights = targets @ torch.as_tensor(
        class_weights, dtype=torch.float32, device=logits.device
    )
  probs = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -(probs * logits.log_softmax(-1)).sum(-1)  # [B]
  return (weights * per_example).sum() / weights.sum()


@dataclasses.dataclass(frozen=True)
class TotalLoss:
  """The DRPL-ViT objective; see `drpl_jax.train.losses.total_loss`.

  Configured once, as torch's loss modules are, then called on each batch:
  `TotalLoss(distill_kind='hard')(outputs, targets, teacher_logits)`.
  'none': CE on one output, or the mean of both heads' CE; 'hard' / 'soft':
  (1 - alpha) CE(cls) + alpha distill(dist, teacher), hard = CE against the
  teacher's argmax, soft = tau^2 KL (batch-mean).
  """

  distill_kind: str = 'none'
  alpha: float = 0.5
  tau: float = 1.0
  label_smoothing: float = 0.0
  class_weights: Sequence[float] | None = None

  def __post_init__(self):
    check_distill_kind(self.distill_kind)

  def ce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The label term: smoothed, class-weighted cross-entropy."""
    return cross_entropy(
        logits,
        targets,
        label_smoothing=self.label_smoothing,
        class_weights=self.class_weights,
    )

  def __call__(
      self,
      outputs: Outputs,
      targets: torch.Tensor,
      teacher_logits: torch.Tensor | None = None,
  ) -> torch.Tensor:
    pair = isinstance(outputs, (tuple, list))
    cls_logits, dist_logits = outputs if pair else (outputs, None)
    kind, alpha, tau = self.distill_kind, self.alpha, self.tau
    if kind == 'none':
      if dist_logits is None:
        return self.ce(cls_logits, targets)
      return 0.5 * (
          self.ce(cls_logits, targets) + self.ce(dist_logits, targets)
      )
    if dist_logits is None or teacher_logits is None:
      raise ValueError(
          f'distill_kind={kind!r} needs (cls, dist) outputs and teacher_logits'
      )
    teacher = teacher_logits.detach().float()
    if kind == 'hard':
      loss_dist = F.cross_entropy(dist_logits.float(), teacher.argmax(-1))
    else:
      loss_dist = (
          F.kl_div(
              (dist_logits.float() / tau).log_softmax(-1),
              (teacher / tau).log_softmax(-1),
              reduction='batchmean',
              log_target=True,
          )
          * tau
          * tau
      )
    return (1.0 - alpha) * self.ce(cls_logits, targets) + alpha * loss_dist


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """AdamW groups: decay on >= 2-D weights except tokens, pos_embed, bias RPE.

  The same rule as `drpl_jax.train.optim.decay_mask` (names are shared); the
  iRPE tables are decayed, as in the official iRPE training.
  """
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if decays(name, p.ndim):
      decay.append(p)
    else:
      no_decay.append(p)
  return [
      {'params': decay, 'weight_decay': weight_decay},
      {'params': no_decay, 'weight_decay': 0.0},
  ]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
  """torch AdamW with the project's decay mask (optax.adamw defaults)."""
  return torch.optim.AdamW(
      param_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=eps
  )


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
  """uint8 or [0, 1] NHWC images -> normalised float32 NCHW."""
  x = images.float()
  if images.dtype == torch.uint8:
    x = x / 255.0
  m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
  s = torch.as_tensor(std, dtype=torch.float32, device=x.device)
  return ((x - m) / s).permute(0, 3, 1, 2)  # [B, 3, H, W]


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: Callable[..., torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    grad_clip: float = 0.0,
) -> Callable[..., torch.Tensor]:
  """Returns `step(images, labels, teacher_logits) -> loss`.

  One step is forward, backward, clipping and one optimizer step; `model`
  may be a torch.compile'd twin. images: uint8 NHWC (normalised inside,
  like the JAX step).
  """

  def step(
      images: torch.Tensor,
      labels: torch.Tensor,
      teacher_logits: torch.Tensor | None = None,
  ) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(normalize(images, mean, std)), labels, teacher_logits)
    loss.backward()
    if grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()

  return step
