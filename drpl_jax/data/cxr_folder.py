"""`cxr_folder`: the user's own chest X-rays, as class folders or a manifest.

Two layouts under `manual_dir`:

* Class folders: `manual_dir/<class>/*.png` or `manual_dir/<class>/images/
  *.png` (when `images/` exists it is used, so `masks/` next to it are
  ignored). Only files directly in that folder are read. Class names are the
  sorted folder names.
* `manual_dir/manifest.csv` with columns `path,label` and optionally
  `patient_id` and `split` (`train`, `validation`/`val`, `test`). Paths are
  relative to `manual_dir` (or absolute). Class names are the sorted labels.
  A row whose file is missing is skipped and listed; a label that is not one
  of fixed `classes=` is an error.

`classes=` fixes the class order (label index = position) and, for folders,
selects a subset. Splits: the manifest's `split` column when present (on every
row); otherwise grouped by patient when any row has a patient id (no patient
in two splits; greedy, see `drpl_jax.data.splits.grouped_split`); otherwise
stratified 80/10/10 by class. Example ids are paths relative to `manual_dir`.
"""

import csv
import os

from drpl_jax.data import builder
from drpl_jax.data import files
from drpl_jax.data import splits as splits_lib
from drpl_jax.data.files import DataError

MANIFEST = 'manifest.csv'

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put your images in manual_dir as one folder per class (`<class>/*.png` or
`<class>/images/*.png`), or write `{MANIFEST}` there with the columns
`path,label` and optionally `patient_id` and `split`. PNG and JPEG, 8- or
16-bit grayscale, RGB, RGBA or palette images are accepted.
"""


def _class_folder(tree: files.LocalTree, name: str) -> str:
  images_dir = files.join(name, 'images')
  return images_dir if tree.is_dir(images_dir) else name


def list_folders(
    manual_dir: str, classes: tuple[str, ...] | None
) -> builder.Listing:
  """Lists the class-folder layout (validating it first)."""
  tree = files.LocalTree(manual_dir)
  found = files.visible_dirs(tree)
  if not found:
    raise DataError(
        f'cxr_folder: {manual_dir} has no class folders and no '
        f'{MANIFEST}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}'
    )
  names = tuple(classes) if classes else tuple(found)
  unknown = [c for c in names if c not in found]
  if unknown:
    raise DataError(
        f'cxr_folder: unknown classes {unknown}: no such folder '
        f'in {manual_dir} (folders: {found})'
    )
  return builder.list_class_folders(
      'cxr_folder',
      tree,
      names,
      lambda name: _class_folder(tree, name),
      source=manual_dir,
  )


def _read_manifest(path: str) -> list[dict[str, str]]:
  """The manifest rows, with the required columns checked."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ('path', 'label') if c not in columns]
    if missing:
      raise DataError(f'{path}: missing column(s) {missing}; found {columns}')
    return [
        {(k or '').strip(): (v or '').strip() for k, v in row.items()}
        for row in reader
    ]


def _row_split(row: dict[str, str], where: str) -> str:
  try:
    return splits_lib.normalise_split_name(row['split'])
  except ValueError as e:
    raise DataError(f'{where}: {e}') from None


def list_manifest(
    manual_dir: str, classes: tuple[str, ...] | None
) -> builder.Listing:
  """Lists the manifest layout (validating every row first)."""
  manifest = os.path.join(manual_dir, MANIFEST)
  rows = _read_manifest(manifest)
  if not rows:
    raise DataError(f'{manifest}: no rows')
  for number, row in enumerate(rows, start=2):
    if not row['path'] or not row['label']:
      raise DataError(f'{manifest} line {number}: empty path or label')
  labels = sorted({row['label'] for row in rows})
  names = tuple(classes) if classes else tuple(labels)
  index = {name: i for i, name in enumerate(names)}
  has_split = any(row.get('split') for row in rows)
  items, skipped = [], []
  for number, row in enumerate(rows, start=2):
    where = f'{manifest} line {number}'
    if row['label'] not in index:
      raise DataError(
          f'{where}: label {row["label"]!r} is not one of the '
          f'classes {list(names)}'
      )
    split = _row_split(row, where) if has_split else ''
    path = os.path.join(manual_dir, row['path'])
    rel = os.path.relpath(path, manual_dir).replace(os.sep, '/')
    example_id = row['path'] if rel.startswith('../') else rel
    if not os.path.isfile(path):
      skipped.append((path, f'file not found ({where})'))
      continue
    items.append(
        builder.Item(
            id=example_id,
            label=index[row['label']],
            ref=files.LocalFile(path),
            patient_id=row.get('patient_id', ''),
            split=split,
        )
    )
  return builder.Listing(
      class_names=names,
      items=tuple(items),
      skipped=tuple(skipped),
      source=manifest,
  )


class CxrFolder(builder.CxrBuilder, skip_registration=True):
  """The user's chest X-rays: class folders or manifest (module docstring)."""

  name = 'cxr_folder'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _list(self) -> builder.Listing:
    manual_dir = self.builder_config.manual_dir
    tree = files.open_tree(manual_dir)
    if not isinstance(tree, files.LocalTree):
      raise DataError(f'cxr_folder: manual_dir {manual_dir} must be a folder')
    if os.path.isfile(os.path.join(manual_dir, MANIFEST)):
      return list_manifest(manual_dir, self.builder_config.classes)
    return list_folders(manual_dir, self.builder_config.classes)
