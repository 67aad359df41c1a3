"""Training: the jitted step and the loop around it.

`step` is the jitted train / eval step (losses from `losses`, Mixup/CutMix
from `mixup`); `optim` builds the AdamW schedule; `loop` builds the state,
runs steps, evaluates and checkpoints (`checkpointing`); `student_init`
starts the student from pretrained weights; `preflight` checks a config
before any work. `step`, `losses`, `mixup` and `optim` import no TensorFlow,
TFDS, clu or torch.
"""
