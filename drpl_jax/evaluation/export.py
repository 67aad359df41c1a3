r"""Serialises a trained DRPL-ViT for serving: StableHLO and TF SavedModel.

  python -m drpl_jax.export --workdir=DIR --out PATH [--step N] \
      [--format stablehlo|savedmodel|both] [--input_dtype uint8|float32] \
      [--ema] [--platforms cpu,cuda,tpu]

The exported function is the whole inference: images [b, S, S, 3] ->
class probabilities [b, C] (softmax of the mean of both heads' logits),
with the input normalisation (config.data.mean/std) inside and the model in
eval mode. The batch dimension is symbolic (`b`), so one artifact serves
every batch size. Images are uint8 in [0, 255] (default) or float32 in
[0, 1] (`--input_dtype float32`); the eval resize + centre crop to S is not
included (see `drpl_jax.evaluation.predict.preprocess`).

Written under PATH:
  model.stablehlo   `jax.export` serialized bytes (weights embedded);
                    reload with `load_stablehlo(PATH)` or
                    `jax.export.deserialize`.
  metadata.json     class names, image size, mean/std, input dtype, output,
                    checkpoint step, config hash, platforms, files.
  savedmodel/       (format savedmodel) a TF SavedModel made with
                    `jax2tf.convert`, weights as tf.Variables; signature
                    `serving_default(images) -> {'probabilities'}`.

TensorFlow is imported only when the savedmodel format is requested, and is
kept off any GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from etils import epath
from flax import nnx

from drpl_jax import cli
from drpl_jax.evaluation import evaluate
from drpl_jax.evaluation import predict
from drpl_jax.models import fence
from drpl_jax.train import checkpointing
from drpl_jax.train import step as step_lib
from drpl_jax.utils import files as file_io

FORMATS = ('stablehlo', 'savedmodel')
INPUT_DTYPES = {'uint8': jnp.uint8, 'float32': jnp.float32}
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
STABLEHLO_FILE = 'model.stablehlo'
METADATA_FILE = 'metadata.json'
SAVEDMODEL_DIR = 'savedmodel'


def probabilities_fn(
    graphdef: nnx.GraphDef, mean: Sequence[float], std: Sequence[float]
) -> Callable[..., jax.Array]:
  """`fn(params, rest, images) -> probabilities [B, C]`, eval mode."""
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

  def fn(params, rest, images):
    model = nnx.merge(graphdef, params, rest)
    x = step_lib.normalize(images, mean, std)
    with fence.off():  # a portable program: no XLA:CPU fusion fences
      return jax.nn.softmax(model(x, train=False), axis=-1)  # [B, C]

  return fn


def _input_spec(image_size: int, input_dtype: str) -> jax.ShapeDtypeStruct:
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(
        f'input_dtype={input_dtype!r} is not one of {list(INPUT_DTYPES)}'
    )
  shape = jax.export.symbolic_shape(f'b, {image_size}, {image_size}, 3')
  return jax.ShapeDtypeStruct(shape, INPUT_DTYPES[input_dtype])


def export_stablehlo(
    restored: predict.RestoredModel,
    *,
    input_dtype: str = 'uint8',
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
  """`jax.export` of the inference function, batch dimension symbolic."""
  cfg = restored.config
  fn = probabilities_fn(restored.graphdef, cfg.data.mean, cfg.data.std)
  params = jax.device_get(restored.params)
  rest = jax.device_get(restored.rest)
  spec = _input_spec(int(cfg.data.image_size), input_dtype)
  try:
    return jax.export.export(
        jax.jit(lambda images: fn(params, rest, images)),
        platforms=tuple(platforms),
    )(spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'cannot export for platforms {tuple(platforms)}: '
        f'{type(e).__name__}: {e}'
    ) from e


def save_savedmodel(
    restored: predict.RestoredModel,
    out_dir: str,
    *,
    input_dtype: str = 'uint8',
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> None:
  """Writes a TF SavedModel of the inference function (jax2tf)."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # devices already initialised by the caller
    pass
  from jax.experimental import jax2tf
  # pylint: enable=g-import-not-at-top
  cfg = restored.config
  size = int(cfg.data.image_size)
  fn = probabilities_fn(restored.graphdef, cfg.data.mean, cfg.data.std)
  leaves, treedef = jax.tree.flatten(
      jax.device_get((restored.params, restored.rest))
  )
  _input_spec(size, input_dtype)  # validates input_dtype

  def flat_fn(flat, images):
    params, rest = jax.tree.unflatten(treedef, flat)
    return fn(params, rest, images)

  tf_fn = jax2tf.convert(
      flat_fn,
      polymorphic_shapes=[None, f'(b, {size}, {size}, 3)'],
      with_gradient=False,
      native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(x), trainable=False) for x in leaves]

  @tf.function(
      autograph=False,
      input_signature=[
          tf.TensorSpec(
              [None, size, size, 3], tf.as_dtype(input_dtype), name='images'
          )
      ],
  )
  def serve(images):
    return {'probabilities': tf_fn(module.weights, images)}

  module.serve = serve
  tf.saved_model.save(module, out_dir, signatures={'serving_default': serve})


def _config_hash(workdir: str, config) -> str:
  """The hash the training run recorded in meta.json (else recomputed)."""
  recorded = file_io.read_meta(workdir).get('config_hash')
  return recorded or checkpointing.config_hash(config)


def _parse_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
  if isinstance(formats, str):
    formats = FORMATS if formats == 'both' else (formats,)
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    raise ValueError(
        f'formats {list(formats)}: each must be one of '
        f'{list(FORMATS)} (or "both")'
    )
  return tuple(dict.fromkeys(formats))


