"""Dispatches `python -m drpl_jax.bench SUBCOMMAND [flags]`.

Add a subcommand by writing `drpl_jax/bench/<name>.py` with `main(argv)` and
one entry (a function importing it lazily) in `SUBCOMMANDS`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


# One function per subcommand, each importing its module only when run (the
# GPU machines lack TensorFlow, and `compare` needs torch).
# pylint: disable=g-import-not-at-top


def _input(argv: Sequence[str]) -> None:
  from drpl_jax.bench import input as bench
  bench.main(argv)


def _train(argv: Sequence[str]) -> None:
  from drpl_jax.bench import train as bench
  bench.main(argv)


def _eval(argv: Sequence[str]) -> None:
  from drpl_jax.bench import eval as bench
  bench.main(argv)


def _teacher(argv: Sequence[str]) -> None:
  from drpl_jax.bench import teacher as bench
  bench.main(argv)


def _compare(argv: Sequence[str]) -> None:
  from drpl_jax.pytorch import compare as bench
  bench.main(argv)


# pylint: enable=g-import-not-at-top

SUBCOMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    'input': _input,
    'train': _train,
    'eval': _eval,
    'teacher': _teacher,
    'compare': _compare,
}


HELP = f"""usage: python -m drpl_jax.bench {{{','.join(SUBCOMMANDS)}}} [flags]

Prints one JSON object per measurement on stdout.

  input     images/s per host CPU core of decode, train recipe, batching
  train     train step images/s on synthetic on-device batches
  eval      eval step images/s (and its ratio to the train step)
  teacher   the converted teacher's forward pass, alone and in the step
  compare   the same model and weights through JAX and the PyTorch twin

`python -m drpl_jax.bench SUBCOMMAND --help` lists a subcommand's flags."""


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the subcommand named by argv[0] (default sys.argv[1:])."""
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ('-h', '--help'):
    print(HELP)
    return 0
  if not argv or argv[0] not in SUBCOMMANDS:
    got = repr(argv[0]) if argv else 'nothing'
    print(f'usage: python -m drpl_jax.bench {{{",".join(SUBCOMMANDS)}}} '
          f'[flags]; got {got}', file=sys.stderr)
    return 2
  from drpl_jax.parallel import hostmem  # pylint: disable=g-import-not-at-top
  hostmem.configure()  # before JAX starts its CPU client
  SUBCOMMANDS[argv[0]](list(argv[1:]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
