r"""A small-data recipe: a few thousand radiographs, a CPU or one accelerator.

Teacher and student in one place, for e.g. the 2,579-image COVID vs Normal
set (../shared/data/covid19_radiography_2k5). How each value was chosen is
written beside it. "provisional" means: not yet measured here, to be chosen
by the validation sweep (`python -m drpl_jax.sweep`, validation split only,
never test); "swept" means measured on that split, and
docs/small_data.md holds the sweep's table, its command and the rule
that chose; the others follow a reference recipe or a measurement named in
the comment.

Arguments (comma separated `key=value`):
  preset=drpl|deit_conv|...  the ablation preset (default drpl)
  data=PATH                  the raw data (default ../shared/data/
                             covid19_radiography_2k5 beside the repo)
  classes=A+B                class subset, '+'-separated (default COVID+Normal)
  teacher=PATH               a trained teacher .safetensors (its arch and
                             resolution must be `teacher_recipe`'s); without
                             it, distillation needs one (train it first, or
                             let the sweep train it)

  # 1. the teacher (PyTorch), with the recipe's settings:
  python -m drpl_jax.sweep teacher --config=configs/small_data.py \
      --out /tmp/small/teacher.safetensors
  # 2. the student, distilled from it online:
  python -m drpl_jax.main \
      --config=configs/small_data.py:teacher=/tmp/small/teacher.safetensors \
      --workdir=/tmp/small/drpl
"""

import os

import ml_collections

from drpl_jax.config import base

