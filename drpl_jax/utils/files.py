"""Workdir I/O through etils.epath, so a workdir may be local or gs://."""

from __future__ import annotations

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
