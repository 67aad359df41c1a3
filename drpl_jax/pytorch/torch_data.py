"""PyTorch view of the prepared data sets, for CNN teachers trained in torch.

A prepared split (`drpl_jax.data.get_source`) yields uint8 RGB images of any
size. A PyTorch teacher sees them as float32 [3, S, S] tensors:

  eval view   resize to S x S (bilinear, antialiased: torchvision's
              `transforms.Resize` on tensors, the same resize as the Flax
              teachers in `drpl_jax.teacher`), scale to [0, 1], normalise with
              the teacher's mean/std.
  train view  a mild random resized crop first ("lite": area 50-100% of the
              image, aspect 3/4-4/3 by default), then the eval view. No flip:
              a mirrored chest X-ray is anatomically wrong. Or, given the
              student's `AugmentConfig` ("student"), the student's own train
              transform (`augment.train_transform`: its crop, RandAugment and
              erasing) at the teacher's size, then scale and normalise: a
              teacher trained so answers sensibly on the student's augmented
              batches, which it sees when it distils online.

The crop randomness of example `i` in epoch `e` comes from a numpy generator
seeded with (seed, e, i), and the epoch order from (seed, e): a run is the
same for any number of loader workers. This module is part of the `torch`
extra and imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from drpl_jax.input import augment

DEFAULT_CROP_SCALE = (0.5, 1.0)
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)


def to_float_chw(image: np.ndarray) -> torch.Tensor:
  """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f'expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}'
    )
  chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # A copy.
  return chw.to(torch.float32) / 255.0  # [3, H, W]


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
  """float [3, H, W] -> [3, size, size], bilinear with antialiasing."""
  if tuple(image.shape[-2:]) == (size, size):
    return image
  out = F.interpolate(
      image[None],
      size=(size, size),
      mode='bilinear',
      align_corners=False,
      antialias=True,
  )
  return out[0]  # [1, 3, S, S] -> [3, S, S]


