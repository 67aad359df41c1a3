"""Pure, jit-able train and eval steps over a plain-pytree train state.

The NNX model is split once (`nnx.split`) into a static graphdef and state
pytrees; the steps `nnx.merge` inside. Nothing here imports TensorFlow, TFDS
or clu, so the step runs (and is benchmarked) on bare accelerator machines.

Train state (`TrainState` of drpl_jax/train/state.py, a pytree dataclass):
  step       int32 []           number of updates applied
  rng        uint32 [2]         base key; step keys are fold_in(rng, step)
  params     nnx.State          trainable parameters (nnx.Param)
  rest       nnx.State          BatchNorm statistics and other variables
  opt_state  optax state
  ema        nnx.State | None   EMA of params (when optim.ema_decay > 0)
  nonfinite  int32 []           updates skipped for a non-finite loss/grad

Precision: the model computes in `model.dtype` (e.g. bfloat16) while
parameters, gradients and updates stay in `model.param_dtype` (float32
master weights); `optim.mu_dtype` may store Adam's first moment in bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from drpl_jax.config import contract
from drpl_jax.train import losses
from drpl_jax.train import mixup as mixup_lib

State = Any  # drpl_jax.train.state.TrainState (imported there, not here)
# (params, rest, inputs, drop_key) -> (grads, rest, metrics) of one batch.
GradsFn = Callable[
    [Any, Any, dict[str, jax.Array], jax.Array], tuple[Any, Any, dict]
]


NONFINITE_MODES = ('skip', 'stop')
_key = contract.bound


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepConfig:
  """The static (hashable) settings a step needs; built from the config.

  Each field is read from the config key beside it (`contract.bound`); the
  keys with a default here (`loss.*`, `distill.*`, `mixup.*`, `nonfinite`)
  are generated into the config from this class (`contract.place`), the
  others belong to the model, data and optimizer sections.
  """

  num_classes: int = _key('model.num_classes')
  distilled: bool = _key('model.distilled')
  mean: tuple[float, ...] = _key('data.mean')
  std: tuple[float, ...] = _key('data.std')
  label_smoothing: float = _key('loss.label_smoothing', 0.0)
  # '' or one comma separated weight per class in the config.
  class_weights: tuple[float, ...] | None = _key(
      'loss.class_weights', None, stored=''
  )
  distill_kind: str = _key('distill.kind', 'none')
  distill_alpha: float = _key('distill.alpha', 0.5)
  distill_tau: float = _key('distill.tau', 1.0)
  mixup_alpha: float = _key('mixup.mixup_alpha', 0.0)
  cutmix_alpha: float = _key('mixup.cutmix_alpha', 0.0)
  mixup_prob: float = _key('mixup.prob', 1.0)
  mixup_switch_prob: float = _key('mixup.switch_prob', 0.5)
  ema_decay: float = _key('optim.ema_decay')
  # config.nonfinite: 'skip' the update of a non-finite loss/grad, or 'stop'.
  skip_nonfinite: bool = _key('nonfinite', True, stored='skip')
  grad_accum_steps: int = _key('optim.grad_accum_steps')

  @classmethod
  def from_config(cls, config, model_cfg) -> StepConfig:
    """The step settings of `config`; classes and heads from `model_cfg`."""
    values = contract.read_bound(cls, config)
    values.update(
        num_classes=model_cfg.num_classes,
        distilled=model_cfg.distilled,
        class_weights=parse_class_weights(
            values['class_weights'], model_cfg.num_classes
        ),
        distill_kind=(
            values['distill_kind'] if model_cfg.distilled else 'none'
        ),
        skip_nonfinite=_nonfinite_mode(values['skip_nonfinite']) == 'skip',
        grad_accum_steps=_grad_accum_steps(
            values['grad_accum_steps'], config.get('batch_size')
        ),
    )
    return cls(**values)


def _nonfinite_mode(mode: str) -> str:
  if mode not in NONFINITE_MODES:
    raise ValueError(
        f'config.nonfinite={mode!r} is not one of {list(NONFINITE_MODES)}'
    )
  return mode


def _grad_accum_steps(k: int, batch: int | None) -> int:
  k = int(k)
  if k < 1:
    raise ValueError(f'config.optim.grad_accum_steps={k} must be >= 1')
  if batch is not None and batch % k:
    raise ValueError(
        f'config.batch_size={batch} is not divisible by '
        f'config.optim.grad_accum_steps={k}'
    )
  return k


def parse_class_weights(
    spec: str, num_classes: int
) -> tuple[float, ...] | None:
  """'' -> None; '1,2.5,1,4' -> one weight per class (error names the spec)."""
  if not spec:
    return None
  try:
    weights = tuple(float(w) for w in str(spec).split(','))
  except ValueError as e:
    raise ValueError(
        f'config.loss.class_weights={spec!r}: not a comma '
        'separated list of numbers'
    ) from e
  if len(weights) != num_classes or min(weights) <= 0:
    raise ValueError(
        f'config.loss.class_weights={spec!r}: need '
        f'{num_classes} positive weights, one per class'
    )
  return weights


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 or [0, 1] float images -> (x - mean) / std, float32."""
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _to_unit(images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32)
  return x / 255.0 if images.dtype == jnp.uint8 else x


