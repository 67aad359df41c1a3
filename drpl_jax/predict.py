"""Entry point of `python -m drpl_jax.predict`.

Runs `main` of drpl_jax/evaluation/predict.py, where the command is documented.
"""

import sys

from drpl_jax.evaluation.predict import main

if __name__ == '__main__':
  sys.exit(main())
