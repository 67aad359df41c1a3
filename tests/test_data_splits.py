"""Seeded splits: stratified per class; grouped splits never leak a patient."""

import collections

import numpy as np
import pytest

from drpl_jax.data import splits


def test_stratified_counts_per_class():
  labels = [0] * 300 + [1] * 300 + [2] * 45
  keys = [f'id{i}' for i in range(len(labels))]
  out = splits.stratified_split(labels, keys, seed=0)
  counts = collections.Counter(zip(labels, out))
  for label, n in ((0, 300), (1, 300), (2, 45)):
    val = int(np.floor(n * 0.1 + 0.5))
    assert counts[(label, 'validation')] == val
    assert counts[(label, 'test')] == val
    assert counts[(label, 'train')] == n - 2 * val


def test_stratified_deterministic_and_order_free():
  labels = [i % 3 for i in range(90)]
  keys = [f'k{i:03d}' for i in range(90)]
  a = splits.stratified_split(labels, keys, seed=5)
  assert a == splits.stratified_split(labels, keys, seed=5)
  assert a != splits.stratified_split(labels, keys, seed=6)
  # Listing order does not matter: the split follows the keys.
  perm = np.random.default_rng(0).permutation(90)
  b = splits.stratified_split(
      [labels[i] for i in perm], [keys[i] for i in perm], seed=5
  )
  assert {keys[i]: s for i, s in zip(perm, b)} == dict(zip(keys, a))


def test_grouped_no_patient_in_two_splits_and_near_target():
  rng = np.random.default_rng(0)
  labels, groups = [], []
  for patient in range(600):
    label = int(rng.integers(0, 3))
    for _ in range(int(rng.integers(1, 6))):
      labels.append(label)
      groups.append(f'p{patient}')
  out = splits.grouped_split(labels, groups, seed=1)
  split_of = collections.defaultdict(set)
  for group, split in zip(groups, out):
    split_of[group].add(split)
  assert all(len(s) == 1 for s in split_of.values())
  labels = np.asarray(labels)
  out = np.asarray(out)
  for label in range(3):
    total = (labels == label).sum()
    for split, fraction in splits.FRACTIONS.items():
      share = ((labels == label) & (out == split)).sum() / total
      assert abs(share - fraction) < 0.03, (label, split, share)


def test_grouped_mixed_label_patients_stay_together():
  labels = [0, 1, 0, 1] * 50
  groups = [f'p{i // 4}' for i in range(200)]
  out = splits.grouped_split(labels, groups, seed=0)
  for p in range(50):
    assert len(set(out[4 * p : 4 * p + 4])) == 1
  assert set(out) == set(splits.SPLITS)


def test_normalise_split_name():
  assert splits.normalise_split_name(' Val ') == 'validation'
  assert splits.normalise_split_name('train') == 'train'
  with pytest.raises(ValueError, match="unknown split 'holdout'"):
    splits.normalise_split_name('holdout')
