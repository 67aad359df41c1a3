"""Converting PyTorch weights into drpl_jax modules.

Teacher: a torchvision ResNet / DenseNet / RegNetY checkpoint becomes the
equivalent Flax module (`drpl_jax.teacher.load.torch_teacher`, which needs
no torch for .safetensors), which runs inside the jitted train step.
`parity_report` measures the largest logit difference against the PyTorch
forward in fp32.

Command line (an absl command under drpl_jax/cli.py's exit policy; prints
one JSON object):

  python -m drpl_jax.convert teacher --arch resnet50 \
      --checkpoint teacher.pth --num_classes 4 [--image_size 224] \
      [--parity] [--out teacher.safetensors]

`--out` writes the validated state dict, with torchvision's canonical names
(wrappers, 'module.' prefixes and legacy DenseNet names resolved), as
.safetensors: a file that `drpl_jax.teacher.load.torch_teacher` reads on
machines without torch.

Student: `student_from_timm` starts a DRPL-ViT from pretrained weights
(timm / DeiT, official iRPE or CeiT, big_vision / AugReg .npz; the format
is detected, see `drpl_jax.pretrained`) and reports where every parameter
came from; `student_parity_report` compares with timm's model (logits, or
the pre-head features when the class counts differ).

  python -m drpl_jax.convert student --checkpoint deit_s.pth \
      --config=configs/drpl_vit.py:variant=s,preset=deit \
      [--num_classes 4] [--image_size 224] [--parity]

to-timm: a trained deit / vit preset run as a timm state dict
(.safetensors, loads with strict=True); other presets as the PyTorch twin's.

  python -m drpl_jax.convert to-timm --workdir RUN --out deit.safetensors
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from drpl_jax import cli
from drpl_jax import teacher as teacher_lib
from drpl_jax.models import DRPLViT, ModelConfig
from drpl_jax.pretrained import mapping
from drpl_jax.pytorch import torch_io
from drpl_jax.teacher.load import teacher_from_state_dict
from drpl_jax.train.student_init import student_from_timm

# -----------------------------------------------------------------------------
# Teacher.
# -----------------------------------------------------------------------------


def _torchvision_model(arch: str, num_classes: int) -> Any:
  """The torchvision reference model of `arch` (needs torch)."""
  import torchvision  # pylint: disable=g-import-not-at-top

  teacher_lib.arch_spec(arch)
  return torchvision.models.get_model(
      arch, weights=None, num_classes=num_classes
  )


def randomize_batchnorm(model: Any, image_size: int, seed: int = 0) -> None:
  """Gives a torch model non-trivial, well-scaled BatchNorm parameters.

  BN scale/shift are drawn at random, the running statistics are estimated
  on random [0, 1] images normalised with ImageNet statistics (so
  activations stay O(1) through deep networks), then perturbed, so that a
  swapped or ignored BN tensor changes the logits.
  """
  import torch  # pylint: disable=g-import-not-at-top

  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  mean = torch.tensor(teacher_lib.IMAGENET_MEAN)
  std = torch.tensor(teacher_lib.IMAGENET_STD)
  with torch.no_grad():
    for m in bns:
      m.weight.uniform_(0.7, 1.3, generator=g)
      m.bias.normal_(0.0, 0.1, generator=g)
      m.momentum = None  # Cumulative average: the stats of this batch.
      m.reset_running_stats()
    images = torch.rand(4, image_size, image_size, 3, generator=g)
    model.train()
    model(((images - mean) / std).permute(0, 3, 1, 2))
    model.eval()
    for m in bns:
      m.momentum = 0.1
      noise = torch.randn(m.running_mean.shape, generator=g)
      m.running_mean.add_(0.1 * noise * m.running_var.sqrt())
      m.running_var.mul_(
          torch.empty(m.running_var.shape).uniform_(0.7, 1.3, generator=g)
      )


# Jitted once at module level so repeated reports reuse compilations.
_forward = nnx.jit(lambda module, images: module(images))


def _torch_compatible(value: np.ndarray) -> np.ndarray:
  """Integers as they are, floats (bfloat16 included) as float32."""
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.integer):
    return value
  return value.astype(np.float32)


def parity_report(
    arch: str,
    checkpoint: str | None,
    num_classes: int,
    *,
    batch: int = 2,
    image_size: int = 224,
    seed: int = 0,
) -> dict[str, Any]:
  """Runs torchvision and the converted Flax teacher on the same images.

  fp32 on both sides (the Flax side with full-precision matmuls and
  convolutions, also on GPUs); images are random [0, 1] at `image_size`
  (normalised with ImageNet statistics for torch, raw for the Flax module,
  which normalises itself). With `checkpoint` None a random torchvision
  model with randomised BatchNorm (`randomize_batchnorm`) is used. Needs
  torch. Returns max_abs_diff, max_abs_logit, argmax agreement, versions.
  """
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  model = _torchvision_model(arch, num_classes)
  if checkpoint is None:
    randomize_batchnorm(model, image_size, seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
  else:
    state = torch_io.load_state_dict(checkpoint)
  cfg = teacher_lib.TeacherConfig(arch, num_classes, image_size=image_size)
  flax_model, _ = teacher_from_state_dict(
      cfg, state, source=str(checkpoint or 'random init')
  )
  canonical, _ = teacher_lib.canonical_state_dict(state, arch)
  model.load_state_dict(
      {k: torch.from_numpy(_torch_compatible(v)) for k, v in canonical.items()},
      strict=True,
  )
  model.eval()
  rng = np.random.default_rng(seed)
  images = rng.random((batch, image_size, image_size, 3), dtype=np.float32)
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  with torch.no_grad():
    nchw = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2))
    torch_logits = model(nchw).numpy()
  # Full fp32 convolutions/matmuls (no TF32 on GPUs): this measures the
  # conversion, not the accelerator's reduced-precision defaults.
  with jax.default_matmul_precision('float32'):
    flax_logits = np.asarray(_forward(flax_model, jnp.asarray(images)))
  import torchvision  # pylint: disable=g-import-not-at-top

  return {
      'arch': arch,
      'checkpoint': checkpoint,
      'num_classes': num_classes,
      'batch': batch,
      'image_size': image_size,
      'seed': seed,
      'max_abs_diff': float(np.max(np.abs(torch_logits - flax_logits))),
      'max_abs_logit': float(np.max(np.abs(torch_logits))),
      'argmax_agreement': float(
          np.mean(torch_logits.argmax(-1) == flax_logits.argmax(-1))
      ),
      'torch_version': torch.__version__,
      'torchvision_version': torchvision.__version__,
      'jax_version': jax.__version__,
      'jax_backend': jax.default_backend(),
      'precision': 'float32',
  }


def _teacher_command(args: Any) -> dict[str, Any]:
  """`teacher` subcommand: convert, optionally check parity and save."""
  if not args.arch or not args.checkpoint or not args.num_classes:
    raise cli.UserError('teacher needs --arch, --checkpoint and --num_classes')
  args.image_size = args.image_size or 224
  cfg = teacher_lib.TeacherConfig(
      arch=args.arch,
      num_classes=args.num_classes,
      image_size=args.image_size,
      mean=_three_floats('mean', args.mean),
      std=_three_floats('std', args.std),
  )
  state = torch_io.load_state_dict(args.checkpoint)
  module, report = teacher_from_state_dict(cfg, state, source=args.checkpoint)
  params = nnx.state(module, nnx.Param)
  result = {
      'command': 'teacher',
      'arch': args.arch,
      'checkpoint': args.checkpoint,
      'num_classes': args.num_classes,
      'image_size': args.image_size,
      'num_params': int(sum(x.size for x in jax.tree.leaves(params))),
      'consumed': len(report['consumed']),
      'ignored': len(report['ignored']),
      'renamed': len(report['renamed']),
  }
  if args.out:
    canonical, _ = teacher_lib.canonical_state_dict(state, args.arch)
    torch_io.save_safetensors(canonical, args.out)
    result['out'] = args.out
  if args.parity:
    result['parity'] = parity_report(
        args.arch,
        args.checkpoint,
        args.num_classes,
        batch=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
    )
  return result


def _three_floats(name: str, values: Sequence[str]) -> tuple[float, ...]:
  """`--mean` / `--std`: three comma-separated numbers, one per channel."""
  try:
    out = tuple(float(v) for v in values)
  except ValueError:
    out = ()
  if len(out) != 3:
    raise cli.UserError(
        f'--{name}={",".join(values)}: expected three '
        'numbers, one per channel (R,G,B)'
    )
  return out


# -----------------------------------------------------------------------------
# Student (timm / DeiT weights).
# -----------------------------------------------------------------------------


def _parity_problems(info: mapping.SourceInfo, cfg: ModelConfig) -> list[str]:
  """Why our model cannot compute exactly what the timm source computes."""
  problems = []
  if cfg.rpe.kind != 'none' or cfg.conv.kind != 'mlp':
    problems.append(
        f'rpe.kind={cfg.rpe.kind!r}, conv.kind={cfg.conv.kind!r}'
        " (need 'none' and 'mlp', the deit/vit presets)"
    )
  if cfg.distilled != info.distilled:
    problems.append(
        f'model.distilled={cfg.distilled} but the source '
        f'{"has" if info.distilled else "has no"} dist token'
    )
  if cfg.grid_size != info.grid or cfg.patch_size != info.patch_size:
    problems.append(
        f'model.image_size={cfg.image_size} differs from the source '
        f'resolution {info.grid * info.patch_size}'
    )
  if cfg.stem != 'patch' or not cfg.abs_pos_embed:
    problems.append('the model needs stem=patch and abs_pos_embed=True')
  if (cfg.layer_scale_init is not None) != info.layer_scale:
    problems.append('layer scale differs between the source and the model')
  return problems


def timm_reference(state: Mapping[str, Any], num_heads: int) -> Any:
  """The timm model of a ViT/DeiT state dict, weights loaded, eval mode.

  Shapes come from the state dict; `num_heads` (not stored in weights)
  from our config. Needs torch and timm.
  """
  # pylint: disable=g-import-not-at-top
  import torch
  from timm.models import deit, vision_transformer
  # pylint: enable=g-import-not-at-top

  state = mapping.as_float32_state(state, 'state dict')
  info = mapping.source_info(state)
  hidden = state['blocks.0.mlp.fc1.weight'].shape[0]
  kwargs = dict(
      img_size=info.grid * info.patch_size,
      patch_size=info.patch_size,
      embed_dim=info.width,
      depth=info.depth,
      num_heads=num_heads,
      mlp_ratio=hidden / info.width,
      num_classes=info.num_classes or 0,
      qkv_bias='blocks.0.attn.qkv.bias' in state,
      no_embed_class=info.pos_prefix == 0,
      init_values=1.0 if info.layer_scale else None,
  )
  cls = (
      deit.VisionTransformerDistilled
      if info.distilled
      else vision_transformer.VisionTransformer
  )
  model = cls(**kwargs)
  model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=True
  )
  return model.eval()


def student_parity_report(
    checkpoint: str | Mapping[str, Any],
    model: DRPLViT,
    *,
    batch: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
  """Max |difference| of timm's model and `model` (fp32, eval mode).

  `model` must compute the same function as the source: the deit (or vit)
  preset, RPE none, MLP, the source's resolution; otherwise a ValueError
  says what differs. With the source's class count the logits are
  compared; otherwise (fresh heads) the final-normed tokens before the
  heads ('compared': 'features'). Inputs are random normal images.
  """
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from drpl_jax import pretrained  # pylint: disable=g-import-not-at-top

  state, source = pretrained.load_source(checkpoint)
  fmt = pretrained.detect_format(state, source)
  if fmt != 'timm':
    raise ValueError(
        f'{source}: the parity check compares with timm, which '
        f'has no model for a {pretrained.FORMATS[fmt]} '
        'checkpoint (the parity tests of that format cover it)'
    )
  cfg = model.config
  info = mapping.source_info(mapping.as_float32_state(state), source)
  problems = _parity_problems(info, cfg)
  if problems:
    raise ValueError(
        f'{source}: no timm parity check for this model: ' + '; '.join(problems)
    )
  ref = timm_reference(state, cfg.num_heads)
  images = (
      np.random.default_rng(seed)
      .standard_normal((batch, cfg.image_size, cfg.image_size, 3))
      .astype(np.float32)
  )
  features = info.num_classes != cfg.num_classes
  nchw = torch.from_numpy(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    want = (ref.forward_features(nchw) if features else ref(nchw)).numpy()
  with jax.default_matmul_precision('float32'):
    got = np.asarray(
        (_features if features else _forward)(model, jnp.asarray(images))
    )
  out = {
      'compared': 'features' if features else 'logits',
      'max_abs_diff': float(np.max(np.abs(want - got))),
      'max_abs_value': float(np.max(np.abs(want))),
      'batch': batch,
      'image_size': cfg.image_size,
      'seed': seed,
      'precision': 'float32',
      'timm_version': timm.__version__,
      'torch_version': torch.__version__,
      'jax_version': jax.__version__,
      'jax_backend': jax.default_backend(),
  }
  if features:
    out['note'] = (
        f'the source has {info.num_classes} classes and the '
        f'model {cfg.num_classes}: the heads are fresh, so the '
        'pre-head features (final-normed tokens) are compared; '
        f'pass --num_classes {info.num_classes} to compare logits'
    )
  else:
    out['max_abs_logit'] = out['max_abs_value']
    out['argmax_agreement'] = float(np.mean(want.argmax(-1) == got.argmax(-1)))
  return out


_features = nnx.jit(lambda module, images: module.forward_features(images)[0])


def _student_command(args: Any) -> dict[str, Any]:
  """`student` subcommand: map weights, report, optionally parity.

  The import report is in the output even when the parity check cannot
  run (its reason is under 'parity.error', and the exit code is 2).
  """
  if not args.checkpoint or args.config is None:
    raise cli.UserError('student needs --checkpoint and --config')
  config = args.config
  model_dict = config.model.to_dict()
  for key in ('num_classes', 'image_size'):
    if getattr(args, key) is not None:
      model_dict[key] = getattr(args, key)
  model, report = student_from_timm(
      args.checkpoint, model_dict, strict_head=args.strict_head
  )
  cfg = model.config
  result = {
      'command': 'student',
      'checkpoint': args.checkpoint,
      'format': report['format'],
      'format_name': report['format_name'],
      'config': args.config_spec,
      'num_classes': cfg.num_classes,
      'image_size': cfg.image_size,
      'num_params': int(
          sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
      ),
      'report': report,
  }
  if args.parity:
    try:
      result['parity'] = student_parity_report(
          args.checkpoint, model, batch=args.batch_size, seed=args.seed
      )
    except ValueError as e:
      result['parity'] = {'error': str(e)}
      result['exit_code'] = 2
  return result


def _to_timm_command(args: Any) -> dict[str, Any]:
  """`to-timm`: a trained run's weights as a timm (or twin) state dict."""
  from drpl_jax.evaluation import predict  # pylint: disable=g-import-not-at-top
  from drpl_jax.pretrained import to_timm  # pylint: disable=g-import-not-at-top

  if not args.workdir or not args.out:
    raise cli.UserError('to-timm needs --workdir and --out')
  restored = predict.restore_model(
      args.workdir, step=args.step, use_ema=args.ema
  )
  model = restored.model()
  cfg = model.config
  result = {
      'command': 'to-timm',
      'workdir': args.workdir,
      'step': restored.step,
      'weights': restored.weights,
      'out': args.out,
  }
  if to_timm.timm_problems(cfg):
    from drpl_jax.pytorch.twin import convert as twin  # pylint: disable=g-import-not-at-top
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

    state = twin.state_dict_from_flax(model)
    save_file({k: v.contiguous() for k, v in state.items()}, args.out)
    result.update(
        target='drpl_jax.pytorch.twin.DRPLViTTorch',
        note=(
            'this preset ('
            + ', '.join(to_timm.timm_problems(cfg))
            + ') has no '
            "timm counterpart: written as the PyTorch twin's state dict"
        ),
    )
  else:
    torch_io.save_safetensors(to_timm.timm_state_dict(model), args.out)
    result.update(target='timm', timm_model=to_timm.timm_model_name(cfg))
  return result