def export_model(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    formats: Sequence[str] | str = ('stablehlo',),
    input_dtype: str = 'uint8',
    use_ema: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> dict[str, Any]:
  """Exports the checkpoint of `workdir` under `out`; returns the metadata.

  `formats`: any of 'stablehlo', 'savedmodel' (or 'both'). metadata.json
  and model.stablehlo are always written (the metadata describes both).
  """
  formats = _parse_formats(formats)
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(
        f'input_dtype={input_dtype!r} is not one of {list(INPUT_DTYPES)}'
    )
  restored = predict.restore_model(workdir, step=step, use_ema=use_ema)
  cfg = restored.config
  size = int(cfg.data.image_size)
  out_dir = epath.Path(out)  # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  exported = export_stablehlo(
      restored, input_dtype=input_dtype, platforms=platforms
  )
  file_io.atomic_write(out_dir / STABLEHLO_FILE, exported.serialize())
  files = {'stablehlo': STABLEHLO_FILE}
  stale = out_dir / SAVEDMODEL_DIR
  if 'savedmodel' not in formats and stale.is_dir():
    stale.rmtree()  # an earlier export's; metadata.json won't list it
    logging.warning('Removed %s from an earlier export', stale)
  if 'savedmodel' in formats:
    save_savedmodel(
        restored,
        str(out_dir / SAVEDMODEL_DIR),
        input_dtype=input_dtype,
        platforms=platforms,
    )
    files['savedmodel'] = SAVEDMODEL_DIR
  metadata = {
      'class_names': list(restored.class_names),
      'num_classes': len(restored.class_names),
      'image_size': size,
      'input_shape': ['b', size, size, 3],
      'input_dtype': input_dtype,
      'input_range': [0, 255] if input_dtype == 'uint8' else [0.0, 1.0],
      'output': 'probabilities [b, num_classes]'
      + (
          " (softmax of the mean of the cls and dist heads' logits)"
          if cfg.model.distilled
          else ''
      ),
      'mean': [float(m) for m in cfg.data.mean],
      'std': [float(s) for s in cfg.data.std],
      'eval_crop_ratio': float(cfg.data.get('eval_crop_ratio', 0.875)),
      'preprocessing': 'not included: resize the shorter side to '
      'image_size / eval_crop_ratio (bicubic), centre crop '
      'image_size, RGB',
      'checkpoint_step': restored.step,
      'weights': restored.weights,
      'config_hash': _config_hash(workdir, cfg),
      'model': cfg.model.to_dict(),
      'platforms': list(exported.platforms),
      'jax_version': jax.__version__,
      'files': files,
  }
  file_io.atomic_write(
      out_dir / METADATA_FILE, json.dumps(metadata, indent=2, default=str)
  )
  return metadata


def load_stablehlo(path: str) -> Callable[[Any], jax.Array]:
  """Reloads an export: `fn(images [b, S, S, 3]) -> probabilities [b, C]`.

  `path` is the export directory or its model.stablehlo file. The returned
  function checks the dtype and shape of its input and names the expected
  ones on a mismatch.
  """
  file = epath.Path(path)  # local or gs://
  if file.is_dir():
    file = file / STABLEHLO_FILE
  if not file.is_file():
    raise FileNotFoundError(
        f'{file} not found: export first (python -m '
        'drpl_jax.export --workdir=DIR --out PATH)'
    )
  data = file.read_bytes()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{file}: not a jax.export serialization: {e}') from e
  (spec,) = exported.in_avals

  def fn(images: Any) -> jax.Array:
    images = jnp.asarray(images)
    if (
        images.dtype != spec.dtype
        or images.ndim != 4
        or (tuple(images.shape[1:]) != tuple(spec.shape[1:]))
    ):
      raise ValueError(
          f'{file}: expected images {spec.dtype} [b, '
          f'{", ".join(str(d) for d in spec.shape[1:])}], got '
          f'{images.dtype} {list(images.shape)}'
      )
    return exported.call(images)

  fn.exported = exported
  return fn


def export_command(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    formats: str = 'stablehlo',
    input_dtype: str = 'uint8',
    use_ema: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> None:
  """What the command does: exports and prints the metadata as one JSON
  line. Bad input raises cli.UserError."""
  with cli.user_errors(evaluate.BAD_INPUT_ERRORS):
    metadata = export_model(
        workdir,
        out,
        step=step,
        formats=formats,
        input_dtype=input_dtype,
        use_ema=use_ema,
        platforms=platforms,
    )
  print(json.dumps({'out': out, **metadata}), flush=True)


def main(argv: Sequence[str]) -> None:
  """The absl main (flags only)."""
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments {list(argv[1:])}')
  f = flags.FLAGS
  export_command(
      f.workdir,
      f.out,
      step=f.step,
      formats=f.format,
      input_dtype=f.input_dtype,
      use_ema=f.ema,
      platforms=tuple(p for p in f.platforms if p),
  )


def run() -> None:
  """The command line: defines the flags, then runs `main` under the exit
  policy of drpl_jax/cli.py."""
  cli.define_workdir()
  flags.DEFINE_string(
      'out', None, 'Output directory (local or gs://).', required=True
  )
  cli.define_step()
  flags.DEFINE_enum('format', 'stablehlo', [*FORMATS, 'both'], 'What to write.')
  flags.DEFINE_enum(
      'input_dtype',
      'uint8',
      list(INPUT_DTYPES),
      'Image dtype the export takes.',
  )
  cli.define_ema('Export the EMA weights of the run.')
  flags.DEFINE_list(
      'platforms',
      list(DEFAULT_PLATFORMS),
      'Comma separated lowering platforms.',
  )
  cli.run(main)
