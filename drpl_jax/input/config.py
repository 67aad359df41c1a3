"""The typed `config.data`: which data set, its splits and how it is fed.

`config.data` is generated from `DataConfig` (drpl_jax/config/base.py), so
every field here is a `--config.data.` key with this default. The data set
identity (name, manual_dir, data_dir, classes, split_seed, min_side) is what
`drpl_jax.data.prepare` needs; the rest drives the input pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from drpl_jax.config import contract
from drpl_jax.data.images import DEFAULT_MIN_SIDE
from drpl_jax.input.augment import AugmentConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data set and its input pipeline."""

  name: str = 'covid19_radiography'
  manual_dir: str = ''  # the raw data (a folder, its parent, or a .zip)
  data_dir: str = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  classes: str = ''  # comma separated subset, '' = all
  split_seed: int = 0  # seed of the stored train/val/test split
  min_side: int = DEFAULT_MIN_SIDE  # smaller images are skipped
  image_size: int = 224
  train_split: str = 'train'
  eval_split: str = 'validation'
  test_split: str = 'test'
  # Model input normalisation (applied on device).
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)
  num_workers: int = 0  # grain worker processes per host
  balanced_sampler: bool = False  # class-balanced sampling
  # DeiT training recipe, each part switchable (numpy, on the host).
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  eval_crop_ratio: float = 0.875

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f'config.data.image_size={self.image_size} must be >= 1')
    if not 0.0 < self.eval_crop_ratio <= 1.0:
      raise ValueError(
          f'config.data.eval_crop_ratio={self.eval_crop_ratio} '
          'must be in (0, 1]'
      )
    if self.num_workers < 0:
      raise ValueError(
          f'config.data.num_workers={self.num_workers} must be >= 0'
      )

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | DataConfig) -> DataConfig:
    """The typed `config.data`; unknown keys are named in the error."""
    if isinstance(section, cls):
      return section
    return contract.build(cls, section, 'data')

  def replace(self, **changes: Any) -> DataConfig:
    """A copy with `changes` (e.g. another data set for evaluation)."""
    return dataclasses.replace(self, **changes)
