"""Entry point of `python -m drpl_jax.train_teacher`.

Runs `run` of drpl_jax/pytorch/train_teacher.py, where the command is documented.
"""

from drpl_jax.pytorch.train_teacher import run

if __name__ == '__main__':
  run()