def _heads(outputs) -> tuple[jax.Array, jax.Array | None]:
  if isinstance(outputs, (tuple, list)):
    return outputs[0], outputs[1]
  return outputs, None


def step_inputs(
    cfg: StepConfig,
    state: State,
    batch: dict[str, jax.Array],
    teacher_graphdef: nnx.GraphDef | None = None,
    teacher_state: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
  """What the student and the teacher see at this step.

  Returns ([0, 1] images after mixup/cutmix [B, H, W, 3], soft targets
  [B, C], teacher logits [B, C] or None, the dropout key). The online teacher
  runs on exactly the mixed images the student gets (consistent teaching),
  or, where the batch has a 'teacher_image' (`augment.teacher_view='crop'`:
  the same crop before RandAugment and erasing), on that view mixed the
  same way; offline logits come from the batch ('teacher_logits').
  """
  key = jax.random.fold_in(state.rng, state.step)
  mix_key, drop_key = jax.random.split(key)
  onehot = jax.nn.one_hot(batch['label'], cfg.num_classes)

  def mixed(name: str) -> tuple[jax.Array, jax.Array]:
    # The same key: the same lambda, pairs and box for every view.
    images = _to_unit(batch[name])  # [B, H, W, 3] in [0, 1]
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
      return images, onehot
    return mixup_lib.mixup_cutmix(
        mix_key,
        images,
        onehot,
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
    )

  images, targets = mixed('image')
  teacher_logits = batch.get('teacher_logits')
  if teacher_graphdef is not None:
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    seen = mixed('teacher_image')[0] if 'teacher_image' in batch else images
    teacher_logits = jax.lax.stop_gradient(teacher(seen))
  return images, targets, teacher_logits, drop_key


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    schedule: optax.Schedule,
    teacher_graphdef: nnx.GraphDef | None = None,
) -> Callable[..., tuple[State, dict[str, jax.Array]]]:
  """Returns `step(state, batch, teacher_state=None) -> (state, metrics)`.

  batch: {'image': uint8 [B, H, W, 3], 'label': int32 [B]} plus optionally
  'teacher_logits' [B, C] (offline soft labels). With `teacher_graphdef`, the
  teacher (an NNX module taking [0, 1] images) runs on the same augmented,
  mixed batch as the student, under stop_gradient.

  With `cfg.grad_accum_steps = K > 1`, mixup and the teacher see the whole
  batch first; then K micro-batches of B / K (examples i, i + K, ...: each
  spread over all devices when the per-device batch is a multiple of K)
  run forward and backward one after another in a
  `lax.scan`, their gradients averaged, and one update is applied. The
  result equals the large-batch step up to float rounding when nothing
  depends on the batch composition (LayerNorm, not BatchNorm; no class
  weights, whose normaliser is per micro-batch; dropout and drop path draw
  a key per micro-batch).
  """
  grads_fn = functools.partial(_grads_and_metrics, graphdef, cfg)
  if cfg.grad_accum_steps != 1:
    grads_fn = _accumulated(grads_fn, cfg.grad_accum_steps)

  def step(
      state: State, batch: dict[str, jax.Array], teacher_state: Any = None
  ):
    images, targets, teacher_logits, drop_key = step_inputs(
        cfg, state, batch, teacher_graphdef, teacher_state
    )
    inputs = {
        'x': normalize(images, cfg.mean, cfg.std),
        'targets': targets,
        'labels': batch['label'],
    }
    if teacher_logits is not None:
      inputs['teacher_logits'] = teacher_logits
    grads, rest, metrics = grads_fn(state.params, state.rest, inputs, drop_key)
    return _apply(tx, cfg, schedule, state, grads, rest, metrics)

  return step


