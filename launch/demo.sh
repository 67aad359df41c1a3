#!/usr/bin/env bash
# Sets up .venv and runs the whole system on the bundled demo data (digits,
# prepared through a TFDS builder): fine-tune a ResNet-18 teacher in PyTorch,
# convert it to Flax, distill a micro DRPL-ViT from it online, evaluate both,
# and print the accuracies and where the report is.
# Usage: launch/demo.sh [WORKDIR]   (default /tmp/drpl_demo). Rerunning
# reuses what exists (the teacher, the data, the latest checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/drpl_demo}"
bash launch/setup.sh data,torch
teacher="${workdir}/teacher/resnet18.safetensors"
if [[ ! -f "${teacher}" ]]; then
  .venv/bin/python -m drpl_jax.train_teacher --config=configs/demo.py \
      --arch resnet18 --out "${teacher}" --epochs 2 \
      --config.data.data_dir="${workdir}/data"
fi
exec .venv/bin/python -m drpl_jax.main \
    --config=configs/demo.py:teacher="${teacher}" \
    --workdir="${workdir}" --config.data.data_dir="${workdir}/data"
