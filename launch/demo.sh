#!/usr/bin/env bash
# Sets up .venv and runs the demo: prepare the bundled digits data set,
# train a micro DRPL-ViT, evaluate it, print where the report is.
# Usage: launch/demo.sh [WORKDIR]   (default /tmp/drpl_demo)
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/drpl_demo}"
bash launch/setup.sh data
exec .venv/bin/python -m drpl_jax.main --config=configs/demo.py \
    --workdir="${workdir}" --config.data.data_dir="${workdir}/data"
