"""The Flax teacher of a torchvision checkpoint, as training runs it.

`torch_teacher` reads a ResNet / DenseNet / RegNetY state dict (.safetensors
without torch; .pth/.pt/.bin through `drpl_jax.pytorch.torch_io`, which
imports torch only then) into the equivalent Flax module; the training loop
and the benchmarks call it. The parity checks against the PyTorch forward
and the `convert` command are in `drpl_jax.pytorch.convert`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from drpl_jax import teacher as teacher_lib
from drpl_jax.pytorch import torch_io


def _check_classifier(
    state: Mapping[str, np.ndarray], arch: str, num_classes: int, source: str
) -> None:
  """A clear error when the checkpoint was trained for other classes."""
  key = f'{teacher_lib.arch_spec(arch).classifier}.weight'
  if key not in state:
    return  # Reported with all other missing keys by load_torch_weights.
  shape = tuple(np.shape(state[key]))
  if not shape or shape[0] != num_classes:
    raise ValueError(
        f'{source}: classifier {key!r} has shape {shape} '
        f'({shape[0] if shape else 0} classes) but num_classes={num_classes};'
        ' fine-tune the teacher on '
        'your classes first (python -m drpl_jax.train_teacher) or pass the '
        'matching num_classes'
    )


def teacher_from_state_dict(
    cfg: teacher_lib.TeacherConfig,
    state: Mapping[str, np.ndarray],
    *,
    source: str = 'state dict',
) -> tuple[teacher_lib.Teacher, dict[str, Any]]:
  """Builds the Flax teacher of `cfg` holding the weights in `state`.

  The module is created abstractly (no random init of, say, the 644M
  parameters of RegNetY-128GF) and every variable is then filled from
  `state`. Returns the
  module and the loading report of `load_torch_weights`.
  """
  _check_classifier(state, cfg.arch, cfg.num_classes, source)
  module = teacher_lib.abstract_teacher(cfg)
  report = teacher_lib.load_torch_weights(
      module, state, cfg.arch, log=logging.info
  )
  return module, report


def torch_teacher(
    arch: str,
    checkpoint: str | None,
    num_classes: int,
    *,
    image_size: int = 224,
    mean: Sequence[float] = teacher_lib.IMAGENET_MEAN,
    std: Sequence[float] = teacher_lib.IMAGENET_STD,
    dtype: str = 'float32',
    seed: int = 0,
) -> teacher_lib.Teacher:
  """The Flax teacher for a torchvision checkpoint, ready for inference.

  Args:
    arch: torchvision name, a key of `drpl_jax.teacher.TEACHER_ARCHS`.
    checkpoint: `.safetensors` (no torch needed) or `.pth`/`.pt`/`.bin`
      state dict (torch >= 2.10); None gives random weights with
      torchvision's initialisation drawn from `seed` (tests and benchmarks
      only; see `drpl_jax.teacher.random_state_dict`).
    num_classes: must equal the checkpoint's classifier size.
    image_size, mean, std: the resolution and normalisation the teacher was
      trained with; the module applies them to [0, 1] images itself.
    dtype: compute dtype, 'float32' or 'bfloat16'.

  Returns:
    module(images [B, H, W, 3] in [0, 1]) -> logits [B, num_classes] float32.
  """
  cfg = teacher_lib.TeacherConfig(
      arch=arch,
      num_classes=num_classes,
      image_size=image_size,
      mean=tuple(mean),
      std=tuple(std),
      dtype=dtype,
  )
  if checkpoint is None:
    module = teacher_lib.abstract_teacher(cfg)
    state = teacher_lib.random_state_dict(module, seed)
    teacher_lib.load_torch_weights(module, state, arch)
    return module
  state = torch_io.load_state_dict(checkpoint)
  module, _ = teacher_from_state_dict(cfg, state, source=str(checkpoint))
  return module
