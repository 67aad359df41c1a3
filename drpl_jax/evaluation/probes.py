"""Shortcut-learning probes: does the model look at the lungs?

COVID-19 classifiers trained on public collections are known to learn the
source hospital (text markers, borders, exposure, patient age) rather than
the lungs (DeGrave et al., Nature Machine Intelligence 2021; Roberts et al.,
Nature Machine Intelligence 2021). `evaluate` adds two views of this to
report.json / report.md:

`probes`: the evaluated images are run again
  lungs_hidden   with a central "lung box" replaced by the mask value;
  lungs_only     with everything outside the box replaced (only the lungs
                 kept),
  each reported (accuracy, balanced accuracy, macro AUC) beside the normal
  figures. The mask value is the normalisation mean (`config.data.mean`),
  i.e. exactly zero in the model's normalised input space: the hidden
  region carries no signal and no artificial edge intensity of its own.
  A model is FLAGGED when, with the lungs hidden, its accuracy is still
  within `margin` (default 0.10) of its normal accuracy AND at least
  `above_chance` (default 0.15) above chance (the majority class's share of
  the evaluated images): it then classifies from what lies outside the
  lungs (borders, markers, the body outline), a shortcut.

`attention`: the share of the attention-rollout mass
  (`drpl_jax.evaluation.rollout`, as in `predict --heatmap`) that falls on
  patches whose centre lies inside the lung box, averaged over the images,
  beside the box's share of the patches (what a uniform map would give). A
  share well below the box's area means the prediction is read from the
  border.

The box: `config.probes.lung_box = (top, bottom, left, right)` as fractions
of the model's input image (after the evaluation resize and centre crop).
Default (0.1, 0.9, 0.1, 0.9): the central 80% of each side, 64% of the
area, which covers both lungs, the heart and mediastinum on a frontal chest
X-ray framed as in the COVID-19 Radiography Database, and leaves the border
where the markers, labels and collimation edges sit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

DEFAULT_LUNG_BOX = (0.1, 0.9, 0.1, 0.9)
DEFAULT_MARGIN = 0.10
DEFAULT_ABOVE_CHANCE = 0.15
PROBES = ('lungs_hidden', 'lungs_only')


def probe_settings(config) -> dict[str, Any]:
  """`config.probes` with defaults (older configs have no such section)."""
  probes = config.get('probes') or {}
  get = probes.get
  box = tuple(float(v) for v in get('lung_box', DEFAULT_LUNG_BOX))
  if (
      len(box) != 4
      or not 0 <= box[0] < box[1] <= 1
      or not 0 <= box[2] < box[3] <= 1
  ):
    raise ValueError(
        f'config.probes.lung_box={box}: need (top, bottom, '
        'left, right) fractions with 0 <= top < bottom <= 1 and '
        '0 <= left < right <= 1'
    )
  return {
      'enabled': bool(get('enabled', True)),
      'lung_box': box,
      'margin': float(get('margin', DEFAULT_MARGIN)),
      'above_chance': float(get('above_chance', DEFAULT_ABOVE_CHANCE)),
  }


def box_mask(height: int, width: int, box: tuple[float, ...]) -> np.ndarray:
  """bool [H, W], True inside the box (pixel rows/cols by rounding)."""
  top, bottom = round(box[0] * height), round(box[1] * height)
  left, right = round(box[2] * width), round(box[3] * width)
  mask = np.zeros((height, width), bool)
  mask[top:bottom, left:right] = True
  return mask


def grid_box_mask(
    grid_h: int, grid_w: int, box: tuple[float, ...]
) -> np.ndarray:
  """bool [Gh, Gw]: patches whose centre lies inside the box."""
  rows = (np.arange(grid_h) + 0.5) / grid_h
  cols = (np.arange(grid_w) + 0.5) / grid_w
  in_rows = (rows >= box[0]) & (rows < box[1])
  in_cols = (cols >= box[2]) & (cols < box[3])
  return in_rows[:, None] & in_cols[None, :]


def mask_images(
    images: np.ndarray, keep: np.ndarray, mean: tuple[float, ...]
) -> np.ndarray:
  """uint8 or [0, 1] images [B, H, W, 3] -> float32 [0, 1] images with the
  pixels where `keep` [H, W] is False set to `mean` (0 once normalised)."""
  x = np.asarray(images, np.float32)
  if images.dtype == np.uint8:
    x = x / 255.0
  fill = np.asarray(mean, np.float32)
  return np.where(keep[None, :, :, None], x, fill).astype(np.float32)


class _Masked:
  """An evaluator whose `predict` masks every batch first."""

  def __init__(self, evaluator, keep_inside: bool, box, mean):
    self._evaluator, self._keep_inside = evaluator, keep_inside
    self._box, self._mean = box, tuple(mean)

  def _mask(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inside = box_mask(
        batch['image'].shape[1], batch['image'].shape[2], self._box
    )
    keep = inside if self._keep_inside else ~inside
    return dict(batch, image=mask_images(batch['image'], keep, self._mean))

  def predict(self, batches, params_key: str = 'params'):
    return self._evaluator.predict(map(self._mask, batches), params_key)


def _figures(
    logits: np.ndarray, labels: np.ndarray, class_names
) -> dict[str, Any]:
  from drpl_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top

  m = metrics.classification_metrics(
      metrics.softmax(logits), labels, class_names, n_bootstrap=0
  )
  return {
      'accuracy': m['accuracy'],
      'balanced_accuracy': m['balanced_accuracy'],
      'auc': m['macro'].get('auc'),
  }


def shortcut_flag(
    normal: float,
    hidden: float,
    chance: float,
    margin: float,
    above_chance: float,
) -> bool:
  """The rule of the module docstring: still right with the lungs hidden."""
  return hidden >= normal - margin and hidden >= chance + above_chance


def shortcut_probes(
    config,
    evaluator,
    report: Mapping[str, Any],
    class_names,
    labels: np.ndarray,
    predict: Callable[[Any], tuple[dict[str, np.ndarray], np.ndarray]],
) -> dict[str, Any]:
  """The `probes` entry of report.json.

  `predict(evaluator_like)` returns (logits per head, labels) over the
  evaluated images for an object with the evaluator's `predict`; it is
  called once per probe with a masking wrapper.
  """
  s = probe_settings(config)
  out: dict[str, Any] = {
      'lung_box': list(s['lung_box']),
      'mask_value': 'config.data.mean (0 in normalised input space)',
      'normal': {
          'accuracy': report['accuracy'],
          'balanced_accuracy': report['balanced_accuracy'],
          'auc': report['macro'].get('auc'),
      },
  }
  for name, keep_inside in (('lungs_hidden', False), ('lungs_only', True)):
    masked = _Masked(evaluator, keep_inside, s['lung_box'], config.data.mean)
    logits, probe_labels = predict(masked)
    if not np.array_equal(probe_labels, labels):
      raise RuntimeError(f'probe {name}: the masked pass saw other images')
    out[name] = _figures(logits['mean'], probe_labels, class_names)
  counts = np.bincount(labels, minlength=len(class_names))
  chance = float(counts.max() / max(counts.sum(), 1))
  out['chance'] = chance
  out['rule'] = {'margin': s['margin'], 'above_chance': s['above_chance']}
  out['shortcut_flag'] = shortcut_flag(
      report['accuracy'],
      out['lungs_hidden']['accuracy'],
      chance,
      s['margin'],
      s['above_chance'],
  )
  return out


def rollout_summary(
    config, graphdef, params, rest, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, Any]:
  """The `attention` entry: rollout mass inside the lung box (see doc)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from drpl_jax.evaluation import rollout  # pylint: disable=g-import-not-at-top
  from drpl_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mean, std = tuple(config.data.mean), tuple(config.data.std)
  box = probe_settings(config)['lung_box']
  prefix = 2 if config.model.distilled else 1
  patch = int(config.model.patch_size)

  @jax.jit
  def attention_of(params, rest, images):
    model = nnx.merge(graphdef, params, rest)
    _, attention = model.forward_features(
        step_lib.normalize(images, mean, std),
        train=False,
        return_attention=True,
    )
    return attention

  shares, area = [], None
  for batch in batches:
    keep = np.asarray(batch['mask']).astype(bool)
    if not keep.any():
      continue
    images = np.asarray(batch['image'])[keep]
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    attention = jax.device_get(attention_of(params, rest, images))
    maps = rollout.attention_rollout(attention, prefix, grid)  # [B, Gh, Gw]
    inside = grid_box_mask(*grid, box)
    total = maps.sum(axis=(1, 2))
    shares.append(maps[:, inside].sum(axis=1) / np.maximum(total, 1e-12))
    area = float(inside.mean())
  if not shares:
    return {}
  shares = np.concatenate(shares)
  return {
      'lung_box': list(box),
      'lung_share_mean': float(shares.mean()),
      'lung_share_std': float(shares.std()),
      'box_patch_fraction': area,
      'num_images': int(shares.size),
  }


