"""Training losses: label-smoothed cross-entropy and DeiT distillation.

Pure `jax.numpy`; nothing here imports TensorFlow. Every loss is computed in
float32 whatever the dtype of the logits (bf16 training), returns a scalar,
and accepts an optional `mask` [B] that removes padded examples from both the
sum and the normaliser, so a padded batch gives the same loss as the batch
without the padding.

Distillation follows DeiT (Touvron et al. 2021) and timm's `DistillationLoss`:
the cls head learns from the labels, the dist head from the teacher, and

    total = (1 - alpha) * CE(cls, labels) + alpha * distill(dist, teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

DISTILL_KINDS = ('none', 'hard', 'soft')


def _as_probabilities(targets: jax.Array, num_classes: int) -> jax.Array:
  """Turns integer labels [B] into one-hot [B, C]; passes [B, C] through."""
  targets = jnp.asarray(targets)
  if targets.ndim == 1 and jnp.issubdtype(targets.dtype, jnp.integer):
    return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  if targets.ndim != 2 or targets.shape[-1] != num_classes:
    raise ValueError(
        f'targets must be class probabilities [B, {num_classes}] or integer '
        f'labels [B], got shape {targets.shape} dtype {targets.dtype}'
    )
  return targets.astype(jnp.float32)


def check_distill_kind(distill_kind: str) -> None:
  """Raises a clear error for a `distill_kind` not in `DISTILL_KINDS`."""
  if distill_kind not in DISTILL_KINDS:
    raise ValueError(
        f'unknown distill_kind {distill_kind!r}; expected one '
        f'of {DISTILL_KINDS}'
    )


def _check_logits(name: str, logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f'{name} must have shape [B, C], got {logits.shape}')
  return logits.astype(jnp.float32)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w), and 0 (with a zero gradient) when sum(w) == 0."""
  denom = jnp.sum(weights)
  safe = jnp.where(denom > 0, denom, 1.0)
  return jnp.where(denom > 0, jnp.sum(weights * values) / safe, 0.0)