def _grads_and_metrics(
    graphdef: nnx.GraphDef,
    cfg: StepConfig,
    params: Any,
    rest: Any,
    inputs: dict[str, jax.Array],
    drop_key: jax.Array,
) -> tuple[Any, Any, dict]:
  """Loss gradients, updated non-Param variables and metrics of a batch."""
  weights = (
      None
      if cfg.class_weights is None
      else jnp.asarray(cfg.class_weights, jnp.float32)
  )
  teacher_logits = inputs.get('teacher_logits')

  def loss_fn(params, rest):
    # Rebuild the Variables of `rest` at this trace level so BatchNorm
    # may update them (Variables made outside grad are read-only here).
    rest = jax.tree.map(lambda v: v, rest)
    model = nnx.merge(graphdef, params, rest)
    outputs = model(inputs['x'], train=True, rngs=nnx.Rngs(dropout=drop_key))
    loss, aux = losses.total_loss(
        outputs,
        inputs['targets'],
        teacher_logits,
        distill_kind=cfg.distill_kind,
        alpha=cfg.distill_alpha,
        tau=cfg.distill_tau,
        label_smoothing=cfg.label_smoothing,
        class_weights=weights,
    )
    rest = nnx.state(model, nnx.Not(nnx.Param))
    return loss, (aux, rest, outputs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (aux, rest, outputs)), grads = grad_fn(params, rest)
  metrics = train_metrics(
      outputs, inputs['labels'], inputs['targets'], teacher_logits, aux
  )
  return grads, rest, metrics


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [K, B / K, ...]; micro-batch i holds examples i, i + K, ..."""
  if x.shape[0] % k:
    raise ValueError(
        f'batch of {x.shape[0]} is not divisible by '
        f'config.optim.grad_accum_steps={k}'
    )
  x = x.reshape((x.shape[0] // k, k) + x.shape[1:])  # [B / K, K, ...]
  return jnp.swapaxes(x, 0, 1)  # [K, B / K, ...]


def _accumulated(one: GradsFn, k: int) -> GradsFn:
  """`one` averaged over K micro-batches of its batch (a lax.scan).

  The result takes and returns what `one` does: mean gradients and metrics,
  and the non-Param variables after the last micro-batch.
  """

  def accumulated(params, rest, inputs, drop_key):
    micro = jax.tree.map(lambda x: _micro_batches(x, k), inputs)

    def body(carry, xs):
      grad_sum, rest = carry
      batch, i = xs
      grads, rest, metrics = one(
          params, rest, batch, jax.random.fold_in(drop_key, i)
      )
      return (jax.tree.map(jnp.add, grad_sum, grads), rest), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, rest), metrics = jax.lax.scan(
        body, (zeros, rest), (micro, jnp.arange(k))
    )
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return grads, rest, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  return accumulated


def _apply(
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    schedule: optax.Schedule,
    state: State,
    grads: Any,
    rest: Any,
    metrics: dict[str, jax.Array],
) -> tuple[State, dict[str, jax.Array]]:
  """One optimizer update; a non-finite loss or gradient skips it (or not)."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
  if cfg.skip_nonfinite:
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old
    )
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    rest = keep(rest, state.rest)
  nonfinite = state.nonfinite + (~finite).astype(jnp.int32)
  ema = state.ema
  if ema is not None:
    d = cfg.ema_decay
    ema = jax.tree.map(
        lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e), ema, params
    )
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      rest=rest,
      opt_state=opt_state,
      ema=ema,
      nonfinite=nonfinite,
  )
  metrics = dict(
      metrics,
      grad_norm=grad_norm,
      learning_rate=schedule(state.step),
      nonfinite=nonfinite,
      finite=finite.astype(jnp.float32),
  )
  metrics.update(rpe_table_norms(params))
  return new_state, metrics


