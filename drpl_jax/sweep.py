"""Entry point of `python -m drpl_jax.sweep`.

Runs `run` of drpl_jax/reproduce/sweep.py, where the command is documented.
"""

from drpl_jax.reproduce.sweep import run

if __name__ == '__main__':
  run()
