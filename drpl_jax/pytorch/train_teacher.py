r"""Fine-tunes a torchvision CNN teacher in PyTorch on the prepared data.

  python -m drpl_jax.train_teacher --config=configs/drpl_vit.py \
      --config.data.manual_dir=/data/COVID-19_Radiography_Dataset \
      --arch resnet50 --out /models/teacher.safetensors \
      [--init resnet50_imagenet.safetensors] [--epochs 10] [--batch_size 32] \
      [--lr 1e-3] [--image_size 224]

The model is `torchvision.models.<arch>(weights=None, num_classes=C)` with C
the data set's class count; `--init` starts from a state dict the user has
(e.g. ImageNet weights; nothing is ever downloaded), re-initialising the
classifier when its class count differs. Training: AdamW, linear warmup and
cosine decay, the `torch_data` train view (mild random resized crop, no
flip; with `--augment student`, the student's own train transform from
`--config`, RandAugment included), CUDA when available (bf16 autocast there), else the CPU. The epoch
with the best validation accuracy (ties: lower validation loss) is kept.

Writes `PATH.safetensors` (torchvision's exact state-dict naming, without
BatchNorm's `num_batches_tracked` counters, which the Flax converter ignores
and `load_state_dict(strict=True)` in torch fills in itself) and
`PATH.json`: validation metrics of the kept epoch, per-epoch history, arch,
data set, input size and normalisation, seed, init and the weights' sha256.
Convert the result for online distillation with `drpl_jax.pytorch.convert`.

On the CPU a run is deterministic for a seed: torch.manual_seed fixes the
initial weights, and the epoch order and crops come from numpy generators
seeded with (seed, epoch[, index]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from absl import flags
import torch
import torchvision

from drpl_jax import cli
from drpl_jax.input import augment as aug_lib
from drpl_jax.pytorch import soft_labels
from drpl_jax.pytorch import torch_data
from drpl_jax.pytorch import torch_io
from drpl_jax.pytorch import torchvision_models as tv_models

SELECT_BY = ('accuracy', 'balanced_accuracy')
AUGMENT = ('lite', 'student')


def classification_metrics(
    confusion: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
  """Accuracy, balanced accuracy and per-class sensitivity (rows = true)."""
  support = confusion.sum(axis=1)
  correct = np.diag(confusion)
  sensitivity = {
      name: (float(correct[i] / support[i]) if support[i] else None)
      for i, name in enumerate(class_names)
  }
  present = [v for v in sensitivity.values() if v is not None]
  total = int(confusion.sum())
  return {
      'accuracy': float(correct.sum() / total) if total else 0.0,
      'balanced_accuracy': float(np.mean(present)) if present else 0.0,
      'sensitivity': sensitivity,
      'support': {n: int(s) for n, s in zip(class_names, support)},
      'confusion_matrix': confusion.astype(int).tolist(),
      'num_examples': total,
  }


def _autocast(device: torch.device):
  if device.type == 'cuda':
    return torch.autocast('cuda', dtype=torch.bfloat16)
  return contextlib.nullcontext()


def evaluate(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    class_names: Sequence[str],
) -> dict[str, Any]:
  """Eval-mode loss and `classification_metrics` over `loader`."""
  num_classes = len(class_names)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  loss_sum, count = 0.0, 0
  model.eval()
  with torch.inference_mode(), _autocast(device):
    for batch in loader:
      labels = batch['label'].to(device)
      logits = model(batch['image'].to(device)).float()
      loss_sum += float(
          torch.nn.functional.cross_entropy(logits, labels, reduction='sum')
      )
      count += len(labels)
      pred = logits.argmax(-1).cpu().numpy()
      np.add.at(confusion, (labels.cpu().numpy(), pred), 1)
  metrics = classification_metrics(confusion, class_names)
  metrics['loss'] = loss_sum / max(count, 1)
  return metrics


def _train_epoch(
    model: torch.nn.Module,
    loader: Any,
    optimizer: Any,
    scheduler: Any,
    device: torch.device,
    max_steps: int | None,
) -> tuple[float, float, int]:
  """One pass; returns (mean loss, accuracy, steps)."""
  model.train()
  loss_sum, correct, count, steps = 0.0, 0, 0, 0
  for batch in loader:
    if max_steps is not None and steps >= max_steps:
      break
    images = batch['image'].to(device)
    labels = batch['label'].to(device)
    with _autocast(device):
      logits = model(images).float()
    loss = torch.nn.functional.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
      raise FloatingPointError(
          f'non-finite training loss {loss.item()} at '
          f'step {steps}; lower --lr'
      )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    loss_sum += loss.item() * len(labels)
    correct += int((logits.argmax(-1) == labels).sum())
    count += len(labels)
    steps += 1
  return loss_sum / max(count, 1), correct / max(count, 1), steps


def _schedule(total_steps: int) -> Any:
  """lr multiplier: linear warmup (5% of steps), then cosine to zero."""
  warmup = max(1, total_steps // 20)

  def factor(step: int) -> float:
    if step < warmup:
      return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

  return factor


def _init_model(
    arch: str, num_classes: int, init: str | None
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
  """Builds the model and loads `--init` (head re-initialised if needed)."""
  model = tv_models.build_model(arch, num_classes)
  if not init:
    return model, None
  state = torch_io.load_state_dict(init)
  report = tv_models.load_state(
      model, state, arch=arch, path=init, reinit_head=True
  )
  report.update(
      path=os.path.abspath(init), sha256=soft_labels.sha256_file(init)
  )
  if report['head_reinitialised']:
    report['note'] = (
        f'classifier {tv_models.head_prefix(model)!r} re-initialised: the '
        f'checkpoint has {report["checkpoint_num_classes"]} classes, the '
        f'data set {num_classes}'
    )
  return model, report


def _write_outputs(
    out: str, state: Mapping[str, np.ndarray], result: dict[str, Any]
) -> dict[str, Any]:
  """Writes the weights and the JSON (each atomically); returns the JSON."""
  base = os.path.splitext(out)[0]
  tmp = base + '.partial.safetensors'
  torch_io.save_safetensors(state, tmp)
  os.replace(tmp, out)
  result.update(
      weights_file=os.path.abspath(out), sha256=soft_labels.sha256_file(out)
  )
  json_path = base + '.json'
  with open(json_path + '.partial', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(json_path + '.partial', json_path)
  result['json_file'] = os.path.abspath(json_path)
  return result


def _check_num_classes(config: Any, class_names: Sequence[str]) -> None:
  model_cfg = config.get('model') if hasattr(config, 'get') else None
  configured = model_cfg.get('num_classes') if model_cfg else None
  if configured and int(configured) != len(class_names):
    raise ValueError(
        f'config.model.num_classes={configured} but the data set has '
        f'{len(class_names)} classes {list(class_names)}; set '
        f'--config.model.num_classes={len(class_names)} (or leave it out: '
        'the command line infers it from the data)'
    )


def train_teacher(
    config: Any,
    arch: str,
    out: str,
    *,
    init: str | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    image_size: int | None = None,
    weight_decay: float = 0.05,
    crop_scale: Sequence[float] = torch_data.DEFAULT_CROP_SCALE,
    augment: str = 'lite',
    select_by: str = 'accuracy',
    max_steps_per_epoch: int | None = None,
    eval_limit: int | None = None,
    num_workers: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
  """Fine-tunes torchvision `arch` on `config.data`; writes `out` and JSON.

  Args:
    config: the training config (`data.*`, `teacher.{image_size, mean,
      std}`, `seed`, `model.num_classes` which must match the data set).
    arch: a torchvision name from `tv_models.known_archs()`.
    out: the `.safetensors` file to write; the JSON goes beside it.
    init: a torchvision state dict to start from (`.safetensors` or `.pth`).
    epochs: passes over the train split.
    batch_size: examples per step.
    lr: peak AdamW learning rate.
    image_size: input size (default config.teacher.image_size).
    weight_decay: AdamW weight decay.
    crop_scale: area range of the random resized crop ('lite' only).
    augment: 'lite' (a random resized crop of `crop_scale`) or 'student'
      (the student's own train transform from `config.data.augment`:
      its crop, RandAugment and erasing), so that the teacher, which
      distils online on the student's augmented batches, has seen such
      images in training.
    select_by: the validation metric that picks the epoch kept.
    max_steps_per_epoch: cap on steps per epoch (smoke runs, tests).
    eval_limit: evaluate on only the first N validation examples.
    num_workers: DataLoader worker processes.
    device: torch device (default CUDA when available, else CPU).

  Returns:
    The JSON content (also written to `out` with suffix `.json`).
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top

  start = time.time()
  out = soft_labels.check_output_path(out, ('.safetensors',))
  if select_by not in SELECT_BY:
    raise ValueError(f'select_by={select_by!r} is not one of {SELECT_BY}')
  if augment not in AUGMENT:
    raise ValueError(f'augment={augment!r} is not one of {AUGMENT}')
  if epochs < 1 or batch_size < 1:
    raise ValueError(
        f'epochs and batch_size must be >= 1, got {epochs} and {batch_size}'
    )
  if arch not in tv_models.known_archs():
    raise ValueError(
        f'unknown teacher arch {arch!r}; known: {tv_models.known_archs()}'
    )
  info = data.ensure_prepared(config.data)
  class_names = list(info.class_names)
  _check_num_classes(config, class_names)
  seed = int(config.get('seed', 0))
  torch.manual_seed(seed)
  model, init_report = _init_model(arch, len(class_names), init)
  dev = torch_data.pick_device(device)
  view = dict(
      image_size=int(image_size or config.teacher.image_size),
      mean=tuple(config.teacher.mean),
      std=tuple(config.teacher.std),
  )
  splits = (
      config.data.get('train_split', 'train'),
      config.data.get('eval_split', 'validation'),
  )
  student = None
  if augment == 'student':
    student = aug_lib.AugmentConfig.from_config(config.data.get('augment'))
  train_set = torch_data.TeacherDataset(
      data.get_source(config.data, splits[0]),
      train=True,
      seed=seed,
      crop_scale=crop_scale,
      student=student,
      **view,
  )
  eval_set = torch_data.TeacherDataset(
      data.get_source(config.data, splits[1]), **view
  )
  steps_per_epoch = max(1, len(train_set) // batch_size)
  if max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
  hparams = {
      'batch_size': batch_size,
      'lr': lr,
      'weight_decay': weight_decay,
      'augment': augment,
      'crop_scale': list(crop_scale),
      'student_augment': None
      if student is None
      else dataclasses.asdict(student),
      'hflip': False,
      'steps_per_epoch': steps_per_epoch,
      'optimizer': 'adamw',
      'schedule': 'warmup 5% + cosine',
  }
  eval_loader = torch_data.make_loader(
      eval_set, batch_size=batch_size, num_workers=num_workers, limit=eval_limit
  )
  history, best_epoch, best_metrics, best_state = _fit(
      model.to(dev),
      train_set,
      eval_loader,
      class_names,
      epochs=epochs,
      hparams=hparams,
      select_by=select_by,
      num_workers=num_workers,
      device=dev,
  )
  result = {
      'arch': arch,
      'num_classes': len(class_names),
      'class_names': class_names,
      'dataset': {
          'name': info.name,
          'version': info.version,
          'train_split': splits[0],
          'eval_split': splits[1],
          'num_train': len(train_set),
          'num_eval': len(eval_set),
      },
      'image_size': view['image_size'],
      'mean': list(view['mean']),
      'std': list(view['std']),
      'seed': seed,
      'epochs': epochs,
      'best_epoch': best_epoch,
      'select_by': select_by,
      'validation': best_metrics,
      'history': history,
      'init': init_report,
      'hparams': hparams,
      'device': str(dev),
      'torch_version': torch.__version__,
      'torchvision_version': torchvision.__version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'
      ),
      'seconds': round(time.time() - start, 1),
  }
  return _write_outputs(out, best_state, result)


