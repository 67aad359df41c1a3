"""Dispatches `python -m drpl_jax.bench SUBCOMMAND [flags]`.

Add a subcommand by writing `drpl_jax/bench/<name>.py` with
`define_flags(flag_values)` and an absl `main(argv)`, and one entry
`_absl('<name>')` in `SUBCOMMANDS`.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags

from drpl_jax import cli

# pylint: disable=g-import-not-at-top


def _absl(name: str) -> Callable[[Sequence[str]], None]:
  """Runs drpl_jax/bench/<name>.py as an absl command: its flags defined on
  absl's global flags, `main` under the exit policy of drpl_jax/cli.py."""

  def run(argv: Sequence[str]) -> None:
    import importlib

    module = importlib.import_module(f'drpl_jax.bench.{name}')
    full = [f'drpl-bench {name}', *argv]
    module.define_flags(sys_argv=full)
    # --help lists the flags of the subcommand (defined in its module and in
    # drpl_jax/bench/__init__.py) as this module's own.
    flags.adopt_module_key_flags(module)
    flags.adopt_module_key_flags(sys.modules['drpl_jax.bench'])
    app.run(
        _guarded(module.main), argv=full, flags_parser=cli._parse_flags
    )  # pylint: disable=protected-access

  return run


def _guarded(
    main: Callable[[Sequence[str]], None],
) -> Callable[[Sequence[str]], None]:
  """`main` under cli.py's exit policy (a UserError: one `error:` line,
  exit 2). Not `cli.run`: its quieting imports TensorFlow, which the
  benchmarks must not (they record `tensorflow_imported`)."""

  def guarded(argv: Sequence[str]) -> None:
    if not flags.FLAGS['verbosity'].present:
      flags.FLAGS.verbosity = -1  # WARNING, as cli.quiet_libraries
    try:
      main(argv)
    except cli.UserError as e:
      cli.fail(e)

  return guarded


def _compare(argv: Sequence[str]) -> None:
  # PyTorch side (needs torch); parses its own arguments.
  from drpl_jax.pytorch import compare as bench

  bench.main(argv)


# pylint: enable=g-import-not-at-top

# Each subcommand imports its module only when run (the GPU machines lack
# TensorFlow, and `compare` needs torch).
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    'input': _absl('input'),
    'train': _absl('train'),
    'eval': _absl('eval'),
    'teacher': _absl('teacher'),
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
    print(
        f'usage: python -m drpl_jax.bench {{{",".join(SUBCOMMANDS)}}} '
        f'[flags]; got {got}',
        file=sys.stderr,
    )
    return 2
  from drpl_jax.parallel import hostmem  # pylint: disable=g-import-not-at-top

  hostmem.configure()  # before JAX starts its CPU client
  SUBCOMMANDS[argv[0]](list(argv[1:]))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
