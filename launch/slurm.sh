#!/usr/bin/env bash
# Submits launch/slurm.sbatch (multi-node GPU training, one process per node)
# with the node and GPU counts as arguments instead of edited #SBATCH lines.
#
#   launch/slurm.sh [-N NODES] [-g GPUS_PER_NODE] [-p PARTITION] [-t TIME]
#                   CONFIG WORKDIR [OVERRIDE...]
#   launch/slurm.sh -N 4 -g 8 configs/drpl_vit.py:variant=b,preset=drpl \
#       /shared/runs/b1 data.data_dir=/shared/tfds
#
# Options override the #SBATCH defaults in slurm.sbatch; unset ones keep
# them. Extra sbatch options: SBATCH_EXTRA="--account=abc --qos=high".
# DRPL_DRY_RUN=1 prints the sbatch command instead of submitting it.
#
# Tried here: the dry run only (no SLURM cluster). Not tried: a submission.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

usage() {
  [[ -n "${1:-}" ]] && echo "slurm.sh: $1" >&2
  echo "usage: launch/slurm.sh [-N NODES] [-g GPUS_PER_NODE] [-p PARTITION]" \
      "[-t TIME] CONFIG WORKDIR [key=value | --config.key=value]..." >&2
  exit 2
}

sbatch_args=()
while getopts ":N:g:p:t:h" opt; do
  case "${opt}" in
    N) [[ "${OPTARG}" =~ ^[1-9][0-9]*$ ]] \
           || usage "-N '${OPTARG}' is not a node count"
       sbatch_args+=("--nodes=${OPTARG}") ;;
    g) [[ "${OPTARG}" =~ ^[0-9]+$ ]] \
           || usage "-g '${OPTARG}' is not a GPU count"
       sbatch_args+=("--gpus-per-node=${OPTARG}") ;;
    p) sbatch_args+=("--partition=${OPTARG}") ;;
    t) sbatch_args+=("--time=${OPTARG}") ;;
    h) usage ;;
    :) usage "-${OPTARG} needs a value" ;;
    *) usage "unknown option -${OPTARG}" ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -ge 2 ]] || usage "need CONFIG and WORKDIR"
drpl_resolve_config "$1"
drpl_check_workdir "$2"
workdir="$2"
shift 2
drpl_overrides "$@"
read -r -a extra <<< "${SBATCH_EXTRA:-}"

cmd=(sbatch "--chdir=${REPO}" "--export=ALL,DRPL_REPO=${REPO}"
     ${sbatch_args[@]+"${sbatch_args[@]}"} ${extra[@]+"${extra[@]}"}
     "${REPO}/launch/slurm.sbatch" "${DRPL_CONFIG}" "${workdir}"
     ${DRPL_OVERRIDES[@]+"${DRPL_OVERRIDES[@]}"})
if [[ "${DRPL_DRY_RUN:-0}" == 1 ]]; then
  drpl_show "${cmd[@]}"
  exit 0
fi
command -v sbatch > /dev/null || {
  echo "slurm.sh: sbatch not found; run this on a SLURM login node" >&2
  exit 1
}
exec "${cmd[@]}"