def _fit(
    model: torch.nn.Module,
    train_set: torch_data.TeacherDataset,
    eval_loader: Any,
    class_names: Sequence[str],
    *,
    epochs: int,
    hparams: Mapping[str, Any],
    select_by: str,
    num_workers: int,
    device: torch.device,
) -> tuple[list[dict[str, Any]], int, dict[str, Any], dict[str, np.ndarray]]:
  """The epoch loop; returns (history, best epoch, its metrics, its state)."""
  batch_size = hparams['batch_size']
  steps_per_epoch = hparams['steps_per_epoch']
  optimizer = torch.optim.AdamW(
      model.parameters(), lr=hparams['lr'], weight_decay=hparams['weight_decay']
  )
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, _schedule(epochs * steps_per_epoch)
  )
  history, best = [], None
  for epoch in range(1, epochs + 1):
    tic = time.time()
    loader = torch_data.make_loader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        epoch=epoch,
        drop_last=True,
        num_workers=num_workers,
        limit=steps_per_epoch * batch_size,
    )
    loss, acc, steps = _train_epoch(
        model, loader, optimizer, scheduler, device, steps_per_epoch
    )
    metrics = evaluate(model, eval_loader, device, class_names)
    history.append(
        {
            'epoch': epoch,
            'steps': steps,
            'train_loss': loss,
            'train_accuracy': acc,
            'val_loss': metrics['loss'],
            'val_accuracy': metrics['accuracy'],
            'val_balanced_accuracy': metrics['balanced_accuracy'],
            'seconds': round(time.time() - tic, 2),
        }
    )
    print(
        f'[train_teacher] epoch {epoch}/{epochs} loss {loss:.4f} train_acc '
        f'{acc:.4f} val_acc {metrics["accuracy"]:.4f} val_loss '
        f'{metrics["loss"]:.4f} ({time.time() - tic:.1f}s)',
        file=sys.stderr,
        flush=True,
    )
    key = (metrics[select_by], -metrics['loss'])
    if best is None or key > best[0]:
      best = (key, epoch, metrics, tv_models.state_dict_numpy(model))
  return (history,) + best[1:]


