r"""The README's demo: a micro DRPL-ViT on the bundled digits data set.

A few minutes on 2 CPU cores, no download (the digits ship with
scikit-learn). It travels the same TFDS -> grain -> jitted-step path as real
chest X-rays.

  # 1. a PyTorch CNN teacher fine-tuned on the demo data (about a minute):
  python -m drpl_jax.train_teacher --config=configs/demo.py --arch resnet18 \
      --out /tmp/drpl_demo/teacher/resnet18.safetensors --epochs 2
  # 2. DRPL-ViT distilled from it online (converted to Flax, run in the step):
  python -m drpl_jax.main \
      --config=configs/demo.py:teacher=/tmp/drpl_demo/teacher/resnet18.safetensors \
      --workdir=/tmp/drpl_demo

`launch/demo.sh` runs both. Without `teacher=` the distillation token is
trained on the labels (`distill.kind='none'`), as DeiT does without a teacher.
"""

from drpl_jax.config import base


def get_config(arg: str = ''):
  """The micro `drpl` preset at 32 px with patch 4 (8x8 token grid).

  Arguments: `steps=N` (default 300), `teacher=PATH` (a resnet18 state dict
  from train_teacher: hard distillation from it, online).
  """
  args = base.parse_arg(arg, steps='300', teacher='')
  config = base.drpl_vit('variant=micro,preset=drpl')
  config.data.name = 'demo'
  config.data.image_size = 32
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.5, 0.5, 0.5)
  config.model.num_classes = 10
  config.model.patch_size = 4
  config.model.drop_path_rate = 0.0
  config.distill.kind = 'none'
  config.teacher.image_size = 32
  if args.teacher:
    config.teacher.arch = 'resnet18'
    config.teacher.checkpoint = args.teacher
    config.distill.kind = 'hard'
  config.total_steps = int(args.steps)
  config.batch_size = 64
  config.eval_batch_size = 128
  config.log_every_steps = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.optim.base_lr = 4e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.05
  # Digits are 8x8 upsampled: keep most of the glyph in every crop.
  config.data.augment.crop_scale = (0.6, 1.0)
  config.data.augment.randaugment_ops = 0
  config.data.augment.random_erase = 0.0
  config.mixup.mixup_alpha = 0.0
  config.mixup.cutmix_alpha = 0.0
  config.loss.label_smoothing = 0.1
  return config
