"""Entry point of `python -m drpl_jax.convert`.

Runs `main` of drpl_jax/pytorch/convert.py, where the command is documented.
"""

import sys

from drpl_jax.pytorch.convert import main

if __name__ == '__main__':
  sys.exit(main())