def _define_flags() -> None:
  """The CLI flags (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string(
      'arch', None, f'torchvision arch: {tv_models.known_archs()}'
  )
  flags.DEFINE_string('out', None, 'Output PATH.safetensors (+ PATH.json).')
  flags.DEFINE_string('init', None, 'torchvision state dict to start from.')
  flags.DEFINE_integer('epochs', 10, 'Epochs.')
  cli.define_batch_size(32)
  flags.DEFINE_float('lr', 1e-3, 'Peak AdamW learning rate.')
  flags.DEFINE_float('weight_decay', 0.05, 'AdamW weight decay.')
  flags.DEFINE_integer('image_size', 0, '0 = config.teacher.image_size.')
  flags.DEFINE_float(
      'crop_min_scale',
      torch_data.DEFAULT_CROP_SCALE[0],
      'Smallest crop area fraction (1 = no crop).',
  )
  flags.DEFINE_enum(
      'augment',
      'lite',
      AUGMENT,
      'lite: a random resized crop (--crop_min_scale); student: the '
      "student's train transform from --config (config.data.augment).",
  )
  flags.DEFINE_enum('select_by', 'accuracy', SELECT_BY, 'Epoch selection.')
  flags.DEFINE_integer('max_steps_per_epoch', 0, '0 = the whole split.')
  flags.DEFINE_integer('num_workers', 0, 'DataLoader workers.')
  flags.DEFINE_string('device', None, 'torch device (default cuda if any).')
  flags.mark_flags_as_required(['config', 'arch', 'out'])


def main(argv: Sequence[str]) -> None:
  """CLI entry: trains, prints the JSON summary to stdout."""
  del argv  # only flags (cli.run checks)
  f = flags.FLAGS
  from drpl_jax import data  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import preflight  # pylint: disable=g-import-not-at-top

  preflight.infer_num_classes(
      f.config,
      data.ensure_prepared(f.config.data).class_names,
      preflight.explicit_overrides(sys.argv),
  )
  result = train_teacher(
      f.config,
      f.arch,
      f.out,
      image_size=f.image_size or None,
      crop_scale=(f.crop_min_scale, 1.0),
      max_steps_per_epoch=f.max_steps_per_epoch or None,
      **cli.flag_values(
          'init',
          'epochs',
          'batch_size',
          'lr',
          'weight_decay',
          'augment',
          'select_by',
          'num_workers',
          'device',
      ),
  )
  print(
      json.dumps(
          {
              k: result[k]
              for k in (
                  'arch',
                  'best_epoch',
                  'weights_file',
                  'json_file',
                  'sha256',
              )
          }
          | {'val_accuracy': result['validation']['accuracy']}
      )
  )


def run() -> None:
  """The command line: defines the flags, then runs `main` under the exit
  policy of drpl_jax/cli.py (bad input, a ValueError or OSError: exit 2)."""
  _define_flags()
  cli.run(main, (ValueError, OSError), positional=False)
