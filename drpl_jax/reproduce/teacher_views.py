"""What the online teacher sees: its accuracy under each part of the
student's augmentation.

In online distillation the teacher labels the student's augmented batch
(DeiT's recipe), so a teacher trained on milder views than the student's
gives wrong targets where augmentation takes an image outside what it
learned. This measures how many: the teacher's accuracy on the training
split seen clean (the eval resize and centre crop), through the random
resized crop only, through RandAugment only, and through the student's
whole augmentation (`config.data.augment`), each random view drawn
`--passes` times with different seeds.

  python -m drpl_jax.reproduce.teacher_views \
      --config=configs/drpl_vit.py:variant=micro,preset=drpl,runlocal \
      --config.teacher.checkpoint=T.safetensors ... [--passes=2] [--out=F]

prints one line per view and, with `--out`, writes them as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence

import numpy as np

from drpl_jax.input.augment import AugmentConfig, eval_transform
from drpl_jax.input.augment import train_transform

VIEWS = ('clean', 'crop', 'randaugment', 'full')
VIEW_HELP = {
    'clean': 'eval resize and centre crop',
    'crop': 'random resized crop only',
    'randaugment': 'RandAugment only (no crop)',
    'full': "the student's whole augmentation",
}

Teacher = Callable[[np.ndarray], np.ndarray]  # [N, S, S, 3] in [0, 1] -> logits


def view_config(augment: AugmentConfig, view: str) -> AugmentConfig | None:
  """The augmentation of `view` derived from the student's (None = clean).

  `crop` keeps only the random resized crop and `randaugment` only
  RandAugment (on the whole image); flips and random erasing go in both,
  so that each isolates one part. `full` is `augment` itself.
  """
  if view not in VIEWS:
    raise ValueError(f'view {view!r} is not one of {list(VIEWS)}')
  if view == 'clean':
    return None
  if view == 'full':
    return augment
  parts = dict(hflip=False, random_erase=0.0)
  if view == 'crop':
    return dataclasses.replace(augment, randaugment_ops=0, **parts)
  return dataclasses.replace(augment, random_resized_crop=False, **parts)


def _accuracy(
    teacher: Teacher,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
) -> float:
  correct = 0
  for start in range(0, len(images), batch_size):
    chunk = np.stack(images[start : start + batch_size])  # [B, S, S, 3] uint8
    logits = np.asarray(teacher(chunk.astype(np.float32) / 255.0))
    correct += int(
        (logits.argmax(-1) == labels[start : start + batch_size]).sum()
    )
  return correct / len(images)


def teacher_view_accuracy(
    teacher: Teacher,
    images: Sequence[np.ndarray],
    labels: Sequence[int],
    *,
    image_size: int,
    augment: AugmentConfig,
    passes: int = 2,
    crop_ratio: float = 0.875,
    batch_size: int = 256,
    views: Sequence[str] = VIEWS,
) -> dict[str, list[float]]:
  """The teacher's accuracy per view: {view: [accuracy of each pass]}.

  `images` are uint8 [H, W, 3] training images, `labels` their classes;
  pass `p` of a random view draws from `numpy.random.default_rng(p)`, so
  a rerun gives the same figures. The clean view is deterministic and
  runs once.
  """
  if passes < 1:
    raise ValueError(f'passes={passes} must be >= 1')
  labels = np.asarray(labels)
  if len(images) != len(labels) or not len(images):
    raise ValueError(
        f'{len(images)} images and {len(labels)} labels: need '
        'the same, non-zero number'
    )
  out = {}
  for view in views:
    cfg = view_config(augment, view)
    accs = []
    for p in range(1 if cfg is None else passes):
      rng = np.random.default_rng(p)
      seen = [
          eval_transform(im, size=image_size, crop_ratio=crop_ratio)
          if cfg is None
          else train_transform(im, rng, size=image_size, config=cfg)
          for im in images
      ]
      accs.append(_accuracy(teacher, seen, labels, batch_size))
    out[view] = accs
  return out


def format_lines(result: dict[str, list[float]]) -> list[str]:
  """One line per view: mean accuracy and each pass."""
  return [
      f'{view:12s} {np.mean(accs):.3f}  passes '
      f'{", ".join(f"{a:.3f}" for a in accs)}  ({VIEW_HELP[view]})'
      for view, accs in result.items()
  ]


def _run(config, passes: int, max_images: int, out: str) -> None:
  """Loads the training split and the config's teacher, then measures."""
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  from drpl_jax import data  # pylint: disable=g-import-not-at-top
  from drpl_jax.config import base  # pylint: disable=g-import-not-at-top
  from drpl_jax.input.config import DataConfig  # pylint: disable=g-import-not-at-top
  from drpl_jax.teacher import load  # pylint: disable=g-import-not-at-top
  from drpl_jax.utils.errors import UserError  # pylint: disable=g-import-not-at-top

  if not config.teacher.arch or not config.teacher.checkpoint:
    raise UserError(
        'set --config.teacher.arch and '
        '--config.teacher.checkpoint (the teacher to measure)'
    )
  data_cfg = DataConfig.from_config(config.data)
  info = data.ensure_prepared(config.data)
  source = data.get_source(info, data_cfg.train_split)
  count = len(source) if max_images <= 0 else min(max_images, len(source))
  examples = [source[i] for i in range(count)]
  typed = base.teacher_config(config)
  module = load.torch_teacher(
      typed.arch,
      config.teacher.checkpoint,
      typed.num_classes,
      image_size=typed.image_size,
      mean=typed.mean,
      std=typed.std,
      dtype=typed.dtype,
  )
  module.eval()
  forward = jax.jit(lambda x: module(x))  # pylint: disable=unnecessary-lambda
  result = teacher_view_accuracy(
      forward,
      [e['image'] for e in examples],
      [e['label'] for e in examples],
      image_size=data_cfg.image_size,
      augment=data_cfg.augment,
      passes=passes,
      crop_ratio=data_cfg.eval_crop_ratio,
  )
  print(
      f'teacher {typed.arch} from {config.teacher.checkpoint} on '
      f'{count} {data_cfg.train_split} images of {info.name}:'
  )
  print('\n'.join(format_lines(result)))
  if out:
    epath.Path(out).write_text(
        json.dumps(
            {
                'teacher': config.teacher.checkpoint,
                'images': count,
                'augment': dataclasses.asdict(data_cfg.augment),
                **result,
            },
            indent=1,
        )
        + '\n'
    )
    print(f'wrote {out}')


def main(argv: Sequence[str] | None = None) -> None:
  """The command line (an absl command under drpl_jax/cli.py's policy)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from drpl_jax import cli  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file(
      'config', None, 'Training config (its data, augmentation and teacher).'
  )
  passes = flags.DEFINE_integer('passes', 2, 'Draws of each random view.')
  max_images = flags.DEFINE_integer(
      'max_images', 0, 'Use the first N training images (0 = all).'
  )
  out = flags.DEFINE_string('out', '', 'Also write the figures as JSON.')
  flags.mark_flag_as_required('config')

  def run(_):
    _run(config.value, passes.value, max_images.value, out.value)

  cli.run(
      run,
      (cli.UserError, ValueError),
      positional=False,
      argv=sys.argv if argv is None else argv,
  )


if __name__ == '__main__':
  main()
