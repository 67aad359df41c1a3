"""Official iRPE DeiT checkpoints (microsoft/Cream, iRPE/DeiT-with-iRPE).

The state dict is timm's ViT naming plus, per block and per place,
`blocks.N.attn.rpe_{q,k,v}.lookup_table_weight` (contextual mode):

  q, k: [1 | H, head_dim, buckets]   v: [1 | H, buckets, head_dim]

(1 = one table shared by all heads). Buckets are the product-method grid
ids r * S + c (S = 2 int(beta) + 1, displacement pos_i - pos_j, as here)
plus one last bucket for pairs with the cls token. Ours are [buckets, hd]
(shared) or [H, buckets, hd].

The query term: the official code adds `rpe_q(k * scale)` transposed, so
logit (i, j) reads the q table at bucket b(j, i), the transposed
displacement pos_j - pos_i. The piecewise index is odd, so for patch pairs
b(j, i) = S*S - 1 - b(i, j), and the prefix bucket is symmetric. Our query
term reads r[b(i, j)], hence r_ours[b] = W[S*S - 1 - b] for the S*S grid
rows (their order reversed) and the prefix row kept in place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from drpl_jax.models import ModelConfig
from drpl_jax.pretrained.mapping import Plan, Transform

_TABLE = re.compile(
    r'^blocks\.(\d+)\.attn\.rpe_([qkv])\.lookup_table_(weight|bias)$'
)


def table_transform(part: str, shared_model: bool, num_heads: int) -> Transform:
  """Official lookup_table_weight of `part` (q, k, v) -> our table."""

  def convert(w: np.ndarray) -> np.ndarray:
    if w.ndim != 3:
      raise ValueError(f'rank {w.ndim}')
    t = w if part == 'v' else w.transpose(0, 2, 1)  # [n, buckets, hd]
    if part == 'q':  # transposed displacement: grid rows reversed
      t = np.concatenate([t[:, -2::-1], t[:, -1:]], axis=1)
    if shared_model:
      return t[0] if t.shape[0] == 1 else t  # [buckets, hd]
    if t.shape[0] == 1:  # a shared table serves every head
      return np.repeat(t, num_heads, axis=0)
    return t  # [H, buckets, hd]

  return convert


def plan(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, source: str
) -> Plan:
  """The iRPE tables onto ours; the rest is the timm mapping."""
  out = Plan(format='irpe')
  shared_src = set()
  for key in state:
    match = _TABLE.match(key)
    if not match:
      continue
    block, part, kind = match.groups()
    if kind == 'bias':
      raise ValueError(
          f'{source}: {key} is an iRPE table in "bias" mode; DRPL-ViT '
          'implements the contextual mode (lookup_table_weight) only'
      )
    enabled = cfg.rpe.kind == 'irpe' and getattr(cfg.rpe, f'on_{part}')
    if not enabled:
      out.ignored[key] = (
          f'model.rpe has no iRPE on {part} (kind='
          f'{cfg.rpe.kind!r}, on_{part}=False)'
      )
      continue
    out.extra[f'blocks.{block}.attn.rpe_{part}.table'] = (
        key,
        table_transform(part, cfg.rpe.shared_heads, cfg.num_heads),
    )
    if np.shape(state[key])[0] == 1:
      shared_src.add(part)
  parts = sorted({_TABLE.match(k).group(2) for k in state if _TABLE.match(k)})
  out.notes.append(
      f'iRPE tables on {parts} loaded (contextual product '
      'method; [n, hd, buckets] -> [buckets, hd] for q and k)'
  )
  if 'q' in parts:
    out.notes.append(
        'iRPE q table: its S*S grid rows are reversed, the '
        'prefix row kept (the official query term reads the '
        'table at the transposed displacement)'
    )
  if shared_src and not cfg.rpe.shared_heads:
    out.notes.append(
        f'iRPE: the shared source tables {sorted(shared_src)} '
        'are copied to every head (model.rpe.shared_heads='
        'False)'
    )
  ignored = sorted(out.ignored)
  if ignored:
    out.notes.append(f'iRPE tables not used by this model: {ignored}')
  return out