# Subcommand name -> handler.
_COMMANDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    'teacher': _teacher_command,
    'student': _student_command,
    'to-timm': _to_timm_command,
}


def _define_flags() -> None:
  """The flags of the three subcommands (defined only when run)."""
  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  flags.DEFINE_enum(
      'arch',
      None,
      sorted(teacher_lib.TEACHER_ARCHS),
      'teacher: the torchvision architecture.',
  )
  flags.DEFINE_string(
      'checkpoint',
      None,
      'teacher: .safetensors or .pth/.pt'
      '/.bin state dict; student: also .npz; local or gs://.',
  )
  flags.DEFINE_integer(
      'num_classes',
      None,
      "teacher: required; student: default the config's model.num_classes.",
      lower_bound=1,
  )
  flags.DEFINE_integer(
      'image_size',
      None,
      'teacher: default 224; student: '
      "default the config's model.image_size.",
      lower_bound=1,
  )
  flags.DEFINE_list(
      'mean',
      [str(v) for v in teacher_lib.IMAGENET_MEAN],
      'teacher: per-channel input mean, R,G,B.',
  )
  flags.DEFINE_list(
      'std',
      [str(v) for v in teacher_lib.IMAGENET_STD],
      'teacher: per-channel input std, R,G,B.',
  )
  config_flags.DEFINE_config_file(
      'config',
      None,
      'student: config file and argument, e.g. '
      'configs/drpl_vit.py:variant=s,preset=deit.',
  )
  flags.DEFINE_bool(
      'strict_head',
      False,
      'student: a class-count mismatch '
      'is an error (default: the heads start fresh).',
  )
  flags.DEFINE_bool(
      'parity',
      False,
      'teacher, student: compare logits with '
      'torchvision / timm (needs torch).',
  )
  cli.define_batch_size(2, 'Parity batch size.')
  flags.DEFINE_integer('seed', 0, 'Parity image seed.')
  flags.DEFINE_string(
      'out',
      None,
      'teacher: write the canonical state dict '
      '(.safetensors); to-timm: the output file.',
  )
  cli.define_workdir(required=False)
  cli.define_step()
  cli.define_ema()


def main(argv: Sequence[str]) -> int:
  """Runs the subcommand argv[1]; prints its JSON summary."""
  # pylint: disable=g-import-not-at-top
  import types
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top
  if len(argv) != 2 or argv[1] not in _COMMANDS:
    raise cli.UserError(
        f'expected one subcommand of {sorted(_COMMANDS)}, '
        f'got {list(argv[1:])}'
    )
  f = flags.FLAGS
  args = types.SimpleNamespace(**{name: f[name].value for name in f})
  args.config_spec = (
      config_flags.get_config_filename(f['config'])
      if f['config'].present
      else None
  )
  result = _COMMANDS[argv[1]](args)
  code = int(result.pop('exit_code', 0))
  print(json.dumps(result, indent=2, sort_keys=True))
  return code


def run() -> None:
  """`python -m drpl_jax.convert` and `drpl-convert`: bad input (a
  ValueError, a missing file) exits 2 with one `error:` line. TensorFlow is
  not pre-imported: beside torch in one process it can crash."""
  _define_flags()
  cli.run(main, (ValueError, FileNotFoundError), tensorflow=False)
