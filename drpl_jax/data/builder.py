"""The common TFDS builder behind every data set of the project.

Subclasses only list their examples (`_list`, validation included, raising
`DataError` before any work is done); this base class then

1. decodes every image once (threads), skipping and listing bad files,
2. assigns the splits (`drpl_jax.data.splits`): from the listing (manifest),
   grouped by patient when patient ids exist, else stratified by class,
3. writes ArrayRecord shards with PNG-encoded uint8 RGB images, and
4. writes `summary.json` and `splits.csv` inside the prepared folder (in
   TFDS's temporary folder, so they appear atomically with the data).

Features: `image` (uint8 [H, W, 3], PNG), `label` (ClassLabel), `id` (Text,
the path relative to the data root), `patient_id` (Text, '' when unknown).
"""

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
import concurrent.futures
import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from drpl_jax.data import files
from drpl_jax.data import images
from drpl_jax.data import splits as splits_lib
from drpl_jax.data.files import DataError

SUMMARY_FILE = 'summary.json'
SPLITS_CSV = 'splits.csv'
PROGRESS_EVERY = 1000


def log(message: str) -> None:
  """A build log line on stderr (stdout stays free for the CLI's JSON)."""
  print(f'[drpl_jax.data] {message}', file=sys.stderr, flush=True)


@dataclasses.dataclass
class CxrConfig(tfds.core.BuilderConfig):
  """What identifies one prepared data set besides its builder and version."""

  manual_dir: str = ''
  classes: tuple[str, ...] | None = None
  seed: int = 0
  min_side: int = images.DEFAULT_MIN_SIDE


@dataclasses.dataclass(frozen=True)
class Item:
  """One example to build; `ref` is a FileRef (or builder-specific)."""

  id: str
  label: int
  ref: Any
  patient_id: str = ''
  split: str = ''  # preset split from a manifest; '' = assigned by seed


@dataclasses.dataclass(frozen=True)
class Listing:
  """The validated examples of a build, before any image is decoded."""

  class_names: tuple[str, ...]
  items: tuple[Item, ...]
  ignored: tuple[str, ...] = ()  # non-image files next to the images
  skipped: tuple[tuple[str, str], ...] = ()  # (path, reason), e.g. missing
  source: str = ''  # the folder or archive the items come from


def list_class_folders(
    dataset: str,
    tree: files.Tree,
    classes: Sequence[str],
    folder_of: Callable[[str], str],
    *,
    root: str = '',
    source: str,
) -> Listing:
  """The listing of a layout with one folder of images per class.

  `folder_of(name)` is the folder of class `name` in `tree` (it raises
  DataError for a missing one). Labels are positions in `classes`, ids the
  image paths relative to `root`, `source` that root as the user names it.
  Raises DataError, naming `dataset`, for a class folder with no images.
  """
  relative = lambda path: path[len(root) + 1 :] if root else path
  items, ignored = [], []
  for label, name in enumerate(classes):
    folder = folder_of(name)
    paths, skipped_names = files.list_images(tree, folder)
    if not paths:
      raise DataError(
          f'{dataset}: class folder '
          f'{os.path.join(source, relative(folder))} has no images'
      )
    ignored += skipped_names
    items += [  # ids e.g. COVID/images/x.png
        Item(id=relative(p), label=label, ref=tree.ref(p)) for p in paths
    ]
  return Listing(
      class_names=tuple(classes),
      items=tuple(items),
      ignored=tuple(ignored),
      source=source,
  )


def _slug(classes: tuple[str, ...] | None) -> str:
  if not classes:
    return 'all'
  slug = '-'.join(
      re.sub(r'[^0-9a-zA-Z]+', '_', c).strip('_').lower() or 'x'
      for c in classes
  )
  return slug[:40]


def config_name(
    *,
    manual_dir: str,
    classes: tuple[str, ...] | None,
    seed: int,
    min_side: int,
) -> str:
  """`<classes>_s<seed>_<hash>`: distinct per manual_dir, classes, settings."""
  key = json.dumps([manual_dir, list(classes or []), seed, min_side])
  digest = hashlib.sha256(key.encode()).hexdigest()[:8]
  return f'{_slug(classes)}_s{seed}_{digest}'


