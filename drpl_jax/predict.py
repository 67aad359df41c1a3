"""Entry point of `python -m drpl_jax.predict` (and `drpl-predict`).

Runs `run` of drpl_jax/evaluation/predict.py, where the command is documented.
"""

from drpl_jax.evaluation.predict import run

if __name__ == '__main__':
  run()