def normalise(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
  """Per-channel (x - mean) / std of a [3, H, W] tensor."""
  mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
  std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
  return (image - mean_t) / std_t


def eval_view(
    image: np.ndarray,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
  """The un-augmented teacher input: resize, scale, normalise -> [3, S, S]."""
  return normalise(resize(to_float_chw(image), image_size), mean, std)


def train_view(
    image: np.ndarray,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rng: np.random.Generator,
    scale: Sequence[float] = DEFAULT_CROP_SCALE,
    ratio: Sequence[float] = DEFAULT_CROP_RATIO,
    student: augment.AugmentConfig | None = None,
) -> torch.Tensor:
  """A random resized crop (no flip), then as `eval_view` -> [3, S, S].

  The box is drawn as the student's recipe draws it (`augment.rrc_box`,
  torchvision's RandomResizedCrop sampling). With `student`, the whole of
  the student's train transform replaces the crop (`scale` and `ratio` are
  then unused: the student's config has its own).
  """
  image = np.asarray(image)
  if student is not None:
    view = augment.train_transform(image, rng, size=image_size, config=student)
    return normalise(to_float_chw(view), mean, std)  # already S x S
  top, left, h, w = augment.rrc_box(
      image.shape[0],
      image.shape[1],
      rng,
      scale=tuple(scale),
      ratio=tuple(ratio),
  )
  crop = image[top : top + h, left : left + w]  # [h, w, 3]
  return eval_view(crop, image_size, mean, std)


class TeacherDataset(torch.utils.data.Dataset):
  """A prepared split as {'image': [3, S, S], 'label': int, 'id': str}.

  `source` is anything with `len()` and `source[i]` -> {'image': uint8
  [H, W, 3], 'label': int, 'id': str} (e.g. `drpl_jax.data.get_source`).
  With `train=True` each item is a fresh random crop (see `train_view`;
  with `student`, the student's train transform), reproducible from (seed,
  epoch, index); call `set_epoch` every epoch.
  """

  def __init__(
      self,
      source: Any,
      *,
      image_size: int,
      mean: Sequence[float],
      std: Sequence[float],
      train: bool = False,
      seed: int = 0,
      crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
      crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO,
      student: augment.AugmentConfig | None = None,
  ):
    if image_size < 1:
      raise ValueError(f'image_size must be >= 1, got {image_size}')
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
      raise ValueError(
          f'mean/std need 3 values each and std > 0, got '
          f'mean={tuple(mean)} std={tuple(std)}'
      )
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(
          f'crop_scale must satisfy 0 < lo <= hi <= 1, got '
          f'{tuple(crop_scale)}'
      )
    self.source = source
    self.image_size = int(image_size)
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self.train = train
    self.seed = int(seed)
    self.crop_scale = tuple(crop_scale)
    self.crop_ratio = tuple(crop_ratio)
    self.student = student
    self.epoch = 0

  def set_epoch(self, epoch: int) -> None:
    """Selects the crops of `epoch` (train mode)."""
    self.epoch = int(epoch)

  def __len__(self) -> int:
    return len(self.source)

  def _view(self, example: dict[str, Any], index: int) -> dict[str, Any]:
    if self.train:
      rng = np.random.default_rng([self.seed, self.epoch, index])
      image = train_view(
          example['image'],
          self.image_size,
          self.mean,
          self.std,
          rng,
          self.crop_scale,
          self.crop_ratio,
          self.student,
      )
    else:
      image = eval_view(example['image'], self.image_size, self.mean, self.std)
    return {
        'image': image,
        'label': int(example['label']),
        'id': str(example['id']),
    }

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._view(self.source[int(index)], int(index))

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read, used by torch's DataLoader (fewer file reads)."""
    indices = [int(i) for i in indices]
    if hasattr(self.source, '__getitems__'):
      examples = self.source.__getitems__(indices)
    else:
      examples = [self.source[i] for i in indices]
    return [self._view(e, i) for e, i in zip(examples, indices)]


def epoch_order(
    num_examples: int, *, seed: int, epoch: int, shuffle: bool
) -> np.ndarray:
  """The example order of an epoch: a (seed, epoch) permutation or 0..N-1."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch, 7]).permutation(num_examples)


def make_loader(
    dataset: TeacherDataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    epoch: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    limit: int | None = None,
) -> torch.utils.data.DataLoader:
  """A DataLoader over `dataset` in `epoch_order`, for one epoch.

  Args:
    dataset: the split; its epoch is set to `epoch`.
    batch_size: examples per batch.
    shuffle: permute with (dataset.seed, epoch); else source order.
    epoch: the epoch number (order and crops).
    drop_last: drop a final partial batch (train mode: BatchNorm needs more
      than one example per channel).
    num_workers: loader worker processes (0 = in this process).
    limit: use only the first `limit` examples of the order (tests, smoke
      runs); None = all.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  dataset.set_epoch(epoch)
  order = epoch_order(
      len(dataset), seed=dataset.seed, epoch=epoch, shuffle=shuffle
  )
  if limit is not None:
    order = order[:limit]
  return torch.utils.data.DataLoader(
      dataset,
      batch_size=batch_size,
      sampler=order.tolist(),
      drop_last=drop_last and len(order) >= batch_size,
      num_workers=num_workers,
      persistent_workers=False,
  )


def pick_device(device: str | None = None) -> torch.device:
  """`device`, else CUDA when available, else the CPU."""
  if device:
    return torch.device(device)
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def predict(
    model: torch.nn.Module,
    source: Any,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> tuple[list[str], np.ndarray]:
  """Runs `model` in eval mode on the eval view of every example.

  Returns (ids in source order, float32 logits [N, C]). Raises ValueError
  when the model does not return [batch, C] logits.
  """
  if not isinstance(device, torch.device):
    device = pick_device(device)
  dataset = TeacherDataset(source, image_size=image_size, mean=mean, std=std)
  loader = make_loader(
      dataset, batch_size=batch_size, num_workers=num_workers, limit=limit
  )
  model = model.to(device).eval()
  ids, outputs = [], []
  with torch.inference_mode():
    for batch in loader:
      logits = model(batch['image'].to(device))
      if (
          not isinstance(logits, torch.Tensor)
          or logits.ndim != 2
          or logits.shape[0] != len(batch['id'])
      ):
        shape = getattr(logits, 'shape', type(logits).__name__)
        raise ValueError(
            f'the teacher returned {shape} for a batch of '
            f'{len(batch["id"])} images; expected logits '
            '[batch, num_classes]'
        )
      outputs.append(logits.float().cpu().numpy())
      ids += list(batch['id'])
  if not outputs:
    raise ValueError(f'{source!r}: no examples to predict')
  return ids, np.concatenate(outputs, axis=0)  # [N, C]