DEFAULT_DATA = os.path.normpath(
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        '..',
        '..',
        'shared',
        'data',
        'covid19_radiography_2k5',
    )
)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The recipe for `preset=...,data=...,classes=...,teacher=...`."""
  args = base.parse_arg(
      arg, preset='drpl', data=DEFAULT_DATA, classes='COVID+Normal', teacher=''
  )
  config = base.drpl_vit(f'variant=micro,preset={args.preset},runlocal')
  classes = [c for c in args.classes.split('+') if c]

  config.data.name = 'covid19_radiography'
  config.data.manual_dir = args.data
  config.data.classes = ','.join(classes)
  config.model.num_classes = len(classes) if classes else 4

  # How the values were chosen. "swept": one factor at a time around this
  # recipe, one seed, on the 2,579-image set's VALIDATION split (258
  # images; docs/small_data.md holds the tables and their commands). A
  # candidate replaces the recipe's value only when it is better by more
  # than the noise (one run's 95% interval on 258 images is about +-4.5
  # points near 0.85) and does not raise the accuracy with the lungs
  # hidden (the shortcut probe). Sweep 1 (1,200 steps) changed nothing;
  # sweep 3 (the schedule) took 4,800 steps; sweeps 4 (a stronger teacher,
  # 3 seeds), 5 (drop path, mixup and CutMix), 6 (resolution), 7 (7,200
  # steps) and 8 (random erasing, RandAugment ops) changed nothing.

  # Resolution and tokens: the cxr2k5 ablation's (docs/ablation_2k5.md).
  # swept (sweep 6) at the same 8x8 tokens, so at the same cost: 96 px
  # with patch 12 and 128 px with patch 16 scored 90.3 and 90.7 against
  # 90.3, and more with the lungs hidden (60.9, 60.1 against 57.0).
  config.data.image_size = 64
  config.model.patch_size = 8  # swept with data.image_size, above
  config.model.variant = 'micro'  # provisional: not swept

  # Budget: 4,800 steps, an estimated 19 min for drpl alone on 2 cores (the
  # cxr2k5 table's measured 0.226 s per step), inside the 30 min.
  # swept: 4,800 steps with 240 warm-up against 1,200: validation 91.5
  # against 82.9 (beyond the noise), lungs hidden 52.3 against 53.1 on seed
  # 0 (over 3 seeds 57.8 against 53.4, lungs only 81.9 against 72.4).
  # swept (sweep 7): 7,200 steps (about 27 min alone) 91.1 against 90.3,
  # inside the noise, with the lungs hidden 66.3 against 57.0.
  config.total_steps = 4800
  config.batch_size = 32  # provisional: not swept
  config.eval_batch_size = 64
  config.log_every_steps = 100
  config.eval_every_steps = 1200
  config.checkpoint_every_steps = 600
  # 5e-4 per 512 scaled linearly, as DeiT: a peak of 5e-4 at batch 32.
  # swept: 4e-3 and 1.6e-2 inside the noise, more shortcut reliance.
  config.optim.base_lr = 8e-3
  # swept with total_steps (5% of the steps, as the ablation).
  config.optim.warmup_steps = 240
  config.optim.weight_decay = 0.05  # DeiT's value
  # iRPE tables decayed like every matrix: the official iRPE DeiT recipe.
  config.optim.rpe_weight_decay = True

  # Augmentation strength (and border reliance: chosen with the shortcut
  # probes of the sweep's validation evaluation, not by accuracy alone).
  # swept: (0.6, 1.0) +5.9 on one seed, +2.2 over 3 seeds (inside the
  # seeds' spread; lungs-hidden accuracy equal): kept (docs/small_data.md).
  config.data.augment.crop_scale = (0.35, 1.0)
  # swept (sweep 8): 1 op 91.5 against 90.3, inside the noise, with the
  # lungs hidden 65.1 against 57.0.
  config.data.augment.randaugment_ops = 2
  # swept: 9 inside the noise.
  config.data.augment.randaugment_magnitude = 5
  # swept (sweep 8): DeiT's 0.25 scored 1.5 lower, inside the noise.
  config.data.augment.random_erase = 0.0
  # swept (sweep 5, with CutMix 1.0): DeiT's 0.8 scored 3.1 lower (inside
  # the noise) and raised lungs-hidden accuracy by 7.4.
  config.mixup.mixup_alpha = 0.0
  config.mixup.cutmix_alpha = 0.0  # swept with mixup_alpha, above
  # swept: 0.1 scored 1.6 lower, inside the noise.
  config.model.drop_path_rate = 0.0

  # Distillation (DeiT's best on ImageNet: hard, alpha 0.5).
  # swept: soft inside the noise, more shortcut reliance.
  config.distill.kind = 'hard' if config.model.distilled else 'none'
  # swept: 0.3 inside the noise, more shortcut reliance.
  config.distill.alpha = 0.5
  config.distill.tau = 1.0  # provisional (used by soft distillation only)
  # The teacher's input: the student's augmented view.
  # swept: 'crop' (the teacher sees the clean crop) made no difference.
  config.data.augment.teacher_view = 'student'

  # The teacher: `python -m drpl_jax.train_teacher` flags (sweep teacher
  # runs it with these). Trained from scratch (nothing is downloaded). The
  # cxr2k5 ablation's teacher: validation accuracy 0.903 (10 min on 2
  # cores). Measured against it, on validation: the same teacher trained on
  # the student's augmentation (`--augment student`) 0.837, so the mild
  # crop alone (train_teacher's `lite`) is kept; a ResNet-18 at 112 px
  # (15 epochs) 0.926, but a student distilled from it was not measured
  # (provisional).
  config.teacher_recipe = ml_collections.ConfigDict(
      dict(
          arch='regnet_y_400mf',  # provisional: see above
          batch_size=32,  # provisional: not swept
          lr=1e-3,  # train_teacher's default; provisional: not swept
          weight_decay=0.05,  # train_teacher's default
          image_size=64,  # the student's resolution
          crop_min_scale=0.5,  # train_teacher's default (`lite`)
      )
  )
  # swept (sweep 4, 3 seeds): 60 epochs make a stronger teacher (validation
  # 0.938 against 0.903) but not a better student: 91.9 against 91.6,
  # inside the seeds' spread; 30 epochs cost half the time.
  config.teacher_recipe.epochs = 30
  # The teacher's input size is its own (not tied to the student's).
  config.teacher = ml_collections.ConfigDict(config.teacher.to_dict())
  config.teacher.arch = (
      config.teacher_recipe.arch if config.model.distilled else ''
  )
  config.teacher.checkpoint = args.teacher
  config.teacher.image_size = config.teacher_recipe.image_size
  return config
