"""Entry point: `python -m drpl_jax.reproduce` (see drpl_jax/reproduce/cli.py)."""

import sys

from drpl_jax.reproduce.cli import main

if __name__ == '__main__':
  sys.exit(main())
