r"""Class probabilities and attention-rollout heatmaps for single X-rays.

  python -m drpl_jax.predict --workdir=DIR IMAGE... [--heatmap OUT] \
      [--step N] [--ema]

(absl flags; bad input prints one `error:` line and exits 2).

Loads the run's config (DIR/meta.json) and checkpoint and prints one JSON
line per image: its path, the predicted class, the probability of every
class (softmax of the mean of both heads' logits, which is what the model
predicts) and, for a distilled model, each head's probabilities. Images are
read like the data sets read them (PNG, JPEG, 16-bit PNG; DICOM when pydicom
is installed) and preprocessed exactly as evaluation does (shorter side to
S / eval_crop_ratio, centre crop S). An unreadable image prints a line with
its path and the reason on stderr and the others are still predicted; the
exit code is 1 if any image failed.

With `--heatmap OUT`, each image also gets `OUT/<name>_rollout.png`: the
attention rollout of the prediction (`drpl_jax.evaluation.rollout`)
upsampled to the region the model saw and overlaid on the X-ray, titled with the prediction.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from PIL import Image

from drpl_jax import cli
from drpl_jax.data import images as images_lib
from drpl_jax.evaluation import evaluate
from drpl_jax.evaluation import rollout
from drpl_jax.input import augment
from drpl_jax.parallel import hostmem
from drpl_jax.train import state as state_lib
from drpl_jax.train import step as step_lib
from drpl_jax.utils import files

ImageError = images_lib.ImageError


@dataclasses.dataclass
class RestoredModel:
  """A checkpointed model ready for inference."""

  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: Any
  rest: Any
  step: int
  weights: str  # 'params' or 'ema'
  class_names: list[str]

  def model(self) -> nnx.Module:
    """The NNX module with the restored weights (eval mode by argument)."""
    return nnx.merge(self.graphdef, self.params, self.rest)


def class_names_from_workdir(workdir: str, num_classes: int) -> list[str]:
  """The class names recorded in workdir/meta.json, else class_0, ...."""
  meta = files.read_meta(workdir)
  names = list((meta.get('data') or {}).get('class_names') or ())
  if len(names) != num_classes:
    return [f'class_{i}' for i in range(num_classes)]
  return names


def restore_model(
    workdir: str, *, step: int | None = None, use_ema: bool = False
) -> RestoredModel:
  """Restores the training run in `workdir` (config from its meta.json).

  Args:
    workdir: a training workdir (meta.json and checkpoints/).
    step: checkpoint step; the latest by default.
    use_ema: use the EMA of the weights (the run must have kept one).

  Raises:
    FileNotFoundError: no meta.json or no such checkpoint.
    ValueError: `use_ema` but the run has no EMA weights.
  """
  config = evaluate.config_from_workdir(workdir)
  setup = state_lib.build_inference(config)
  step, state = setup.restore(workdir, step)
  weights = 'ema' if use_ema else 'params'
  if use_ema and state.ema is None:
    raise ValueError(
        f'{workdir}: checkpoint {step} has no EMA weights '
        f'(config.optim.ema_decay={config.optim.ema_decay}); drop --ema'
    )
  return RestoredModel(
      config=config,
      graphdef=setup.graphdef,
      params=state.weights(weights),
      rest=state.rest,
      step=int(step),
      weights=weights,
      class_names=class_names_from_workdir(workdir, config.model.num_classes),
  )


# ----------------------------------------------------------------------------
# DICOM (pydicom is optional and imported only for .dcm files).

DICOM_EXTENSIONS = ('.dcm', '.dicom')
_COLOUR = ('RGB', 'YBR_FULL', 'YBR_FULL_422', 'YBR_ICT', 'YBR_RCT')


def is_dicom(path: str, data: bytes) -> bool:
  """A .dcm/.dicom name, or the 'DICM' magic after the 128-byte preamble."""
  return path.lower().endswith(DICOM_EXTENSIONS) or data[128:132] == b'DICM'


def _first(value: Any) -> float | None:
  """A DICOM number that may be multi-valued (take the first) or absent."""
  if value is None or value == '':
    return None
  if isinstance(value, (list, tuple)) or (
      hasattr(value, '__getitem__') and not isinstance(value, str)
  ):
    return float(value[0]) if len(value) else None
  return float(value)


def window(
    values: np.ndarray, center: float, width: float, function: str = 'LINEAR'
) -> np.ndarray:
  """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped to [0, 1]."""
  function = (function or 'LINEAR').upper()
  if function == 'SIGMOID':
    return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  if function == 'LINEAR_EXACT':
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)
  if function != 'LINEAR':
    raise ValueError(f'unknown VOILUTFunction {function!r}')
  if width < 1:
    raise ValueError(f'WindowWidth {width} < 1 is invalid for LINEAR')
  c, w = center - 0.5, width - 1.0
  if w == 0:  # width 1: a threshold at the centre
    return (values > c).astype(np.float64)
  return np.clip((values - c) / w + 0.5, 0.0, 1.0)


def dicom_to_rgb(
    pixels: np.ndarray, ds: Any, *, path: str = '<dicom>', voi_lut=None
) -> np.ndarray:
  """Stored DICOM pixels -> display uint8 RGB [H, W, 3].

  Grayscale: modality rescale (RescaleSlope/RescaleIntercept), then the VOI
  window (first WindowCenter/WindowWidth, VOILUTFunction), else `voi_lut`
  (a VOI LUT sequence, applied by the caller's function) and min-max, else
  min-max over the image; MONOCHROME1 is inverted so bone is bright.
  `ds` is any object with DICOM keyword attributes (a pydicom Dataset).
  Colour images are scaled by their BitsStored.
  """
  x = np.asarray(pixels)
  photometric = str(
      getattr(ds, 'PhotometricInterpretation', 'MONOCHROME2')
  ).upper()
  if photometric in _COLOUR and x.ndim == 3 and x.shape[-1] == 3:
    bits = int(getattr(ds, 'BitsStored', 8) or 8)
    scaled = x.astype(np.float64) * 255.0 / float(2**bits - 1)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
  if x.ndim != 2:
    raise ImageError(
        path,
        f'DICOM pixel data of shape {x.shape}: only one '
        'grayscale frame (or one RGB frame) is supported',
    )
  slope = _first(getattr(ds, 'RescaleSlope', None))
  intercept = _first(getattr(ds, 'RescaleIntercept', None))
  values = x.astype(np.float64) * (1.0 if slope is None else slope) + (
      0.0 if intercept is None else intercept
  )
  center = _first(getattr(ds, 'WindowCenter', None))
  width = _first(getattr(ds, 'WindowWidth', None))
  if center is not None and width is not None and width > 0:
    try:
      unit = window(
          values,
          center,
          width,
          str(getattr(ds, 'VOILUTFunction', '') or 'LINEAR'),
      )
    except ValueError as e:
      raise ImageError(path, str(e)) from None
  else:
    if voi_lut is not None:
      values = np.asarray(voi_lut(values), dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
  if photometric == 'MONOCHROME1':
    unit = 1.0 - unit
  gray = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(gray[:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3]


def read_dicom(path: str, data: bytes | None = None) -> np.ndarray:
  """Reads a DICOM file (its bytes `data`, if read already) with pydicom
  to uint8 RGB [H, W, 3]."""
  try:
    import pydicom  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImageError(
        path, 'reading DICOM needs pydicom: pip install pydicom'
    ) from None
  try:
    ds = pydicom.dcmread(path if data is None else io.BytesIO(data))
    pixels = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    # pydicom raises many types (InvalidDicomError, missing decoders, ...).
    raise ImageError(
        path, f'cannot read DICOM pixel data: {type(e).__name__}: {e}'
    ) from None
  voi_lut = None
  if 'VOILUTSequence' in ds:
    # pylint: disable=g-import-not-at-top
    try:
      from pydicom.pixels import apply_voi_lut  # pydicom >= 3
    except ImportError:
      from pydicom.pixel_data_handlers.util import apply_voi_lut
    # pylint: enable=g-import-not-at-top
    voi_lut = lambda values: apply_voi_lut(values, ds)
  return dicom_to_rgb(pixels, ds, path=path, voi_lut=voi_lut)


# ----------------------------------------------------------------------------
# Reading and preprocessing.


def read_image(path: str) -> np.ndarray:
  """Reads PNG/JPEG/16-bit PNG/DICOM to uint8 RGB [H, W, 3].

  Raises:
    ImageError: missing, unreadable or unsupported file (names the path).
  """
  file = epath.Path(path)  # local or gs://
  if file.is_dir():
    raise ImageError(path, 'is a directory, not an image')
  try:
    data = file.read_bytes()
  except OSError as e:
    raise ImageError(path, f'cannot read file: {e.strerror or e}') from None
  if is_dicom(path, data):
    return read_dicom(path, data)
  return images_lib.decode_image(data, path=path)


def small_image_warning(image: np.ndarray) -> str | None:
  """Why `image` is below `prepare`'s minimum side (which skips such
  files when building data), or None."""
  side = min(image.shape[:2])
  if side >= images_lib.DEFAULT_MIN_SIDE:
    return None
  return (
      f'{image.shape[1]}x{image.shape[0]} px is below the '
      f'{images_lib.DEFAULT_MIN_SIDE} px minimum side that prepare '
      'accepts; the prediction is unreliable'
  )


def preprocess(
    image: np.ndarray, config: ml_collections.ConfigDict
) -> np.ndarray:
  """The evaluation view of an image: uint8 [S, S, 3] (see input_pipeline)."""
  return augment.eval_transform(
      image,
      size=config.data.image_size,
      crop_ratio=config.data.get('eval_crop_ratio', 0.875),
  )


# ----------------------------------------------------------------------------
# Inference.


class Predictor:
  """Jitted inference with per-head probabilities and rollout maps."""

  def __init__(self, restored: RestoredModel):
    self.restored = restored
    config = restored.config
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    graphdef = restored.graphdef
    self.distilled = bool(config.model.distilled)
    self.num_prefix_tokens = 2 if self.distilled else 1
    self.patch_size = int(config.model.patch_size)

    def infer(params, rest, images):
      model = nnx.merge(graphdef, params, rest)
      x = step_lib.normalize(images, mean, std)
      feats, attention = model.forward_features(
          x, train=False, return_attention=True
      )
      cls = model.head(feats[:, 0]).astype(jnp.float32)
      logits = {'mean': cls}
      if model.head_dist is not None:
        dist = model.head_dist(feats[:, 1]).astype(jnp.float32)
        logits = {'mean': (cls + dist) / 2, 'cls': cls, 'dist': dist}
      probs = {k: jax.nn.softmax(v, axis=-1) for k, v in logits.items()}
      return probs, attention

    self._infer = jax.jit(infer)

  def __call__(
      self, images: np.ndarray
  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """uint8 [B, S, S, 3] -> (probabilities per head [B, C], maps [B, G, G])."""
    probs, attention = self._infer(
        self.restored.params, self.restored.rest, jnp.asarray(images)
    )
    grid = (
        images.shape[1] // self.patch_size,
        images.shape[2] // self.patch_size,
    )
    maps = rollout.attention_rollout(
        jax.device_get(attention), self.num_prefix_tokens, grid
    )
    return {k: np.asarray(v) for k, v in probs.items()}, maps


def _record(
    path: str, probs: dict[str, np.ndarray], restored: RestoredModel
) -> dict[str, Any]:
  names = restored.class_names
  per_class = lambda p: {n: float(v) for n, v in zip(names, p)}
  mean = probs['mean']
  index = int(np.argmax(mean))
  record = {
      'path': path,
      'predicted': names[index],
      'predicted_index': index,
      'probability': float(mean[index]),
      'probabilities': per_class(mean),
  }
  if 'cls' in probs:
    record['heads'] = {h: per_class(probs[h]) for h in ('cls', 'dist')}
  record.update(step=restored.step, weights=restored.weights)
  return record


# ----------------------------------------------------------------------------
# Heatmaps.


def overlay_heatmap(
    view: np.ndarray,
    heat: np.ndarray,
    *,
    alpha: float = 0.45,
    cmap: str = 'jet',
) -> np.ndarray:
  """Blends a colour-mapped heat grid over a grayscale image.

  Args:
    view: uint8 [H, W, 3] image (shown as grayscale).
    heat: [Gh, Gw] map; rescaled to [0, 1] by its own min and max (a
      constant map shows as the colour map's bottom colour) and upsampled
      bilinearly to H x W.
    alpha: opacity of the colour layer.
    cmap: a matplotlib colour map name.

  Returns:
    uint8 [H, W, 3].
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  heat = np.asarray(heat, dtype=np.float32)
  lo, hi = float(heat.min()), float(heat.max())
  unit = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
  h, w = view.shape[:2]
  up = np.asarray(
      Image.fromarray(unit, 'F').resize((w, h), Image.Resampling.BILINEAR)
  )  # [H, W]
  colour = matplotlib.colormaps[cmap](np.clip(up, 0.0, 1.0))[..., :3]
  gray = view.astype(np.float32).mean(axis=-1, keepdims=True) / 255.0
  out = (1.0 - alpha) * gray + alpha * colour  # [H, W, 3]
  return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def model_view(
    image: np.ndarray, config: ml_collections.ConfigDict, *, max_side: int = 512
) -> np.ndarray:
  """The region of `image` the model sees (the eval crop), for display.

  Kept at the image's resolution up to `max_side` pixels per side.
  """
  h, w = image.shape[:2]
  left, top, right, bottom = augment.center_crop_box(
      h, w, config.data.image_size, config.data.get('eval_crop_ratio', 0.875)
  )
  box = [int(round(v)) for v in (left, top, right, bottom)]
  view = image[box[1] : box[3], box[0] : box[2]]  # [h', w', 3]
  side = max(view.shape[:2])
  if side > max_side:
    scale = max_side / side
    size = (
        max(1, round(view.shape[1] * scale)),
        max(1, round(view.shape[0] * scale)),
    )
    view = np.asarray(
        Image.fromarray(view).resize(size, Image.Resampling.BILINEAR)
    )
  return view


def save_heatmap(
    image: np.ndarray,
    heat: np.ndarray,
    title: str,
    out_path: str,
    config: ml_collections.ConfigDict,
) -> None:
  """Writes the rollout overlay on the model's view of `image` as a PNG."""
  # pylint: disable=g-import-not-at-top
  from matplotlib import figure
  from matplotlib.backends import backend_agg
  # pylint: enable=g-import-not-at-top
  overlay = overlay_heatmap(model_view(image, config), heat)
  fig = figure.Figure(figsize=(5.0, 5.4))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(overlay)
  ax.set_title(title, fontsize=10)
  ax.axis('off')
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100, bbox_inches='tight')
  files.atomic_write(out_path, png.getvalue())  # local or gs://


