"""Where example files live: a local folder tree or the members of a zip.

The builders discover their layout through `Tree` (`LocalTree` or `ZipTree`),
so a Kaggle zip is read in place, member by member, without extracting it.
"""

import dataclasses
import os
import posixpath
import threading
import zipfile

from drpl_jax.data import images


class DataError(ValueError):
  """Bad input to a data set build; the message names the file, key or value.

  Raised before any work is done (validate first, then build). The CLI turns
  it into exit code 2 and a one-line message.
  """


_zip_handles = threading.local()


@dataclasses.dataclass(frozen=True)
class LocalFile:
  """A file on the local file system."""

  path: str

  @property
  def display(self) -> str:
    return self.path

  def read(self) -> bytes:
    with open(self.path, 'rb') as f:
      return f.read()


@dataclasses.dataclass(frozen=True)
class ZipMember:
  """A member of a zip archive, read with a per-thread archive handle."""

  archive: str
  member: str

  @property
  def display(self) -> str:
    return f'{self.archive}:{self.member}'

  def read(self) -> bytes:
    handles = getattr(_zip_handles, 'open', None)
    if handles is None:
      handles = _zip_handles.open = {}
    if self.archive not in handles:
      handles[self.archive] = zipfile.ZipFile(self.archive)
    return handles[self.archive].read(self.member)


FileRef = LocalFile | ZipMember


def _hidden(name: str) -> bool:
  return name.startswith('.') or name == '__MACOSX'


class LocalTree:
  """A folder on disk; paths inside it are '/'-separated and relative."""

  def __init__(self, root: str):
    self.root = root
    self.description = root

  def _abs(self, rel: str) -> str:
    return os.path.join(self.root, *rel.split('/')) if rel else self.root

  def is_dir(self, rel: str) -> bool:
    return os.path.isdir(self._abs(rel))

  def is_file(self, rel: str) -> bool:
    return os.path.isfile(self._abs(rel))

  def listdir(self, rel: str = '') -> tuple[list[str], list[str]]:
    """Returns sorted (sub-folder names, file names) of `rel`."""
    dirs, files = [], []
    with os.scandir(self._abs(rel)) as entries:
      for entry in entries:
        (dirs if entry.is_dir() else files).append(entry.name)
    return sorted(dirs), sorted(files)

  def ref(self, rel: str) -> FileRef:
    return LocalFile(self._abs(rel))


class ZipTree:
  """The member tree of a zip archive (folders implied by member paths)."""

  def __init__(self, archive: str):
    self.root = archive
    self.description = archive
    try:
      with zipfile.ZipFile(archive) as zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f'{archive}: not a readable zip archive ({e})') from None
    self._dirs: dict[str, set[str]] = {'': set()}
    self._files: dict[str, list[str]] = {'': []}
    for name in names:
      parts = name.strip('/').split('/')
      for depth in range(len(parts)):
        parent = '/'.join(parts[:depth])
        self._dirs.setdefault(parent, set())
        self._files.setdefault(parent, [])
        if depth < len(parts) - 1:
          self._dirs[parent].add(parts[depth])
      self._files['/'.join(parts[:-1])].append(parts[-1])

  def is_dir(self, rel: str) -> bool:
    return rel in self._dirs

  def is_file(self, rel: str) -> bool:
    parent, name = posixpath.split(rel)
    return name in self._files.get(parent, ())

  def listdir(self, rel: str = '') -> tuple[list[str], list[str]]:
    """Returns sorted (sub-folder names, file names) of `rel`."""
    return sorted(self._dirs.get(rel, ())), sorted(self._files.get(rel, ()))

  def ref(self, rel: str) -> FileRef:
    return ZipMember(self.root, rel)


Tree = LocalTree | ZipTree


def join(*parts: str) -> str:
  """Joins tree-relative path parts with '/', skipping empty ones."""
  return '/'.join(p for p in parts if p)


def list_images(tree: Tree, rel: str) -> tuple[list[str], list[str]]:
  """Lists the image files directly in folder `rel` of `tree`.

  Returns:
    (image paths, ignored paths), both relative to the tree root and sorted.
    Ignored are hidden files (e.g. `.DS_Store`, macOS `._*` forks) and files
    without an image extension; builders count and report them.
  """
  _, files = tree.listdir(rel)
  found, ignored = [], []
  for name in files:
    path = join(rel, name)
    if _hidden(name) or not images.is_image_path(name):
      ignored.append(path)
    else:
      found.append(path)
  return found, ignored


def visible_dirs(tree: Tree, rel: str = '') -> list[str]:
  """Sub-folder names of `rel`, without hidden folders and `__MACOSX`."""
  return [d for d in tree.listdir(rel)[0] if not _hidden(d)]


def open_tree(path: str) -> Tree:
  """A tree for a folder or a `.zip` file; DataError if `path` is missing."""
  if not path:
    raise DataError(
        'manual_dir is empty: give the folder (or .zip) that holds the data'
    )
  if not os.path.exists(path):
    raise DataError(f'manual_dir {path} does not exist')
  if os.path.isdir(path):
    return LocalTree(path)
  if path.lower().endswith('.zip'):
    return ZipTree(path)
  raise DataError(f'manual_dir {path} is neither a folder nor a .zip file')


def zips_in(folder: str) -> list[str]:
  """The `.zip` files directly inside `folder`, sorted."""
  return sorted(
      os.path.join(folder, n)
      for n in os.listdir(folder)
      if n.lower().endswith('.zip')
      and not _hidden(n)
      and os.path.isfile(os.path.join(folder, n))
  )
