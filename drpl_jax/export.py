"""Entry point of `python -m drpl_jax.export` (and `drpl-export`).

Runs `run` of drpl_jax/evaluation/export.py, where the command is documented.
"""

from drpl_jax.evaluation.export import run

if __name__ == '__main__':
  run()
