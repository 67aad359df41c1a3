"""The one builder of a run: model, mesh, state, shardings and jitted steps.

Training, evaluation, prediction, export and the benchmarks all start here:

  build(config)            -> `Setup` for training: model config, mesh,
                              optimizer, the train state created straight
                              into its shardings, step config, and the
                              jitted train/eval steps (`Setup.train_step`,
                              `Setup.eval_step`).
  build_inference(config)  -> `InferenceSetup`: the same model, mesh and
                              eval step, with an abstract `InferenceState`
                              (params, rest, EMA) and no optimizer; its
                              `restore(workdir, step)` reads only those parts
                              of a checkpoint.

`TrainState` is the typed train state (a `flax.struct.dataclass`, so a
pytree the jitted steps take and return). On disk it is the plain dict of
its fields that earlier versions saved (`to_dict` / `from_dict`), so old
checkpoints still restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from drpl_jax.models import ModelConfig, create_model
from drpl_jax.parallel import sharding
from drpl_jax.train import step as step_lib

# The fields inference needs; the rest of a checkpoint is never read by it.
INFERENCE_FIELDS = ('params', 'rest', 'ema')


@flax.struct.dataclass
class TrainState:
  """The train state (see drpl_jax/train/step.py for each field)."""

  step: jax.Array  # int32 [], updates applied
  rng: jax.Array  # uint32 [2], base key; step keys fold in the step
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of everything else (BatchNorm statistics)
  opt_state: Any  # optax state
  ema: Any  # nnx.State (EMA of params) or None
  nonfinite: jax.Array  # int32 [], updates skipped as non-finite

  def to_dict(self) -> dict[str, Any]:
    """The checkpoint tree: a dict keyed by field name."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def fresh(
      cls, params: Any, rest: Any, tx: Any, rng: jax.Array, *, ema: bool = False
  ) -> TrainState:
    """Step 0: the optimizer initialised on `params`, EMA starting there."""
    return cls(
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        ema=params if ema else None,
        nonfinite=jnp.zeros((), jnp.int32),
    )

  @classmethod
  def from_dict(cls, tree: dict[str, Any]) -> TrainState:
    """The inverse of `to_dict`; names missing or unknown keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in tree]
    extra = [k for k in tree if k not in names]
    if missing or extra:
      raise ValueError(f'train state tree: missing {missing}, unknown {extra}')
    return cls(**{n: tree[n] for n in names})


@flax.struct.dataclass
class InferenceState:
  """What inference restores: the weights, model state and EMA weights."""

  params: Any
  rest: Any
  ema: Any  # None when the run kept no EMA

  def weights(self, key: str) -> Any:
    """'params' or 'ema' -> those weights (ValueError if absent)."""
    if key not in ('params', 'ema'):
      raise ValueError(f'weights {key!r}: expected params or ema')
    value = getattr(self, key)
    if value is None:
      raise ValueError(f'the checkpoint has no {key} weights')
    return value

  def to_dict(self) -> dict[str, Any]:
    return {n: getattr(self, n) for n in INFERENCE_FIELDS}


@dataclasses.dataclass(frozen=True)
class OnlineTeacher:
  """A converted teacher placed on the mesh (never trained, never saved)."""

  graphdef: nnx.GraphDef
  state: Any
  shardings: Any
  description: str


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  """The typed model config of `config.model`."""
  return ModelConfig.from_config(config.model)


def abstract_model(model_cfg: ModelConfig) -> nnx.Module:
  """The model with shapes only (nothing initialised)."""
  return nnx.eval_shape(lambda: create_model(model_cfg, rngs=nnx.Rngs(0)))


def create_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh_shape` (default all data)."""
  return sharding.create_mesh(tuple(config.get('mesh_shape', (-1, 1))))


