"""Maps torchvision state dicts onto the Flax teachers.

The Flax modules mirror torchvision's module names, so the mapping is
mechanical: the module path `layer1/0/conv1` plus the Flax variable name
gives the state-dict key `layer1.0.conv1.<torch name>`:

  Conv       kernel [kh, kw, in/groups, out] <- weight [out, in/groups, kh, kw]
             bias                            <- bias
  Linear     kernel [in, out]                <- weight [out, in]
  BatchNorm  scale, bias, mean, var          <- weight, bias, running_mean,
                                                running_var

Every tensor is shape-checked; every checkpoint key must be consumed or be a
`num_batches_tracked` counter (ignored); anything else is one error that
names all the problems. This module needs no torch: the state dict is numpy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from drpl_jax.teacher.archs import Teacher, arch_spec
from drpl_jax.teacher.densenet import DenseNetSpec

IGNORED_SUFFIXES = ('num_batches_tracked',)

_CONV_NAMES = {'kernel': 'weight', 'bias': 'bias'}
_BN_NAMES = {
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
}

# torchvision's own fix-up for DenseNet checkpoints saved before PyTorch 0.4
# ('denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'); the weights
# that torchvision downloads still use the old names. Also covers
# num_batches_tracked, which such a model gains when re-saved.
_DENSENET_LEGACY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
    r'((?:[12])\.(?:weight|bias|running_mean|running_var|'
    r'num_batches_tracked))$'
)


class _Target:
  """One Flax variable and how its torch tensor is laid out."""

  def __init__(self, var: nnx.Variable, layout: str):
    self.var = var
    self.layout = layout  # 'conv', 'linear' or 'plain'.

  @property
  def flax_shape(self) -> tuple[int, ...]:
    return tuple(self.var.get_value().shape)

  @property
  def torch_shape(self) -> tuple[int, ...]:
    shape = self.flax_shape
    if self.layout == 'conv':
      kh, kw, cin, cout = shape
      return (cout, cin, kh, kw)
    if self.layout == 'linear':
      return shape[::-1]
    return shape

  def to_flax(self, array: np.ndarray) -> np.ndarray:
    if self.layout == 'conv':
      return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if self.layout == 'linear':
      return np.transpose(array)  # [out, in] -> [in, out]
    return array


def _targets(module: nnx.Module) -> dict[str, _Target]:
  """torch state-dict key -> Flax variable, for every variable of `module`."""
  targets = {}
  for path, node in nnx.iter_modules(module):
    if isinstance(node, nnx.Conv):
      names, layout = _CONV_NAMES, 'conv'
    elif isinstance(node, nnx.Linear):
      names, layout = _CONV_NAMES, 'linear'
    elif isinstance(node, nnx.BatchNorm):
      names, layout = _BN_NAMES, 'plain'
    else:
      continue
    prefix = '.'.join(str(p) for p in path)
    for flax_name, torch_name in names.items():
      var = getattr(node, flax_name, None)
      if var is None:  # e.g. a conv without bias.
        continue
      kind = 'plain' if flax_name != 'kernel' else layout
      targets[f'{prefix}.{torch_name}'] = _Target(var, kind)
  num_vars = len(nnx.to_flat_state(nnx.state(module)))
  if num_vars != len(targets):
    raise RuntimeError(
        f'{type(module).__name__} has {num_vars} variables but only '
        f'{len(targets)} map to torchvision names; the module has a layer '
        'type the converter does not know'
    )
  return targets


def torch_key_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The torchvision state-dict keys and (torch-layout) shapes `module` needs.

  Works on abstract modules (`nnx.eval_shape`), so the biggest teachers can
  be checked against torchvision without allocating their weights.
  """
  return {k: t.torch_shape for k, t in _targets(module).items()}


