"""CNN teachers ported from torchvision to Flax NNX, for distillation.

ResNet-18..152, DenseNet-121..201 and RegNetY-400MF..128GF with torchvision's
exact numerics and parameter names, so trained PyTorch weights convert
mechanically (`load_torch_weights`) and run inside the jitted train step.
Imports no torch, TensorFlow or clu; `load.torch_teacher` is the one-call
entry point from a checkpoint file.
"""

from drpl_jax.teacher.archs import TEACHER_ARCHS
from drpl_jax.teacher.archs import Teacher
from drpl_jax.teacher.archs import abstract_teacher
from drpl_jax.teacher.archs import arch_spec
from drpl_jax.teacher.archs import create_teacher
from drpl_jax.teacher.common import IMAGENET_MEAN
from drpl_jax.teacher.common import IMAGENET_STD
from drpl_jax.teacher.common import TeacherConfig
from drpl_jax.teacher.weights import canonical_state_dict
from drpl_jax.teacher.weights import load_torch_weights
from drpl_jax.teacher.weights import random_state_dict
from drpl_jax.teacher.weights import torch_key_shapes

__all__ = [
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'TEACHER_ARCHS',
    'Teacher',
    'TeacherConfig',
    'abstract_teacher',
    'arch_spec',
    'canonical_state_dict',
    'create_teacher',
    'load_torch_weights',
    'random_state_dict',
    'torch_key_shapes',
]