def create_train_state(
    config: ml_collections.ConfigDict,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Initialises the train state directly into its shardings.

  Returns (graphdef, state, shardings); `shardings` is a TrainState of
  NamedShardings.
  """
  graphdef, _, _ = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
  use_ema = config.optim.ema_decay > 0

  def init() -> TrainState:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    model = create_model(model_cfg, rngs=nnx.Rngs(init_rng))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return TrainState.fresh(params, rest, tx, step_rng, ema=use_ema)

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_inference_state(
    model_cfg: ModelConfig, mesh: Mesh, use_ema: bool
) -> tuple[nnx.GraphDef, InferenceState, InferenceState]:
  """(graphdef, abstract InferenceState, its shardings); no optimizer."""
  graphdef, params, rest = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
  to_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  params = jax.tree.map(to_struct, params)
  rest = jax.tree.map(to_struct, rest)
  abstract = InferenceState(
      params=params, rest=rest, ema=params if use_ema else None
  )
  return graphdef, abstract, sharding.state_shardings(abstract, mesh)


def jit_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    step_cfg: step_lib.StepConfig,
    schedule: optax.Schedule,
    state_shardings: TrainState,
    mesh: Mesh,
    teacher: OnlineTeacher | None = None,
):
  """`step(state, batch, teacher_state)` jitted with shardings + donation."""
  step = step_lib.make_train_step(
      graphdef,
      tx,
      step_cfg,
      schedule,
      teacher_graphdef=teacher.graphdef if teacher else None,
  )
  batch_sh = sharding.batch_sharding(mesh)
  teacher_sh = teacher.shardings if teacher else None
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sh, teacher_sh),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )


def jit_eval_step(
    graphdef: nnx.GraphDef,
    step_cfg: step_lib.StepConfig,
    state_shardings: TrainState | InferenceState,
    mesh: Mesh,
):
  """`eval_step(params, rest, batch) -> logits per head`, jitted."""
  step = step_lib.make_eval_step(graphdef, step_cfg)
  return jax.jit(
      step,
      in_shardings=(
          state_shardings.params,
          state_shardings.rest,
          sharding.batch_sharding(mesh),
      ),
      out_shardings=sharding.batch_sharding(mesh),
  )


@dataclasses.dataclass
class Setup:
  """Everything a training step needs, built once by `build`."""

  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state: TrainState
  shardings: TrainState
  step_cfg: step_lib.StepConfig

  def train_step(self, teacher: OnlineTeacher | None = None):
    """The jitted, donating train step (with an online teacher if given)."""
    return jit_train_step(
        self.graphdef,
        self.tx,
        self.step_cfg,
        self.schedule,
        self.shardings,
        self.mesh,
        teacher,
    )

  def eval_step(self):
    """The jitted eval step: (params, rest, batch) -> logits per head."""
    return jit_eval_step(
        self.graphdef, self.step_cfg, self.shardings, self.mesh
    )


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Model config, mesh, optimizer, sharded train state and step config."""
  from drpl_jax.train import optim  # pylint: disable=g-import-not-at-top

  model_cfg = model_config_from(config)
  mesh = create_mesh(config) if mesh is None else mesh
  tx, schedule = optim.create_optimizer(
      optim.OptimConfig.from_config(config.optim),
      config.batch_size,
      config.total_steps,
      model_cfg.depth,
  )
  graphdef, state, shardings = create_train_state(config, model_cfg, tx, mesh)
  step_cfg = step_lib.StepConfig.from_config(config, model_cfg)
  return Setup(
      config,
      model_cfg,
      mesh,
      graphdef,
      tx,
      schedule,
      state,
      shardings,
      step_cfg,
  )


@dataclasses.dataclass
class InferenceSetup:
  """A model for inference: abstract weights until `restore` fills them."""

  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  state: InferenceState  # abstract until restored
  shardings: InferenceState
  step_cfg: step_lib.StepConfig

  def eval_step(self):
    """The jitted eval step: (params, rest, batch) -> logits per head."""
    return jit_eval_step(
        self.graphdef, self.step_cfg, self.shardings, self.mesh
    )

  def restore(
      self, workdir: str, step: int | None = None
  ) -> tuple[int, InferenceState]:
    """Reads params, rest and EMA of checkpoint `step` (default the latest
    complete one) in `workdir`; never the optimizer state.

    Raises FileNotFoundError / IncompleteCheckpointError (see
    `Checkpointer.restore_for_inference`) and ValueError for another model.
    """
    from drpl_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

    ckpt = checkpointing.Checkpointer(workdir)
    try:
      step, tree = ckpt.restore_for_inference(
          step, self.state.to_dict(), self.shardings.to_dict()
      )
    finally:
      ckpt.close()
    return step, InferenceState(**tree)


def build_inference(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None
) -> InferenceSetup:
  """The model, mesh and eval step of `config`, with no optimizer."""
  model_cfg = model_config_from(config)
  mesh = create_mesh(config) if mesh is None else mesh
  graphdef, abstract, shardings = abstract_inference_state(
      model_cfg, mesh, use_ema=config.optim.ema_decay > 0
  )
  step_cfg = step_lib.StepConfig.from_config(config, model_cfg)
  return InferenceSetup(
      config, model_cfg, mesh, graphdef, abstract, shardings, step_cfg
  )