def _heatmap_path(heatmap_dir: str, path: str, used: set[str]) -> str:
  stem = os.path.splitext(os.path.basename(path))[0] or 'image'
  name, n = f'{stem}_rollout.png', 1
  while name in used:
    n += 1
    name = f'{stem}_{n}_rollout.png'
  used.add(name)
  return str(epath.Path(heatmap_dir) / name)


# ----------------------------------------------------------------------------
# API and command line.


def predict_images(
    workdir: str,
    paths: Sequence[str],
    *,
    step: int | None = None,
    heatmap_dir: str | None = None,
    use_ema: bool = False,
) -> list[dict[str, Any]]:
  """Predicts every image in `paths`, in order.

  Returns one dict per path: on success `path`, `predicted`,
  `predicted_index`, `probability`, `probabilities` (class name ->
  probability of the mean head), `heads` (distilled models: 'cls' and
  'dist', the same form), `step`, `weights` and, with `heatmap_dir`,
  `heatmap` (the PNG written); for an unreadable image `path` and `error`.
  Images are run one at a time (batch 1: one compile for any number).
  """
  restored = restore_model(workdir, step=step, use_ema=use_ema)
  predictor = Predictor(restored)
  if heatmap_dir:
    epath.Path(heatmap_dir).mkdir(parents=True, exist_ok=True)
  used: set[str] = set()
  results = []
  for path in paths:
    try:
      image = read_image(path)
      view = preprocess(image, restored.config)
    except (ImageError, ValueError) as e:
      reason = e.reason if isinstance(e, ImageError) else str(e)
      results.append({'path': path, 'error': reason})
      continue
    probs, maps = predictor(view[None])
    record = _record(path, {k: v[0] for k, v in probs.items()}, restored)
    small = small_image_warning(image)
    if small:
      record['warning'] = small
      print(f'warning: {path}: {small}', file=sys.stderr)
    if heatmap_dir:
      out = _heatmap_path(heatmap_dir, path, used)
      title = (
          f'{os.path.basename(path)}: {record["predicted"]} '
          f'({record["probability"]:.1%})'
      )
      save_heatmap(image, maps[0], title, out, restored.config)
      record['heatmap'] = out
    results.append(record)
  return results


