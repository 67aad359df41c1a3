"""Workdir I/O through etils.epath, so a workdir may be local or gs://."""

from __future__ import annotations

import json
import os
import uuid

from etils import epath


def atomic_write(path: epath.PathLike, data: bytes | str) -> str:
  """Writes `data` to a temporary sibling of `path`, then renames it.

  A reader sees the old file or the new one, never a part; the temporary
  file is removed if the write fails. Returns the path as a string.
  """
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex}'
  try:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return os.fspath(path)


META_FILE = 'meta.json'


def read_meta(workdir: epath.PathLike) -> dict:
  """A training run's metadata, `workdir/meta.json` (local or gs://).

  Raises FileNotFoundError naming the file when the run has none.
  """
  path = epath.Path(workdir) / META_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found')
  return json.loads(path.read_text())