def _ordered_map(
    fn: Callable[[Item], Any], items: Iterable[Item], *, window: int = 128
) -> Iterator[Any]:
  """`map(fn, items)` on a thread pool, in order, at most `window` ahead."""
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: lists items (subclass), checks, splits, writes, summarises."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release. Seeded 80/10/10 train/validation/test split, '
      'stratified by class (grouped by patient when ids exist).',
  }
  BUILDER_CONFIG_CLS = CxrConfig
  USES_MANUAL_DIR = True
  DESCRIPTION = ''  # '' = the docstring of the subclass's module
  HOMEPAGE = ''
  CITATION = ''

  def __init__(self, *, config: CxrConfig, data_dir: str, **kwargs):
    self._rows: list[tuple[str, str, int, str]] = []
    self._skipped: list[tuple[str, str]] = []
    self._split_method = ''
    self._total = 0
    super().__init__(
        config=config, data_dir=data_dir, file_format='array_record', **kwargs
    )
    self._final_dir = self.data_dir

  @classmethod
  def make_config(
      cls,
      *,
      manual_dir: str = '',
      classes: tuple[str, ...] | None = None,
      seed: int = 0,
      min_side: int = images.DEFAULT_MIN_SIDE,
  ) -> CxrConfig:
    """The config (and thus the prepared folder) for these arguments."""
    if cls.USES_MANUAL_DIR:
      manual_dir = os.path.realpath(manual_dir) if manual_dir else ''
    else:
      manual_dir = ''
    if classes is not None:
      classes = tuple(classes)
      if not classes or any(not c for c in classes):
        raise DataError(f'classes={list(classes)}: give non-empty names')
      dups = sorted({c for c in classes if classes.count(c) > 1})
      if dups:
        raise DataError(f'classes lists {dups} more than once')
    if min_side < 1:
      raise DataError(f'min_side={min_side} must be >= 1')
    name = config_name(
        manual_dir=manual_dir, classes=classes, seed=seed, min_side=min_side
    )
    return CxrConfig(
        name=name,
        manual_dir=manual_dir,
        classes=classes,
        seed=int(seed),
        min_side=int(min_side),
        description=f'classes={list(classes or []) or "all"}, '
        f'seed={seed}, min_side={min_side}, '
        f'manual_dir={manual_dir or "-"}',
    )

  def _create_builder_config(self, builder_config, version):
    # Our configs are made per call (make_config), not listed on the class;
    # accept them without TFDS's "custom data configuration" warning.
    if isinstance(builder_config, CxrConfig):
      return builder_config
    return super()._create_builder_config(builder_config, version)

  # --- Subclass interface ---------------------------------------------------

  def _list(self) -> Listing:
    """Lists and validates the examples (DataError on bad input)."""
    raise NotImplementedError

  def _load(self, item: Item) -> np.ndarray:
    """Reads one example's image as uint8 [H, W, 3] (ImageError if bad)."""
    return images.decode_checked(
        item.ref.read(),
        path=item.ref.display,
        min_side=self.builder_config.min_side,
    )

  # --- TFDS ------------------------------------------------------------------

  @functools.cached_property
  def listing(self) -> Listing:
    listing = self._list()
    seen = set()
    for item in listing.items:
      if item.id in seen:
        raise DataError(
            f'{listing.source}: example id {item.id!r} occurs twice'
        )
      seen.add(item.id)
    return listing

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            self.DESCRIPTION or sys.modules[type(self).__module__].__doc__
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(
                    shape=(None, None, 3), encoding_format='png'
                ),
                'label': tfds.features.ClassLabel(
                    names=list(self.listing.class_names)
                ),
                'id': tfds.features.Text(),
                'patient_id': tfds.features.Text(),
            }
        ),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
    )

  def _check(self, items: tuple[Item, ...]) -> list[Item]:
    """Decodes every image once; returns the usable items, records skips."""

    def check(item):
      try:
        self._load(item)
        return item, None
      except images.ImageError as e:
        return item, e

    good = []
    before = len(self._skipped)  # rows skipped before decoding (manifest)
    earlier = f', plus {before} skipped before decoding' if before else ''
    for done, (item, error) in enumerate(_ordered_map(check, items), 1):
      if error is None:
        good.append(item)
      else:
        self._skipped.append((error.path, error.reason))
        log(f'{self.name}: skipped {error.path}: {error.reason}')
      if done % PROGRESS_EVERY == 0 or done == len(items):
        log(
            f'{self.name}: checked {done}/{len(items)} images '
            f'({len(self._skipped) - before} skipped{earlier})'
        )
    return good

  def _assign(self, items: list[Item]) -> list[str]:
    """The split of each usable item (manifest, by patient, or stratified)."""
    labels = [item.label for item in items]
    if items and all(item.split for item in items):
      self._split_method = 'manifest'
      return [item.split for item in items]
    if any(item.patient_id for item in items):
      self._split_method = 'grouped by patient'
      groups = [item.patient_id or f'\0{item.id}' for item in items]
      return splits_lib.grouped_split(
          labels, groups, seed=self.builder_config.seed
      )
    self._split_method = 'stratified'
    return splits_lib.stratified_split(
        labels, [i.id for i in items], seed=self.builder_config.seed
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is ever downloaded.
    listing = self.listing
    self._skipped = list(listing.skipped)
    for path, reason in listing.skipped:
      log(f'{self.name}: skipped {path}: {reason}')
    good = self._check(listing.items)
    if not good:
      raise DataError(
          f'{listing.source}: no usable image; all '
          f'{len(listing.items)} files were skipped'
      )
    by_split = collections.defaultdict(list)
    for item, split in zip(good, self._assign(good)):
      by_split[split].append(item)
    self._rows = []
    self._total = len(good)
    return {
        split: self._generate_examples(split, by_split[split])
        for split in splits_lib.SPLITS
        if by_split[split]
    }

  def _generate_examples(self, split: str, items: list[Item]):
    """Yields (key, example) for one split, encoding images on threads."""

    def encode(item):
      try:
        return item, images.encode_png(self._load(item))
      except images.ImageError as e:  # Changed on disk since the check.
        raise DataError(
            f'{e.path} became unreadable during the build: {e.reason}'
        ) from None

    for item, png in _ordered_map(encode, items):
      self._rows.append((item.id, split, item.label, item.patient_id))
      if len(self._rows) % PROGRESS_EVERY == 0:
        log(f'{self.name}: wrote {len(self._rows)}/{self._total} examples')
      yield item.id, {
          'image': png,
          'label': item.label,
          'id': item.id,
          'patient_id': item.patient_id,
      }

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is TFDS's temporary folder here; renamed when complete.
    summary = self.summary()
    with open(os.path.join(self.data_dir, SUMMARY_FILE), 'w') as f:
      json.dump(summary, f, indent=1)
    with open(os.path.join(self.data_dir, SPLITS_CSV), 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(['id', 'split', 'label', 'patient_id'])
      names = self.listing.class_names
      order = {s: i for i, s in enumerate(splits_lib.SPLITS)}
      for id_, split, label, patient in sorted(
          self._rows, key=lambda r: (order[r[1]], r[0])
      ):
        writer.writerow([id_, split, names[label], patient])

  def summary(self) -> dict[str, Any]:
    """The JSON summary of the build (after the examples were written)."""
    names = self.listing.class_names
    config = self.builder_config
    per_class = {s: dict.fromkeys(names, 0) for s in splits_lib.SPLITS}
    patients = {s: set() for s in splits_lib.SPLITS}
    for _, split, label, patient in self._rows:
      per_class[split][names[label]] += 1
      if patient:
        patients[split].add(patient)
    has_patients = any(patients.values())
    ignored = self.listing.ignored
    return {
        'name': self.name,
        'version': str(self.version),
        'config': config.name,
        'class_names': list(names),
        'num_examples': {
            s: sum(per_class[s].values()) for s in splits_lib.SPLITS
        },
        'examples_per_class': per_class,
        'patients': (
            {s: len(patients[s]) for s in splits_lib.SPLITS}
            if has_patients
            else None
        ),
        'split_method': self._split_method,
        'seed': config.seed,
        'min_side': config.min_side,
        'num_skipped': len(self._skipped),
        'skipped': [{'path': p, 'reason': r} for p, r in self._skipped],
        'num_ignored': len(ignored),
        'ignored_examples': list(ignored[:20]),
        'manual_dir': config.manual_dir,
        'source': self.listing.source,
        'data_dir': os.fspath(self._final_dir),
        'splits_csv': os.path.join(os.fspath(self._final_dir), SPLITS_CSV),
    }