def predict_command(workdir: str, paths: Sequence[str], **options: Any) -> int:
  """What the command does: one JSON line per image on stdout, one
  `error: PATH: reason` line per unreadable image on stderr; returns the
  exit code (1 if any image failed). `options`: the keywords of
  `predict_images` (step, heatmap_dir, use_ema). Bad input raises
  cli.UserError."""
  if not paths:
    raise cli.UserError(
        'no IMAGE given: python -m drpl_jax.predict --workdir=DIR IMAGE...'
    )
  with cli.user_errors(evaluate.BAD_INPUT_ERRORS):
    results = predict_images(workdir, paths, **options)
  failed = 0
  for record in results:
    if 'error' in record:
      failed += 1
      print(f'error: {record["path"]}: {record["error"]}', file=sys.stderr)
    else:
      print(json.dumps(record), flush=True)
  return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
  """The absl main: the positional arguments are the images."""
  hostmem.configure()  # before JAX starts its CPU client
  f = flags.FLAGS
  return predict_command(
      f.workdir,
      list(argv[1:]),
      step=f.step,
      heatmap_dir=f.heatmap,
      use_ema=f.ema,
  )


def run() -> None:
  """The command line: defines the flags, then runs `main` under the exit
  policy of drpl_jax/cli.py."""
  cli.define_workdir()
  flags.DEFINE_string(
      'heatmap',
      None,
      'Directory for one rollout heatmap '
      'PNG per image (OUT/<name>_rollout.png).',
  )
  cli.define_step()
  cli.define_ema()
  cli.run(main)