def canonical_state_dict(
    state_dict: Mapping[str, np.ndarray], arch: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Renames legacy keys as torchvision does; returns (state, renames)."""
  spec = arch_spec(arch)
  out, renamed = {}, {}
  for key, value in state_dict.items():
    new = key
    if isinstance(spec, DenseNetSpec):
      m = _DENSENET_LEGACY.match(key)
      if m:
        new = m.group(1) + m.group(2)
        renamed[key] = new
    if new in out:
      raise ValueError(f'state dict has both {key!r} and its new name {new!r}')
    out[new] = value
  return out, renamed


def _check_module_arch(module: nnx.Module, arch: str) -> None:
  arch_spec(arch)
  if getattr(module, 'arch', None) != arch:
    raise ValueError(
        f'module is a {type(module).__name__} built for '
        f'{getattr(module, "arch", None)!r}, not for arch {arch!r}'
    )


def _problems(
    state: Mapping[str, np.ndarray], targets: Mapping[str, _Target]
) -> list[str]:
  """Every missing, unexpected, mis-shaped or non-float entry, as text."""
  problems = []
  missing = sorted(k for k in targets if k not in state)
  unexpected = sorted(
      k for k in state if k not in targets and not k.endswith(IGNORED_SUFFIXES)
  )
  if missing:
    problems.append(f'missing keys ({len(missing)}): {missing}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {unexpected}')
  for key, target in targets.items():
    if key not in state:
      continue
    value = state[key]
    shape = tuple(np.shape(value))
    if shape != target.torch_shape:
      problems.append(
          f'shape mismatch for {key!r}: checkpoint {shape} vs model '
          f'{target.torch_shape} (torch layout)'
      )
    elif not jnp.issubdtype(np.asarray(value).dtype, jnp.floating):
      problems.append(
          f'{key!r} has dtype {np.asarray(value).dtype}, expected a float'
      )
  return problems


def load_torch_weights(
    module: Teacher,
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[str] | dict[str, str]]:
  """Copies a torchvision state dict (numpy arrays) into a Flax teacher.

  `module` may be concrete or abstract (`nnx.eval_shape`); either way every
  variable is overwritten. Nothing is written unless the whole state dict
  matches. Returns {'consumed': keys used, 'ignored': keys skipped
  (num_batches_tracked), 'renamed': legacy key -> new key}.
  """
  _check_module_arch(module, arch)
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        f'state_dict must be a mapping str -> array, got {type(state_dict)}'
    )
  state, renamed = canonical_state_dict(state_dict, arch)
  targets = _targets(module)
  problems = _problems(state, targets)
  if problems:
    shown = problems[:5] + (
        [f'... and {len(problems) - 5} more'] if len(problems) > 5 else []
    )
    raise ValueError(
        f'cannot load the state dict into {arch} ({len(problems)} '
        'mismatches; is it another architecture?):\n  - ' + '\n  - '.join(shown)
    )
  for key, target in targets.items():
    dtype = target.var.get_value().dtype
    value = target.to_flax(np.asarray(state[key]))
    target.var.set_value(jnp.asarray(value, dtype=dtype))
  ignored = sorted(k for k in state if k.endswith(IGNORED_SUFFIXES))
  if log is not None:
    log(
        f'{arch}: loaded {len(targets)} tensors, ignored {len(ignored)}, '
        f'renamed {len(renamed)} legacy keys'
    )
  return {'consumed': sorted(targets), 'ignored': ignored, 'renamed': renamed}


def random_state_dict(
    module: nnx.Module, seed: int = 0
) -> dict[str, np.ndarray]:
  """A random torchvision-layout state dict for `module`, drawn with numpy.

  torchvision's initialisation: conv weights Kaiming-normal (fan_out, ReLU
  gain), linear weights U(-1/sqrt(in), 1/sqrt(in)), biases 0, BatchNorm
  scale 1, shift 0, running mean 0 and variance 1. Works on abstract
  modules, so a random teacher needs no (slow, traced) Flax init.
  """
  rng = np.random.default_rng(seed)
  state = {}
  for key, target in _targets(module).items():
    shape = target.torch_shape
    if target.layout == 'conv':
      fan_out = shape[0] * shape[2] * shape[3]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
    elif target.layout == 'linear':
      bound = 1.0 / np.sqrt(shape[1])
      value = rng.uniform(-bound, bound, shape)
    elif key.endswith(('.running_var', '.weight')):  # BN scale and variance.
      value = np.ones(shape)
    else:  # Biases and running means.
      value = np.zeros(shape)
    state[key] = value.astype(np.float32)
  return state
