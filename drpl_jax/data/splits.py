"""Seeded train/validation/test splits: stratified, or grouped by patient.

The split is part of a prepared data set (its seed is in the builder config
name), so every run on the same prepared data sees the same split.

* `stratified_split`: per class, the examples sorted by id are permuted with
  `np.random.default_rng(seed)`; the first `round(0.1 n)` go to validation,
  the next `round(0.1 n)` to test, the rest to train (80/10/10, half rounded
  up). Exactly stratified up to rounding.
* `grouped_split`: no group (patient) is in two splits. Groups are visited
  largest first (ties in seeded random order); each goes to the split whose
  remaining per-class quota (target minus assigned, weighted by the group's
  own class counts) is largest. Greedy, so stratified only as far as the
  group sizes allow; with many small groups it is close to 80/10/10 per class.
"""

from collections.abc import Sequence

import numpy as np

SPLITS = ('train', 'validation', 'test')
FRACTIONS = {'train': 0.8, 'validation': 0.1, 'test': 0.1}


def _round_half_up(x: float) -> int:
  return int(np.floor(x + 0.5))


def stratified_split(
    labels: Sequence[int], keys: Sequence[str], *, seed: int
) -> list[str]:
  """Assigns each example a split name, stratified by label.

  Args:
    labels: class index per example.
    keys: a unique, stable key per example (the id); fixes the order so the
      result does not depend on file listing order.
    seed: split seed.

  Returns:
    The split name per example, aligned with `labels`.
  """
  if len(labels) != len(keys):
    raise ValueError(f'{len(labels)} labels but {len(keys)} keys')
  labels = np.asarray(labels)
  out = [''] * len(labels)
  rng = np.random.default_rng(seed)
  for label in np.unique(labels):
    members = sorted(np.flatnonzero(labels == label), key=lambda i: keys[i])
    members = [members[i] for i in rng.permutation(len(members))]
    n = len(members)
    n_val = _round_half_up(n * FRACTIONS['validation'])
    n_test = _round_half_up(n * FRACTIONS['test'])
    for rank, index in enumerate(members):
      if rank < n_val:
        out[index] = 'validation'
      elif rank < n_val + n_test:
        out[index] = 'test'
      else:
        out[index] = 'train'
  return out


def grouped_split(
    labels: Sequence[int], groups: Sequence[str], *, seed: int
) -> list[str]:
  """Assigns splits so that no group (patient) spans two splits.

  Args:
    labels: class index per example.
    groups: group key per example (e.g. the patient id).
    seed: split seed (order of equally sized groups).

  Returns:
    The split name per example, aligned with `labels`.
  """
  if len(labels) != len(groups):
    raise ValueError(f'{len(labels)} labels but {len(groups)} groups')
  labels = np.asarray(labels, dtype=np.int64)
  num_classes = int(labels.max()) + 1 if len(labels) else 0
  members: dict[str, list[int]] = {}
  for index, group in enumerate(groups):
    members.setdefault(group, []).append(index)
  keys = sorted(members)
  keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
  keys.sort(key=lambda k: -len(members[k]))  # stable: ties stay random
  totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
  target = np.stack([totals * FRACTIONS[s] for s in SPLITS])  # [S, C]
  assigned = np.zeros_like(target)
  out = [''] * len(labels)
  for key in keys:
    counts = np.bincount(labels[members[key]], minlength=num_classes)
    score = (target - assigned) @ counts  # [S]
    best = int(np.argmax(score))  # ties: first split in SPLITS order
    assigned[best] += counts
    for index in members[key]:
      out[index] = SPLITS[best]
  return out


def normalise_split_name(name: str) -> str:
  """Maps a user's split name ('train', 'val', 'valid', 'test', ...) to ours.

  Raises:
    ValueError: for names that are not a known split.
  """
  value = name.strip().lower()
  aliases = {
      'val': 'validation',
      'valid': 'validation',
      'dev': 'validation',
      'training': 'train',
      'testing': 'test',
  }
  value = aliases.get(value, value)
  if value not in SPLITS:
    raise ValueError(f'unknown split {name!r}; use one of {list(SPLITS)}')
  return value
