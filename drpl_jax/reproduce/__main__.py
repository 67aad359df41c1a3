"""Entry point of `python -m drpl_jax.reproduce`.

Runs `main` of drpl_jax/reproduce/cli.py, where the command is documented.
"""

import sys

from drpl_jax.reproduce.cli import main

if __name__ == '__main__':
  sys.exit(main())
