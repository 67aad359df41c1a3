"""glibc malloc settings that keep XLA:CPU's per-call buffers resident.

XLA:CPU allocates the temporary buffers of an executable with malloc on
every call and frees them afterwards. With glibc's defaults, blocks of a
thread that is not the main thread come from per-thread arenas whose heaps
are at most 64 MiB, so every larger block is a fresh `mmap`: the kernel
page-faults and zero-fills each 4 KiB page on first touch and `munmap`s it
again at `free`: for a large train step, hundreds of thousands of minor
faults and a large share of kernel time per step, which the settings below
remove (figures in docs/performance.md). PyTorch's CPU allocator reuses its
blocks and does not pay this.

`configure()` sets, through `mallopt`:

- `M_ARENA_MAX` = 1: all threads share the main arena, which grows with
  `brk` and has no 64 MiB heap limit;
- `M_MMAP_MAX` = 0: large blocks come from that arena too, not from `mmap`;
- `M_TRIM_THRESHOLD` = -1: freed memory is not handed back to the kernel, so
  the next call reuses the same pages without faulting.

The price: the process keeps its peak heap (RSS does not shrink after the
largest step), and threads contend for one arena lock (the input pipeline's
small allocations; not measurable here). The arena limit only reaches
threads that have not allocated yet, so this must run before JAX creates
its CPU client (XLA's worker threads); entry points call it first thing.

`DRPL_JAX_HOST_MALLOC` = auto (default) | on | off. `auto` applies the
settings where JAX will compute on the CPU: no accelerator platform named in
`JAX_PLATFORMS` / `jax_platforms` and no accelerator plugin installed (GPU
and TPU programs keep their buffers in device memory).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import pkgutil

from absl import logging

ENV = 'DRPL_JAX_HOST_MALLOC'
MODES = ('auto', 'on', 'off')

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

_applied = False


def applied() -> bool:
  """Whether `configure` changed the allocator in this process."""
  return _applied


def _accelerator_expected() -> bool:
  """Whether JAX may pick a GPU or TPU, judged without starting JAX."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if not platforms:  # or set in code: jax.config.update('jax_platforms', ...)
    try:
      import jax  # pylint: disable=g-import-not-at-top

      platforms = jax.config.jax_platforms or ''
    except ImportError:
      pass
  if platforms:
    return any(p.strip() not in ('', 'cpu') for p in platforms.split(','))
  if list(importlib.metadata.entry_points(group='jax_plugins')):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top

    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  return importlib.util.find_spec('libtpu') is not None


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return xla_bridge.backends_are_initialized()


def configure(mode: str | None = None) -> bool:
  """Applies the settings per `mode` (default: $DRPL_JAX_HOST_MALLOC).

  Returns whether they were applied. Raises ValueError on an unknown mode;
  logs and returns False where they cannot take effect (not glibc, or JAX
  already started its backends).
  """
  global _applied
  mode = (mode if mode is not None else os.environ.get(ENV, 'auto')).lower()
  if mode not in MODES:
    raise ValueError(f'{ENV}={mode!r} is not one of {list(MODES)}')
  if _applied:
    return True
  if mode == 'off' or (mode == 'auto' and _accelerator_expected()):
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    logging.info('%s: not glibc; allocator left as is.', ENV)
    return False
  if _backends_started():
    logging.warning(
        "%s: JAX has already started its backends, so XLA's "
        'threads keep their own malloc arenas; allocator left as '
        'is. Call hostmem.configure() before the first JAX '
        'computation.',
        ENV,
    )
    return False
  libc = ctypes.CDLL(None)
  for param, value in SETTINGS:
    if libc.mallopt(param, value) != 1:
      logging.warning(
          '%s: mallopt(%d, %d) failed; allocator left as is.', ENV, param, value
      )
      return False
  _applied = True
  logging.info(
      '%s: glibc malloc tuned for XLA:CPU (one arena, no mmap, no trim).',
      ENV,
  )
  return True
