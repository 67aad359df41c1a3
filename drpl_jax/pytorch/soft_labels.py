r"""Offline teacher: a PyTorch model's logits on a data set, keyed by id.

  python -m drpl_jax.soft_labels --config=configs/drpl_vit.py \
      --config.data.manual_dir=/data/covid --out /data/teacher_logits.npz \
      (--arch resnet50 --checkpoint teacher.safetensors
       | --torchscript teacher.pt | --module mypkg.models:build_teacher) \
      [--splits train,validation,test] [--batch_size 64] [--image_size 224]

Use this for teachers that `drpl_jax.pytorch.convert` cannot turn into Flax (any
`nn.Module`, a TorchScript file). The teacher runs once, in eval mode, on
the un-augmented view of every example (`drpl_jax.pytorch.torch_data.eval_view`:
resize to the teacher's size, bilinear with antialiasing, normalise with
`config.teacher.mean/std`), and its logits are stored by example id. The
training input pipeline joins them to batches with `SoftLabels.lookup`.

When offline labels are exact, and when they are not:

* Exact: the student sees the same fixed, un-augmented view the teacher saw
  (random crop, RandAugment, random erasing, mixup and cutmix all off; the
  student's own resize/normalisation may differ only by what the teacher
  would be invariant to). Then the stored logits are what an online teacher
  would compute on that batch.
* An approximation: any augmentation or mixing. The student is trained on a
  crop, a distorted or a mixed image, while the stored logits describe the
  whole clean image; the targets then disagree with the input exactly where
  distillation should help most (a crop that lost the lesion, a 60/40
  mixture of two classes). This is why the default is the online,
  consistent teacher (README.md, "Distillation"; Beyer et al. 2022, "Knowledge
  distillation: a good teacher is patient and consistent"): the converted
  teacher runs inside the jitted train step on the very batch the student
  sees.

File formats (by the extension of `--out`):
  .npz          `ids` (str [N]), `logits` (float32 [N, C]), `splits`
                (str [N], the split of each example), `metadata` (a JSON
                string). Read with numpy, no pickle.
  .safetensors  tensors `logits` (float32 [N, C]) and `split_index` (int32
                [N]); the header metadata entry `drpl_soft_labels` is a JSON
                object with the metadata plus `ids` and `split_names`.
Metadata: the teacher (kind arch/torchscript/module, its file and sha256),
class names, data set name and version, image size, mean/std, splits and
counts, torch version and creation time (UTC).

Reading (`SoftLabels.load`) needs only numpy (and `safetensors` for that
format); writing needs the `torch` extra, imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime
import hashlib
import json
import os
import sys
import tempfile
from typing import Any
import warnings

import numpy as np
from absl import flags

from drpl_jax import cli

FORMATS = ('.npz', '.safetensors')
FORMAT_VERSION = 1
_SAFETENSORS_KEY = 'drpl_soft_labels'


def sha256_file(path: str) -> str:
  """The hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def check_output_path(out: str, suffixes: Sequence[str]) -> str:
  """Checks `out`'s suffix and that its folder can be written; returns it.

  Creates the folder if missing. Raises ValueError naming the path when the
  suffix is wrong, and PermissionError when the folder cannot be written.
  """
  out = os.fspath(out)
  if not out.lower().endswith(tuple(suffixes)):
    raise ValueError(f'{out}: output must end in one of {list(suffixes)}')
  folder = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.write_check_'):
      pass
  except OSError as e:
    raise PermissionError(
        f'{out}: cannot write to the folder {folder}: {e.strerror or e}'
    ) from e
  return out


