#!/usr/bin/env bash
# Trains and evaluates DRPL-ViT in one process on this machine: the CPU, or
# one GPU (the first visible one; choose another with LOCAL_GPU=N).
#
#   launch/local.sh CONFIG WORKDIR [OVERRIDE...]
#   launch/local.sh configs/demo.py /tmp/drpl_demo total_steps=50
#   JAX_PLATFORMS=cpu launch/local.sh configs/drpl_vit.py:variant=micro \
#       /tmp/run --config.batch_size=32
#
# CONFIG is FILE[:ARGS] (relative to here or to the repo root); WORKDIR a
# local path or gs://bucket/dir (checkpoints there resume the run).
# OVERRIDE is key=value (becomes --config.key=value) or a --flag passed
# through unchanged. Environment: PYTHON (default: the repo's .venv),
# LOCAL_GPU (default 0), DRPL_DRY_RUN=1 prints the command instead of running
# it. DRPL_DISTRIBUTED=0 is set so that no multi-process start is attempted
# (e.g. inside a SLURM allocation).
#
# Tried here: the dry run and the command it prints, on a 2-core CPU machine
# with no GPU. Not tried: a GPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

usage() {
  [[ -n "${1:-}" ]] && echo "local.sh: $1" >&2
  echo "usage: launch/local.sh CONFIG WORKDIR" \
      "[key=value | --config.key=value]..." >&2
  exit 2
}

[[ $# -ge 2 ]] || usage "need CONFIG and WORKDIR"
drpl_resolve_config "$1"
drpl_check_workdir "$2"
workdir="$2"
shift 2
drpl_overrides "$@"

# One GPU: the first of those already visible, or LOCAL_GPU.
gpu="${LOCAL_GPU:-${CUDA_VISIBLE_DEVICES:-0}}"
gpu="${gpu%%,*}"
[[ "${gpu}" =~ ^-?[0-9]+$|^(GPU|MIG)- ]] \
    || usage "LOCAL_GPU='${gpu}' is not a GPU index"

cmd=(env DRPL_DISTRIBUTED=0 "CUDA_VISIBLE_DEVICES=${gpu}"
     "$(drpl_python)" -m drpl_jax.main "--config=${DRPL_CONFIG}"
     "--workdir=${workdir}" ${DRPL_OVERRIDES[@]+"${DRPL_OVERRIDES[@]}"})
if [[ "${DRPL_DRY_RUN:-0}" == 1 ]]; then
  drpl_show "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
