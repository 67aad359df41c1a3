"""Entry point of `python -m drpl_jax.export`.

Runs `main` of drpl_jax/evaluation/export.py, where the command is documented.
"""

import sys

from drpl_jax.evaluation.export import main

if __name__ == '__main__':
  sys.exit(main())