class SoftLabels:
  """Stored teacher logits, looked up by example id (numpy only)."""

  def __init__(
      self,
      ids: Sequence[str],
      logits: np.ndarray,
      splits: Sequence[str],
      metadata: Mapping[str, Any],
      path: str = '<memory>',
  ):
    logits = np.asarray(logits, dtype=np.float32)
    ids = [str(i) for i in ids]
    if logits.ndim != 2 or logits.shape[0] != len(ids):
      raise ValueError(
          f'{path}: logits have shape {logits.shape}, expected '
          f'[{len(ids)}, num_classes] for {len(ids)} ids'
      )
    if len(splits) != len(ids):
      raise ValueError(
          f'{path}: {len(splits)} split entries for {len(ids)} ids'
      )
    self.index = {}
    for row, example_id in enumerate(ids):
      if example_id in self.index:
        raise ValueError(f'{path}: id {example_id!r} appears more than once')
      self.index[example_id] = row
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size:
      raise ValueError(
          f'{path}: {bad.size} rows of logits are not finite, '
          f'e.g. ids {[ids[i] for i in bad[:5]]}'
      )
    self.ids = ids
    self.logits = logits
    self.splits = [str(s) for s in splits]
    self.metadata = dict(metadata)
    self.path = path

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.metadata.get('class_names', ()))

  @property
  def num_classes(self) -> int:
    return int(self.logits.shape[1])

  def __len__(self) -> int:
    return len(self.ids)

  def __contains__(self, example_id: str) -> bool:
    return example_id in self.index

  @classmethod
  def load(
      cls,
      path: str,
      *,
      class_names: Sequence[str],
      expected_ids: Sequence[str] | None = None,
      dataset: tuple[str, str] | None = None,
  ) -> SoftLabels:
    """Reads a soft-label file and checks it fits the data set.

    Args:
      path: a `.npz` or `.safetensors` file written by `write_soft_labels`.
      class_names: the data set's classes, in label order.
      expected_ids: ids the training run will look up (e.g. all ids of the
        train split); every one must be in the file.
      dataset: (name, version) of the data set; the file's must match.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and the problem: unknown format, missing
        entries, a class count or class names that differ from the data
        set's, ids of the data set the file lacks (a few are named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'soft-label file not found: {path}')
    if path.lower().endswith('.npz'):
      ids, logits, splits, metadata = _read_npz(path)
    elif path.lower().endswith('.safetensors'):
      ids, logits, splits, metadata = _read_safetensors(path)
    else:
      raise ValueError(
          f'{path}: unknown soft-label format; expected one of '
          f'{list(FORMATS)}'
      )
    labels = cls(ids, logits, splits, metadata, path)
    if dataset is not None:
      labels.check_dataset(*dataset)
    labels.check_classes(class_names)
    if expected_ids is not None:
      labels.check_ids(expected_ids)
    return labels

  def check_dataset(self, name: str, version: str) -> None:
    """Raises ValueError unless the file was made for data set `name` at
    `version` (as recorded in its metadata)."""
    made = dict(self.metadata.get('dataset') or {})
    if (made.get('name'), str(made.get('version'))) != (name, str(version)):
      raise ValueError(
          f'{self.path}: made for data set {made.get("name")} '
          f'{made.get("version")}, this run trains on {name} {version}; '
          'regenerate it with python -m drpl_jax.soft_labels for this data'
      )

  def check_classes(self, class_names: Sequence[str]) -> None:
    """Raises ValueError unless the file's classes equal `class_names`."""
    class_names = tuple(str(c) for c in class_names)
    if self.num_classes != len(class_names):
      raise ValueError(
          f'{self.path}: the teacher has {self.num_classes} classes '
          f'{list(self.class_names)}, the data set has {len(class_names)} '
          f'{list(class_names)}'
      )
    if self.class_names != class_names:
      raise ValueError(
          f'{self.path}: class names {list(self.class_names)} differ from '
          f"the data set's {list(class_names)} (same order required)"
      )

  def check_ids(self, expected_ids: Sequence[str]) -> None:
    """Raises ValueError naming a few of `expected_ids` that are missing."""
    missing = [i for i in expected_ids if str(i) not in self.index]
    if missing:
      raise ValueError(
          f'{self.path}: {len(missing)} of {len(expected_ids)} ids of the '
          f'data set have no soft label, e.g. {missing[:5]}; regenerate the '
          'file for this data set and split (python -m '
          'drpl_jax.soft_labels --splits ...)'
      )

  def lookup(self, ids: Sequence[str]) -> np.ndarray:
    """The logits of `ids`, float32 [len(ids), C]; KeyError if one is unknown."""
    rows = []
    for example_id in ids:
      key = (
          example_id.decode()
          if isinstance(example_id, bytes)
          else str(example_id)
      )
      if key not in self.index:
        raise KeyError(f'{self.path}: no soft label for id {key!r}')
      rows.append(self.index[key])
    return self.logits[np.asarray(rows, dtype=np.int64)].reshape(
        len(rows), self.num_classes
    )


