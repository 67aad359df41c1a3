"""drpl_jax.parallel.hostmem: glibc malloc settings for XLA:CPU's per-call buffers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from drpl_jax.parallel import hostmem

# Runs in a fresh process (the settings must precede JAX's CPU client):
# a jitted program with a 256 MiB temporary, called repeatedly; prints the
# minor page faults per call after warm-up (the fewest of three windows).
_PROBE = textwrap.dedent("""
    import json, resource
    from drpl_jax.parallel import hostmem
    applied = hostmem.configure()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
      y = jnp.outer(x, x)  # [8192, 8192] float32 temporary
      return jnp.sum(jnp.tanh(y) @ y[:, :8], axis=1)

    x = jnp.linspace(0, 1, 8192)
    for _ in range(3):
      f(x).block_until_ready()
    windows = []  # the quietest of three windows: robust to a busy host
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(8):
        f(x).block_until_ready()
      windows.append(
          (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
    faults = min(windows)
    print(json.dumps({'applied': applied, 'faults': faults}))
""")


def _probe(mode: str) -> dict:
  env = dict(os.environ, DRPL_JAX_HOST_MALLOC=mode, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(
      [sys.executable, '-c', _PROBE],
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_tuned_allocator_stops_refaulting_xla_temporaries():
  """Untuned, every call faults its 256 MiB temporary in afresh."""
  off, on = _probe('off'), _probe('on')
  assert not off['applied'] and on['applied']
  assert off['faults'] > 0.8 * (256 << 20) / 4096, off  # each page, each call
  assert on['faults'] < 0.5 * off['faults'], (on, off)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc')
def test_auto_follows_the_platform():
  assert _probe('auto')['applied']  # JAX_PLATFORMS=cpu


def test_accelerator_detection(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert hostmem._accelerator_expected()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert not hostmem._accelerator_expected()


def test_bad_mode_is_named(monkeypatch):
  with pytest.raises(ValueError, match='DRPL_JAX_HOST_MALLOC.*fast'):
    hostmem.configure('fast')
  monkeypatch.setenv('DRPL_JAX_HOST_MALLOC', 'always')
  with pytest.raises(ValueError, match="'always'"):
    hostmem.configure()


def test_too_late_is_refused(caplog):
  """In a process whose JAX backends are up, the arena limit cannot act."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.devices()
  assert not hostmem.applied()
  assert not hostmem.configure('on')
  assert 'already started' in caplog.text
  assert not hostmem.configure('off')
