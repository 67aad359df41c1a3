"""Everything that imports torch, torchvision or timm (and only here).

`torch_io` reads and writes state-dict files (torch only for .pth);
`torch_data` and `train_teacher` fine-tune the torchvision teacher;
`torchvision_models` builds it and loads checked state dicts;
`soft_labels` writes (and reads) offline teacher logits; `convert` is the
parity-checking converter command; `twin` is the PyTorch twin of the model
and `compare` the JAX-vs-PyTorch benchmark. Modules imported by torch-free
code (`torch_io`, `soft_labels`) import torch inside functions only.
"""

import os

# libgomp's default spin-waiting makes PyTorch's CPU threads lose a whole
# scheduler slice at every barrier when the cores are shared (another
# process, a JAX run, a test worker), which made teacher epochs an order of
# magnitude slower here (docs/reproduction.md). Passive waiting is set before torch (and its OpenMP runtime) is first
# imported, which in this package happens only below this point; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