def _read_npz(path: str) -> tuple[list[str], np.ndarray, list[str], dict]:
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [
          k for k in ('ids', 'logits', 'splits', 'metadata') if k not in f.files
      ]
      if missing:
        raise ValueError(
            f'{path}: not a soft-label file, missing entries '
            f'{missing} (has {f.files})'
        )
      ids = [str(i) for i in f['ids']]
      logits = np.asarray(f['logits'], dtype=np.float32)
      splits = [str(s) for s in f['splits']]
      metadata = json.loads(str(f['metadata']))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable soft-label file: {e}') from e
  return ids, logits, splits, metadata


def _read_safetensors(
    path: str,
) -> tuple[list[str], np.ndarray, list[str], dict]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(path, framework='numpy') as f:
      header = f.metadata() or {}
      if _SAFETENSORS_KEY not in header:
        raise ValueError(
            f'{path}: not a soft-label file, no '
            f'{_SAFETENSORS_KEY!r} metadata entry'
        )
      logits = np.asarray(f.get_tensor('logits'), dtype=np.float32)
      split_index = np.asarray(f.get_tensor('split_index'))
    metadata = json.loads(header[_SAFETENSORS_KEY])
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise ValueError(f'{path}: unreadable soft-label file: {e}') from e
  except Exception as e:  # safetensors raises its own error types.
    if isinstance(e, ValueError):
      raise
    raise ValueError(f'{path}: unreadable soft-label file: {e}') from e
  ids = [str(i) for i in metadata.pop('ids')]
  names = metadata.pop('split_names')
  splits = [names[int(i)] for i in split_index]
  return ids, logits, splits, metadata


def save_soft_labels(
    out: str,
    ids: Sequence[str],
    logits: np.ndarray,
    splits: Sequence[str],
    metadata: Mapping[str, Any],
) -> None:
  """Writes a soft-label file (format by suffix), atomically."""
  logits = np.ascontiguousarray(logits, dtype=np.float32)
  folder = os.path.dirname(os.path.abspath(out))
  suffix = '.npz' if out.lower().endswith('.npz') else '.safetensors'
  fd, tmp = tempfile.mkstemp(dir=folder, prefix='.soft_labels_', suffix=suffix)
  os.close(fd)
  try:
    if suffix == '.npz':
      np.savez(
          tmp,
          ids=np.asarray(ids, dtype=str),
          logits=logits,
          splits=np.asarray(splits, dtype=str),
          metadata=np.asarray(json.dumps(dict(metadata))),
      )
    else:
      import safetensors.numpy  # pylint: disable=g-import-not-at-top

      names = sorted(set(splits))
      split_index = np.asarray([names.index(s) for s in splits], dtype=np.int32)
      header = dict(metadata, ids=list(ids), split_names=names)
      safetensors.numpy.save_file(
          {'logits': logits, 'split_index': split_index},
          tmp,
          metadata={_SAFETENSORS_KEY: json.dumps(header)},
      )
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _metadata(
    teacher: Mapping[str, Any],
    info: Any,
    splits: Sequence[str],
    split_of: Sequence[str],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
  """The metadata entry of a soft-label file."""
  import torch  # pylint: disable=g-import-not-at-top

  return {
      'format_version': FORMAT_VERSION,
      'teacher': dict(teacher),
      'class_names': list(info.class_names),
      'dataset': {'name': info.name, 'version': info.version},
      'splits': list(splits),
      'num_examples': {s: list(split_of).count(s) for s in splits},
      'image_size': image_size,
      'mean': list(mean),
      'std': list(std),
      'preprocessing': 'resize to image_size x image_size (bilinear, '
      'antialiased), scale to [0, 1], (x - mean) / std',
      'torch_version': torch.__version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'
      ),
  }