def markdown(report: Mapping[str, Any]) -> list[str]:
  """report.md lines for the `probes` and `attention` entries (if any)."""
  lines: list[str] = []
  p = report.get('probes')
  if p:
    fmt = lambda x: '—' if x is None else f'{100 * x:.1f}%'
    auc = lambda x: '—' if x is None else f'{x:.3f}'
    rows = [
        (
            name.replace('_', ' '),
            fmt(p[name]['accuracy']),
            fmt(p[name]['balanced_accuracy']),
            auc(p[name]['auc']),
        )
        for name in ('normal',) + PROBES
    ]
    box = ', '.join(f'{v:g}' for v in p['lung_box'])
    lines += [
        '## Shortcut probes',
        '',
        '| Input | Accuracy | Balanced accuracy | AUC (macro) |',
        '|---|---|---|---|',
    ]
    lines += [f'| {" | ".join(r)} |' for r in rows]
    lines += [
        '',
        f'Lung box (top, bottom, left, right as fractions of the '
        f'input): ({box}); masked pixels are set to the normalisation '
        f'mean. Chance (majority class): {fmt(p["chance"])}.',
        '',
    ]
    if p.get('shortcut_flag'):
      r = p['rule']
      hidden = fmt(p['lungs_hidden']['accuracy'])
      lines += [
          f'**FLAG: possible shortcut learning.** With the lungs '
          f'hidden the model still scores {hidden}, within {r["margin"]:g} of its normal accuracy and more '
          f'than {r["above_chance"]:g} above chance: it classifies from '
          'outside the lungs (borders, markers, body outline).',
          '',
      ]
    else:
      lines += [
          'No shortcut flag: hiding the lungs costs more than the '
          'margin, or leaves the model near chance.',
          '',
      ]
  a = report.get('attention')
  if a:
    lines += [
        '## Attention rollout',
        '',
        f'Share of the rollout mass inside the lung box: '
        f'{100 * a["lung_share_mean"]:.1f}% (std '
        f'{100 * a["lung_share_std"]:.1f}%, {a["num_images"]} images); '
        f'a uniform map would give {100 * a["box_patch_fraction"]:.1f}%'
        " (the box's share of the patches).",
        '',
    ]
  return lines