_RPE_TABLE = re.compile(r'^blocks\.(\d+)\..*\brpe_(q|k|v|bias)\.')


def rpe_table_norms(params: Any) -> dict[str, jax.Array]:
  """L2 norms of the relative position tables, to watch them train.

  'rpe_norm_block{i}': the norm of all of block i's RPE parameters together
  (iRPE q/k/v tables, or the bias table and its prefix entries);
  'rpe_norm': their mean over blocks. Empty for a model without RPE.
  """
  from drpl_jax.train.optim import path_str  # pylint: disable=g-import-not-at-top

  squares: dict[int, jax.Array] = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    match = _RPE_TABLE.match(path_str(path))
    if match:
      i = int(match.group(1))
      sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
      squares[i] = squares[i] + sq if i in squares else sq
  if not squares:
    return {}
  norms = {
      f'rpe_norm_block{i}': jnp.sqrt(v) for i, v in sorted(squares.items())
  }
  norms['rpe_norm'] = jnp.mean(jnp.stack(list(norms.values())))
  return norms


def train_metrics(
    outputs,
    labels: jax.Array,
    targets: jax.Array,
    teacher_logits: jax.Array | None,
    aux: dict[str, jax.Array],
) -> dict[str, jax.Array]:
  """Per-batch training metrics, all on the augmented, mixed batch.

  accuracy_cls / accuracy_dist: each head's argmax against the batch labels
  (the unmixed label of each image).
  With a teacher (online or offline logits):
    teacher_accuracy       the teacher's argmax against argmax of the soft
                           target (after mixup/cutmix, the dominant of the
                           two mixed labels; without mixup, the label);
    teacher_accuracy_label the teacher's argmax against the batch labels;
    teacher_agreement_cls / _dist
                           fraction of images where that student head's
                           argmax equals the teacher's;
    teacher_agreement      the distillation head's (class head's for a
                           model without one).
  """
  cls_logits, dist_logits = _heads(outputs)
  metrics = {k: v for k, v in aux.items()}
  metrics['accuracy_cls'] = jnp.mean(jnp.argmax(cls_logits, -1) == labels)
  if dist_logits is not None:
    metrics['accuracy_dist'] = jnp.mean(jnp.argmax(dist_logits, -1) == labels)
  if teacher_logits is not None:
    teacher_pred = jnp.argmax(teacher_logits, -1)
    metrics['teacher_accuracy'] = jnp.mean(
        teacher_pred == jnp.argmax(targets, -1)
    )
    metrics['teacher_accuracy_label'] = jnp.mean(teacher_pred == labels)
    agree = lambda logits: jnp.mean(jnp.argmax(logits, -1) == teacher_pred)
    metrics['teacher_agreement_cls'] = agree(cls_logits)
    if dist_logits is not None:
      metrics['teacher_agreement_dist'] = agree(dist_logits)
    metrics['teacher_agreement'] = agree(
        dist_logits if dist_logits is not None else cls_logits
    )
  return metrics


def make_eval_step(
    graphdef: nnx.GraphDef, cfg: StepConfig
) -> Callable[..., dict[str, jax.Array]]:
  """Returns `eval_step(params, rest, batch) -> per-example logits per head`.

  Output: {'mean': [B, C]} and, for a distilled model, {'cls', 'dist'}.
  """

  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    x = normalize(batch['image'], cfg.mean, cfg.std)
    if not cfg.distilled:
      return {'mean': model(x, train=False).astype(jnp.float32)}
    cls_logits, dist_logits = model.heads(x)
    return {
        'cls': cls_logits,
        'dist': dist_logits,
        'mean': (cls_logits + dist_logits) / 2,
    }

  return eval_step
