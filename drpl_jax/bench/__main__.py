"""Dispatches `python -m drpl_jax.bench SUBCOMMAND [flags]`.

Add a subcommand by writing `drpl_jax/bench/<name>.py` with `main(argv)` and
one entry (a function importing it lazily) in `SUBCOMMANDS`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def _input(argv: Sequence[str]) -> None:
  # pylint: disable-next=g-import-not-at-top
  from drpl_jax.bench import input as input_bench
  input_bench.main(argv)


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    'input': _input,
    'eval': lambda a: __import__('drpl_jax.bench.eval').bench.eval.main(a),
    'train': lambda a: __import__('drpl_jax.bench.train').bench.train.main(a),
    'compare': lambda a: __import__(
        'drpl_jax.bench.compare').bench.compare.main(a),
    'teacher': lambda a: __import__(
        'drpl_jax.bench.teacher').bench.teacher.main(a),
}


def main(argv: Sequence[str]) -> int:
  """Runs the subcommand named by argv[0] with the remaining arguments."""
  if not argv or argv[0] not in SUBCOMMANDS:
    got = repr(argv[0]) if argv else 'nothing'
    print(f'usage: python -m drpl_jax.bench {{{",".join(SUBCOMMANDS)}}} '
          f'[flags]; got {got}', file=sys.stderr)
    return 2
  SUBCOMMANDS[argv[0]](list(argv[1:]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
