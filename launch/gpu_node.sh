#!/usr/bin/env bash
# Trains and evaluates DRPL-ViT on one multi-GPU node: ONE process drives all
# the node's GPUs (JAX's single controller per host; no torchrun-style
# process per GPU). The batch is split over every GPU by the mesh
# (config.mesh_shape, default (-1, 1): pure data parallel; e.g.
# mesh_shape='(2,4)' adds 4-way FSDP). config.batch_size is the global batch
# and must be a multiple of the number of GPUs.
#
#   launch/gpu_node.sh CONFIG WORKDIR [OVERRIDE...]
#   launch/gpu_node.sh configs/drpl_vit.py:variant=s,preset=drpl \
#       gs://bucket/run1 data.manual_dir=/data/covid
#
# CONFIG is FILE[:ARGS]; WORKDIR a local path or gs://bucket/dir (an existing
# run there resumes). OVERRIDE is key=value (becomes --config.key=value) or a
# --flag passed through. Environment: PYTHON (default: the repo's .venv),
# CUDA_VISIBLE_DEVICES (which GPUs; default all), DRPL_DRY_RUN=1 prints the
# command instead of running it. DRPL_DISTRIBUTED=0 is set: one process.
#
# Tried here: the dry run only (a 2-core CPU machine, no GPU). Not tried: any
# GPU node.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

usage() {
  [[ -n "${1:-}" ]] && echo "gpu_node.sh: $1" >&2
  echo "usage: launch/gpu_node.sh CONFIG WORKDIR" \
      "[key=value | --config.key=value]..." >&2
  exit 2
}

[[ $# -ge 2 ]] || usage "need CONFIG and WORKDIR"
drpl_resolve_config "$1"
drpl_check_workdir "$2"
workdir="$2"
shift 2
drpl_overrides "$@"

cmd=(env DRPL_DISTRIBUTED=0 "$(drpl_python)" -m drpl_jax.main
     "--config=${DRPL_CONFIG}" "--workdir=${workdir}"
     ${DRPL_OVERRIDES[@]+"${DRPL_OVERRIDES[@]}"})
if [[ "${DRPL_DRY_RUN:-0}" == 1 ]]; then
  drpl_show "${cmd[@]}"
  exit 0
fi
if command -v nvidia-smi > /dev/null; then
  echo "gpu_node.sh: $(nvidia-smi -L | wc -l) GPU(s) on $(hostname)" \
      "(CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-all})" >&2
else
  echo "gpu_node.sh: nvidia-smi not found; JAX will use what it finds" >&2
fi
exec "${cmd[@]}"