def _example_weights(batch: int, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(f'mask must have shape [{batch}], got {mask.shape}')
  return mask.astype(jnp.float32)


def _check_pair(
    dist_logits: jax.Array, teacher_logits: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Checks the dist head's and the teacher's logits, which must match."""
  dist_logits = _check_logits('dist_logits', dist_logits)
  teacher_logits = _check_logits('teacher_logits', teacher_logits)
  if teacher_logits.shape != dist_logits.shape:
    raise ValueError(
        f'teacher_logits {teacher_logits.shape} and dist_logits '
        f'{dist_logits.shape} differ in shape'
    )
  return dist_logits, teacher_logits


def smooth_targets(targets: jax.Array, label_smoothing: float) -> jax.Array:
  """Label smoothing of target distributions [B, C].

  Returns `targets * (1 - label_smoothing) + label_smoothing / C`; rows that
  sum to one keep summing to one, so mixed (mixup/cutmix) targets work too.
  """
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(
        f'label_smoothing must be in [0, 1], got {label_smoothing}'
    )
  targets = jnp.asarray(targets, jnp.float32)
  num_classes = targets.shape[-1]
  return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | Sequence[float] | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy against (soft) targets, the base training loss.

  Args:
    logits: [B, C].
    targets: class probabilities [B, C] (one-hot, or mixed by mixup/cutmix),
      or integer labels [B].
    label_smoothing: smoothing applied to the targets (see `smooth_targets`).
    class_weights: optional [C]. Example i gets the weight
      `w_i = sum_c targets[i, c] * class_weights[c]`, computed from the
      un-smoothed targets (the class the example belongs to, or the mix of
      classes for mixed targets).
    mask: optional [B]; 0 excludes an example (padding), 1 keeps it.

  Returns:
    The scalar `sum_i m_i w_i CE_i / sum_i m_i w_i`: normalised by the sum of
    the example weights, so uniform class weights (of any value) give the
    plain mean over the unmasked examples. 0 when no example is kept.
  """
  logits = _check_logits('logits', logits)
  batch, num_classes = logits.shape
  probs = _as_probabilities(targets, num_classes)
  if probs.shape[0] != batch:
    raise ValueError(f'targets have {probs.shape[0]} rows, logits {batch}')
  weights = _example_weights(batch, mask)
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(
          f'class_weights must have shape [{num_classes}], got '
          f'{class_weights.shape}'
      )
    weights = weights * (probs @ class_weights)
  if label_smoothing:
    probs = smooth_targets(probs, label_smoothing)
  per_example = -jnp.sum(probs * jax.nn.log_softmax(logits), axis=-1)  # [B]
  return _weighted_mean(per_example, weights)


def hard_distillation(
    dist_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
  """DeiT hard distillation: CE of the dist head against the teacher's argmax.

  No label smoothing and no gradient into the teacher. Mean over the
  unmasked examples.
  """
  dist_logits, teacher_logits = _check_pair(dist_logits, teacher_logits)
  teacher_labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  return cross_entropy(dist_logits, teacher_labels, mask=mask)


def soft_distillation(
    dist_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    tau: float,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Soft distillation: tau^2 * KL(softmax(teacher/tau) || softmax(dist/tau)).

  The KL divergence is summed over classes and averaged over the (unmasked)
  examples of the batch: batch-mean. DeiT's original code divides the summed
  KL by batch x classes (`reduction='sum'` then `/ outputs_kd.numel()`),
  timm's newer code by the batch only (`reduction='batchmean'`); we use
  batch-mean, so our value is C times DeiT's original for C classes. The
  tau^2 factor keeps the gradient scale independent of tau (Hinton et al.).
  """
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f'tau must be > 0, got {tau}')
  dist_logits, teacher_logits = _check_pair(dist_logits, teacher_logits)
  log_p_teacher = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits) / tau
  )
  log_p_student = jax.nn.log_softmax(dist_logits / tau)
  kl = jnp.sum(
      jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1
  )  # [B]
  weights = _example_weights(dist_logits.shape[0], mask)
  return _weighted_mean(kl, weights) * (tau * tau)


def _split_outputs(outputs: Any) -> tuple[jax.Array, jax.Array | None]:
  """Accepts one logits array or a (cls, dist) pair."""
  if isinstance(outputs, (tuple, list)):
    if len(outputs) != 2:
      raise ValueError(
          'outputs must be one logits array or a (cls, dist) '
          f'pair, got a sequence of {len(outputs)}'
      )
    return outputs[0], outputs[1]
  return outputs, None


def total_loss(
    outputs: jax.Array | tuple[jax.Array, jax.Array],
    targets: jax.Array,
    teacher_logits: jax.Array | None = None,
    *,
    distill_kind: str = 'none',
    alpha: float = 0.5,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
    class_weights: jax.Array | Sequence[float] | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training objective of DRPL-ViT and its baselines.

  Args:
    outputs: logits [B, C] of a model without a dist head, or the
      (cls, dist) pair of a distilled model in training mode.
    targets: class probabilities [B, C] (possibly mixed) or labels [B].
    teacher_logits: [B, C], needed for distill_kind 'hard' and 'soft'.
    distill_kind: 'none': cross-entropy on the single output; for a
      (cls, dist) pair both heads learn the labels and their losses are
      averaged. 'hard' / 'soft': `(1 - alpha) * CE(cls) + alpha *
      distill(dist, teacher)` with `hard_distillation` or
      `soft_distillation`.
    alpha: weight of the distillation term.
    tau: temperature of the soft distillation.
    label_smoothing, class_weights: for the label cross-entropy terms only;
      the distillation term follows the teacher, unweighted.
    mask: optional [B], 0 for padded examples.

  Returns:
    (loss, aux) with aux = {'loss_cls', 'loss_dist', 'loss'} (loss_dist is
    0 for a single-head model without distillation).
  """
  check_distill_kind(distill_kind)
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  cls_logits, dist_logits = _split_outputs(outputs)
  ce = lambda lg: cross_entropy(
      lg,
      targets,
      label_smoothing=label_smoothing,
      class_weights=class_weights,
      mask=mask,
  )
  loss_cls = ce(cls_logits)
  if distill_kind == 'none':
    if dist_logits is None:
      loss_dist = jnp.zeros((), jnp.float32)
      loss = loss_cls
    else:
      loss_dist = ce(dist_logits)
      loss = 0.5 * (loss_cls + loss_dist)
  else:
    if dist_logits is None:
      raise ValueError(
          f'distill_kind={distill_kind!r} needs (cls, dist) '
          'outputs from a distilled model, got one array'
      )
    if teacher_logits is None:
      raise ValueError(f'distill_kind={distill_kind!r} needs teacher_logits')
    if distill_kind == 'hard':
      loss_dist = hard_distillation(dist_logits, teacher_logits, mask=mask)
    else:
      loss_dist = soft_distillation(
          dist_logits, teacher_logits, tau=tau, mask=mask
      )
    loss = (1.0 - alpha) * loss_cls + alpha * loss_dist
  return loss, {'loss_cls': loss_cls, 'loss_dist': loss_dist, 'loss': loss}
