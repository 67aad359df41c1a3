"""What every command line shares: its common flags and one exit policy.

One idea has one flag name in every command: `--workdir` (the training
run's directory), `--batch_size`, `--step` (a checkpoint step, default the
latest), `--ema` (the EMA weights), and absl's own `--verbosity`. They are
defined here once (`define_*`), so the spelling and the help text cannot
drift apart; every command is an absl command.

`run(main)` runs an absl command so that bad user input ends in one line
`error: ...` naming the file, key or value on stderr and exit status 2, with
no traceback: a `UserError` (or the exception types a command names as
bad input, to `run` or around a call with `user_errors`) raised by `main`,
and a flag that does not parse (an unknown `--config.KEY`, a value of the
wrong type, a missing required flag). `flag_values` passes flags on to the
keywords of the same name.

Unless `--verbosity` is given, `run` also keeps the console for what a
person needs (`quiet_libraries`; drpl_jax/train/console.py prints it).

`UserError` lives in drpl_jax/utils/errors.py (re-exported here), so that
library modules raise it without importing the command line; this module
defines flags only when a command calls its `define_*` functions.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags

from drpl_jax.utils.errors import UserError  # re-exported: cli.UserError

EXIT_USER_ERROR = 2

WORKDIR_HELP = "The training run's directory (checkpoints, logs, reports)."
STEP_HELP = 'Checkpoint step (default: the latest).'
EMA_HELP = 'Use the EMA weights of the run.'
BATCH_SIZE_HELP = 'Batch size.'


def define_workdir(
    help_text: str = WORKDIR_HELP, required: bool = True
) -> flags.FlagHolder:
  """Defines absl's `--workdir`."""
  return flags.DEFINE_string('workdir', None, help_text, required=required)


def define_step(help_text: str = STEP_HELP) -> flags.FlagHolder:
  """Defines absl's `--step` (None: the latest checkpoint)."""
  return flags.DEFINE_integer('step', None, help_text)


def define_ema(help_text: str = EMA_HELP) -> flags.FlagHolder:
  """Defines absl's `--ema` (a boolean, `--ema` / `--noema`)."""
  return flags.DEFINE_bool('ema', False, help_text)


def define_batch_size(
    default: int, help_text: str = BATCH_SIZE_HELP
) -> flags.FlagHolder:
  """Defines absl's `--batch_size`."""
  return flags.DEFINE_integer('batch_size', default, help_text)


def flag_values(*names: str) -> dict[str, Any]:
  """`{name: value}` of the named flags: the keywords of a function whose
  parameters have the names and the meaning of the command's flags."""
  return {name: flags.FLAGS[name].value for name in names}


@contextlib.contextmanager
def user_errors(types: tuple[type[BaseException], ...]) -> Iterator[None]:
  """Re-raises an exception of `types` from the block as a `UserError`
  with its message: what a library call raises on bad input becomes a
  command's one-line error (see `run`)."""
  try:
    yield
  except types as e:  # pylint: disable=catching-non-exception
    raise UserError(str(e)) from e


def fail(message: object) -> None:
  """Prints `error: message` (its first line) to stderr and exits 2."""
  line = (
      str(message).strip().splitlines()[0]
      if str(message).strip()
      else (type(message).__name__)
  )
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported under the exit policy."""
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown key
    fail(_unknown_config_key(argv, e))
  _check_config_files()
  return rest


def _check_config_files() -> None:
  """Loads each `config_flags` config now: a file that is missing or fails
  to load is bad input, named with the flag, not a traceback in `main`."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not flag.present or not hasattr(flag, 'config_filename'):
      continue
    try:  # a config that failed to load raises on its first attribute
      getattr(flag.value, 'get', None)
    except OSError as e:  # ml_collections' report: the cause is last
      lines = [t.strip() for t in str(e).splitlines() if t.strip()]
      fail(f'--{name}={flag.config_filename}: cannot load it: {lines[-1]}')


def _unknown_config_key(argv: Sequence[str], error: Exception) -> str:
  """Names the `--config.KEY` override whose key the config lacks."""
  name = str(error).strip('"\' ')
  for arg in argv:
    key = arg[len('--config.') :].partition('=')[0]
    if arg.startswith('--config.') and name in key.split('.'):
      return (
          f'--config.{key}: the config has no key {name!r} '
          '(see the config file for the keys it has)'
      )
  return f'a --config.KEY flag names a key the config lacks: {error}'


def quiet_libraries(tensorflow: bool = True) -> None:
  """Silences library chatter unless `--verbosity` was given.

  absl's INFO logging (orbax, TFDS, grain, our own details) is off: the
  level becomes WARNING, so warnings and errors still show. TensorFlow's C++
  INFO and WARNING lines are off through TF_CPP_MIN_LOG_LEVEL, which must be
  set before TensorFlow is imported (the commands import it lazily, after
  this). `--verbosity=0` (INFO) or higher shows all of it again.
  `tensorflow=False`: a command that never imports TensorFlow (the
  benchmarks, the reproduction's bookkeeping) skips its quiet import.
  """
  if flags.FLAGS['verbosity'].present:
    return
  flags.FLAGS.verbosity = -1  # WARNING; absl.app.run had raised it to INFO
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if tensorflow:
    _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow (when installed) with stderr's file descriptor
  pointed away: its import prints C++ INFO lines (oneDNN, CPU features)
  that TF_CPP_MIN_LOG_LEVEL does not reach (tensorflow issue 100442).
  Python errors of the import still show; they are raised after."""
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      importlib.import_module('tensorflow')
    except ImportError:
      pass  # the accelerator machines have none; nothing to silence
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def run(
    main: Callable[[Sequence[str]], object],
    user_errors: tuple[type[BaseException], ...] = (UserError,),
    *,
    positional: bool = True,
    argv: Sequence[str] | None = None,
    tensorflow: bool = True,
) -> None:
  """Runs an absl `main` under the exit policy (see the module docstring).

  `user_errors`: the exception types that mean bad input; anything else is
  a bug and keeps its traceback. `positional=False`: the command takes only
  flags, and a positional argument is bad input. `argv`: the command line
  (default sys.argv), for a command run under a dispatcher. `tensorflow`:
  see `quiet_libraries`.
  """

  def guarded(args: Sequence[str]) -> object:
    quiet_libraries(tensorflow)
    if not positional and len(args) > 1:
      fail(
          f'unexpected arguments: {list(args[1:])} (this command takes '
          'only --flags)'
      )
    try:
      return main(args)
    except user_errors as e:  # pylint: disable=catching-non-exception
      fail(e)

  app.run(
      guarded,
      argv=None if argv is None else list(argv),
      flags_parser=_parse_flags,
  )
