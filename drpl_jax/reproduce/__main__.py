"""Entry point of `python -m drpl_jax.reproduce`.

Runs `run` of drpl_jax/reproduce/cli.py, where the command is documented.
"""

from drpl_jax.reproduce.cli import run

if __name__ == '__main__':
  run()
