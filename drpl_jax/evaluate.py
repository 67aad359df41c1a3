"""Entry point of `python -m drpl_jax.evaluate`.

Runs `run` of drpl_jax/evaluation/evaluate.py, where the command is documented.
"""

from drpl_jax.evaluation.evaluate import run

if __name__ == '__main__':
  run()
