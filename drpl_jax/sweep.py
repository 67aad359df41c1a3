"""Entry point of `python -m drpl_jax.sweep`.

Runs `main` of drpl_jax/reproduce/sweep.py, where the command is documented.
"""

import sys

from drpl_jax.reproduce.sweep import main

if __name__ == '__main__':
  sys.exit(main())
