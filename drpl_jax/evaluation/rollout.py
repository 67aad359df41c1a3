"""Attention rollout (Abnar & Zuidema, ACL 2020) for DRPL-ViT heatmaps.

Each block mixes token j into token i with weight A[i, j] (its attention
probabilities averaged over heads) and also keeps token i through the
residual connection. Rollout models both: per block `A_hat = norm(A + I)`
(rows renormalised to sum to 1), and the joint mixing of the whole stack is
the product `R = A_hat_L @ ... @ A_hat_1`. Row i of R says how much of each
input token ended up in output token i.

The heatmap of a prediction is the row of the prefix tokens (cls, and for a
distilled model the dist token too: the two rows are averaged, since the
prediction is the mean of both heads) restricted to the patch tokens and laid
out on the patch grid. Pure numpy: it runs on the host on the attention
probabilities `forward_features(x, return_attention=True)` returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_attention(attentions: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Validates a list of [B, heads, L, L] arrays; returns them as float64."""
  if not attentions:
    raise ValueError(
        'attention_rollout needs at least one layer of '
        'attention probabilities'
    )
  out = []
  for i, a in enumerate(attentions):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
      raise ValueError(
          f'attention of layer {i} must be [B, heads, L, L], '
          f'got shape {a.shape}'
      )
    if out and (a.shape[0], a.shape[-1]) != (out[0].shape[0], out[0].shape[-1]):
      raise ValueError(
          f'attention of layer {i} has shape {a.shape}, layer 0 '
          f'has {out[0].shape}: batch and tokens must agree'
      )
    out.append(a)
  return out


def rollout_matrix(attentions: Sequence[np.ndarray]) -> np.ndarray:
  """The joint token mixing of the stack: [B, L, L], rows summing to 1.

  Args:
    attentions: per block, attention probabilities [B, heads, L, L]
      (first block first), e.g. `model.forward_features(x, return_attention=True)[1]`.

  Returns:
    `A_hat_L @ ... @ A_hat_1` with `A_hat = rownorm(mean_heads(A) + I)`.
  """
  layers = _check_attention(attentions)
  b, _, n, _ = layers[0].shape
  eye = np.eye(n)
  joint = np.broadcast_to(eye, (b, n, n)).copy()  # [B, L, L]
  for a in layers:
    a = a.mean(axis=1) + eye  # [B, L, L]: heads averaged, residual added
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a @ joint  # later blocks act on the mixture of earlier ones
  return joint


def attention_rollout(
    attentions: Sequence[np.ndarray],
    num_prefix_tokens: int,
    grid: tuple[int, int] | int,
) -> np.ndarray:
  """Attention-rollout maps of the prediction over the patch grid.

  Args:
    attentions: per block, attention probabilities [B, heads, L, L] with the
      tokens ordered [prefix tokens, patches in row-major grid order].
    num_prefix_tokens: 1 (cls) or 2 (cls, dist); the map averages the
      rollout rows of all prefix tokens ("through both prefix tokens").
    grid: the patch grid (Gh, Gw), or G for a square grid.

  Returns:
    float64 [B, Gh, Gw]: the share of each patch in the prefix tokens'
    final representation. Values are rollout weights in [0, 1] (not
    rescaled per image; the rest of each row is the prefix tokens' own
    share), so a model whose attention ignores the patches gives a
    uniform (zero) map.
  """
  gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
  joint = rollout_matrix(attentions)
  p = int(num_prefix_tokens)
  if p < 1:
    raise ValueError(f'num_prefix_tokens must be >= 1, got {p}')
  if joint.shape[-1] != p + gh * gw:
    raise ValueError(
        f'attention over {joint.shape[-1]} tokens does not match '
        f'{p} prefix tokens + a {gh}x{gw} grid ({p + gh * gw} tokens)'
    )
  rows = joint[:, :p, p:].mean(axis=1)  # [B, N]
  return rows.reshape(-1, gh, gw)  # [B, Gh, Gw]