def write_soft_labels(
    config: Any,
    out: str,
    *,
    arch: str | None = None,
    checkpoint: str | None = None,
    torchscript: str | None = None,
    module: str | None = None,
    splits: Sequence[str] = ('train',),
    batch_size: int = 64,
    image_size: int | None = None,
    num_workers: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
  """Runs a PyTorch teacher over the configured data set; writes its logits.

  Args:
    config: the training config (`config.data.*` picks the data set,
      `config.teacher.{image_size, mean, std}` the input; `teacher.arch` and
      `teacher.checkpoint` are the default teacher).
    out: the `.npz` or `.safetensors` file to write.
    arch, checkpoint: a torchvision architecture and its state dict file.
    torchscript: a TorchScript file (`torch.jit.load`).
    module: 'pkg.mod:callable'; the callable (no arguments) returns the
      `nn.Module`, with its weights loaded.
    splits: the splits to label.
    batch_size: examples per forward pass.
    image_size: the teacher's input size (default config.teacher.image_size).
    num_workers: DataLoader workers.
    device: torch device (default CUDA when available, else CPU).

  Returns:
    The metadata stored in the file.
  """
  from drpl_jax import data  # pylint: disable=g-import-not-at-top
  from drpl_jax.pytorch import torch_data  # pylint: disable=g-import-not-at-top

  out = check_output_path(out, FORMATS)
  splits = list(splits)
  if not splits or len(set(splits)) != len(splits):
    raise ValueError(f'splits must be non-empty and distinct, got {splits}')
  if not (arch or torchscript or module):  # The configured teacher.
    arch = config.teacher.get('arch') or None
    checkpoint = checkpoint or config.teacher.get('checkpoint') or None
  info = data.ensure_prepared(config.data)
  model, teacher = load_teacher(
      arch=arch,
      checkpoint=checkpoint,
      torchscript=torchscript,
      module=module,
      num_classes=len(info.class_names),
  )
  image_size = int(image_size or config.teacher.image_size)
  mean = tuple(float(m) for m in config.teacher.mean)
  std = tuple(float(s) for s in config.teacher.std)
  ids, logits, split_of = [], [], []
  for split in splits:
    source = data.get_source(config.data, split)
    split_ids, split_logits = torch_data.predict(
        model,
        source,
        image_size=image_size,
        mean=mean,
        std=std,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    if split_logits.shape[1] != len(info.class_names):
      raise ValueError(
          f'the teacher ({_describe(teacher)}) gives '
          f'{split_logits.shape[1]} logits, the data set has '
          f'{len(info.class_names)} classes {list(info.class_names)}'
      )
    ids += split_ids
    logits.append(split_logits)
    split_of += [split] * len(split_ids)
    print(f'[soft_labels] {split}: {len(split_ids)} examples', file=sys.stderr)
  metadata = _metadata(teacher, info, splits, split_of, image_size, mean, std)
  all_logits = np.concatenate(logits, axis=0)  # [N, C]
  SoftLabels(ids, all_logits, split_of, metadata, out)  # Validates.
  save_soft_labels(out, ids, all_logits, split_of, metadata)
  return metadata


def _describe(teacher: Mapping[str, Any]) -> str:
  return ', '.join(f'{k}={v}' for k, v in teacher.items() if k != 'sha256')


def _import_callable(spec: str) -> Any:
  """'pkg.mod:callable' -> (the callable, the module's file)."""
  import importlib  # pylint: disable=g-import-not-at-top

  module_name, sep, attr = spec.partition(':')
  if not sep or not module_name or not attr:
    raise ValueError(f'--module {spec!r}: expected the form pkg.mod:callable')
  try:
    mod = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
        f'--module {spec!r}: cannot import {module_name!r}: {e}'
    ) from e
  fn = mod
  for part in attr.split('.'):
    if not hasattr(fn, part):
      raise ValueError(
          f'--module {spec!r}: {module_name!r} has no attribute {attr!r}'
      )
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(f'--module {spec!r}: {attr!r} is not callable')
  return fn, getattr(mod, '__file__', None)


def load_teacher(
    *,
    arch: str | None = None,
    checkpoint: str | None = None,
    torchscript: str | None = None,
    module: str | None = None,
    num_classes: int,
) -> tuple[Any, dict[str, Any]]:
  """Loads the PyTorch teacher given by exactly one of the three ways.

  Returns (the `nn.Module`, its description for the metadata: kind, name,
  file and the file's sha256). `arch` may be any torchvision
  classification model; its `checkpoint` must fit it exactly.
  """
  import torch  # pylint: disable=g-import-not-at-top

  given = [
      n
      for n, v in (
          ('arch', arch),
          ('torchscript', torchscript),
          ('module', module),
      )
      if v
  ]
  if len(given) != 1:
    raise ValueError(
        'give exactly one teacher: --arch NAME --checkpoint '
        'CKPT, --torchscript FILE or --module pkg.mod:callable '
        f'(got {given or "none"}; config.teacher.arch is the '
        'default)'
    )
  if checkpoint and not arch:
    raise ValueError(
        f'--checkpoint {checkpoint} goes with --arch; a '
        f'--{given[0]} teacher carries its own weights'
    )
  if arch:
    from drpl_jax.pytorch import torch_io  # pylint: disable=g-import-not-at-top
    from drpl_jax.pytorch import torchvision_models as tv_models  # pylint: disable=g-import-not-at-top

    if not checkpoint:
      raise ValueError(
          f'--arch {arch} needs --checkpoint (a state dict '
          'file); random weights are no teacher'
      )
    model = tv_models.build_model(arch, num_classes, any_torchvision=True)
    tv_models.load_state(
        model, torch_io.load_state_dict(checkpoint), arch=arch, path=checkpoint
    )
    return model, {
        'kind': 'arch',
        'arch': arch,
        'file': os.path.abspath(checkpoint),
        'sha256': sha256_file(checkpoint),
    }
  if torchscript:
    if not os.path.isfile(torchscript):
      raise FileNotFoundError(f'TorchScript file not found: {torchscript}')
    try:
      with warnings.catch_warnings():  # Deprecated upstream; still works.
        warnings.simplefilter('ignore', FutureWarning)
        model = torch.jit.load(torchscript, map_location='cpu')
    except RuntimeError as e:
      raise ValueError(
          f'{torchscript}: not a TorchScript file: {str(e).splitlines()[0]}'
      ) from e
    return model, {
        'kind': 'torchscript',
        'file': os.path.abspath(torchscript),
        'sha256': sha256_file(torchscript),
    }
  fn, file = _import_callable(module)
  model = fn()
  if not isinstance(model, torch.nn.Module):
    raise ValueError(
        f'--module {module!r} returned a '
        f'{type(model).__name__}, not a torch.nn.Module'
    )
  return model, {
      'kind': 'module',
      'module': module,
      'file': file,
      'sha256': sha256_file(file) if file else None,
  }


def _define_flags() -> None:
  """The CLI flags (defined only when run as a program)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string('out', None, f'Output file, one of {FORMATS}.')
  flags.DEFINE_string('arch', None, 'torchvision arch (with --checkpoint).')
  flags.DEFINE_string('checkpoint', None, 'State dict for --arch.')
  flags.DEFINE_string('torchscript', None, 'TorchScript teacher file.')
  flags.DEFINE_string(
      'module', None, 'pkg.mod:callable returning the nn.Module.'
  )
  flags.DEFINE_list('splits', ['train'], 'Splits to label.')
  cli.define_batch_size(64)
  flags.DEFINE_integer('image_size', 0, '0 = config.teacher.image_size.')
  flags.DEFINE_integer('num_workers', 0, 'DataLoader workers.')
  flags.DEFINE_string('device', None, 'torch device (default cuda if any).')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv: Sequence[str]) -> None:
  """CLI entry: writes the file, prints the metadata as JSON to stdout."""
  del argv  # only flags (cli.run checks)
  f = flags.FLAGS
  metadata = write_soft_labels(
      f.config,
      f.out,
      image_size=f.image_size or None,
      **cli.flag_values(
          'arch',
          'checkpoint',
          'torchscript',
          'module',
          'splits',
          'batch_size',
          'num_workers',
          'device',
      ),
  )
  print(json.dumps(dict(metadata, out=os.path.abspath(f.out))))


def run() -> None:
  """The command line: defines the flags, then runs `main` under the exit
  policy of drpl_jax/cli.py (bad input, a ValueError or OSError: exit 2)."""
  _define_flags()
  cli.run(main, (ValueError, OSError), positional=False)
