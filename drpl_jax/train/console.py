"""What a person reads on the console while a command runs.

By default a run prints one progress line per log interval (rewritten in
place with '\\r' when stdout is a terminal, one plain line each otherwise),
one line per evaluation, where its outputs went and its final JSON summary;
libraries' INFO logging is off (drpl_jax/cli.py). These lines go to stdout
from process 0 only, whatever the logging verbosity, so that launchers and
people read the same thing.
"""

from __future__ import annotations

import sys

import jax

_state = {'in_place': False}


def _is_tty() -> bool:
  try:
    return sys.stdout.isatty()
  except (AttributeError, ValueError):
    return False


def format_eta(seconds: float) -> str:
  """`1h02m`, `3m05s` or `12s`: the time left, to the second."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


def progress(
    step: int, total: int, images_per_s: float, loss: float, eta_s: float
) -> None:
  """The progress line of a log interval."""
  text = (
      f'step {step}/{total}  {images_per_s:,.1f} images/s  '
      f'loss {loss:.4f}  ETA {format_eta(eta_s)}'
  )
  if jax.process_index() != 0:
    return
  if _is_tty():
    sys.stdout.write('\r' + text + '\033[K')
    sys.stdout.flush()
    _state['in_place'] = True
  else:
    print(text, flush=True)


def line(text: str) -> None:
  """One whole line (an evaluation, where outputs went) from process 0."""
  if jax.process_index() != 0:
    return
  if _state['in_place']:  # end the progress line being rewritten
    sys.stdout.write('\n')
    _state['in_place'] = False
  print(text, flush=True)
