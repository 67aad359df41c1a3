"""The exception type that means bad user input.

Library code raises `UserError` with a message naming the flag, file, key or
value; the command lines (drpl_jax/cli.py, which re-exports it) turn it into
one `error: ...` line and exit status 2. It lives here, not in cli.py, so
that library modules need not import the command-line module.
"""

from __future__ import annotations


class UserError(ValueError):
  """Bad user input; the message names the flag, file, key or value."""
