"""Entry point of `python -m drpl_jax.convert` (drpl_jax/pytorch/convert.py).

Also keeps the stable import paths of DESIGN section 7:
`drpl_jax.convert.torch_teacher` and `drpl_jax.convert.student_from_timm`.
"""

from drpl_jax.pytorch.convert import run
from drpl_jax.teacher.load import torch_teacher as torch_teacher
from drpl_jax.train.student_init import student_from_timm as student_from_timm

if __name__ == '__main__':
  run()
