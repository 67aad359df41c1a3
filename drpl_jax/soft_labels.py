"""Entry point of `python -m drpl_jax.soft_labels`.

Runs `run` of drpl_jax/pytorch/soft_labels.py, where the command is documented.
"""

from drpl_jax.pytorch.soft_labels import run

if __name__ == '__main__':
  run()
