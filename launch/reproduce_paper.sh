#!/usr/bin/env bash
# Runs the paper's protocol (or the CPU ablation on the real sample) step by
# step, then writes one comparison table:
#   1. prepare the data set         python -m drpl_jax.data prepare ...
#   2. fine-tune the PyTorch teacher python -m drpl_jax.train_teacher ...
#   3. for each preset and seed:    LAUNCHER CONFIG WORKDIR/runs/P/seedS ...
#      (train + evaluate the test split; launch/local.sh by default)
#   4. the table                    python -m drpl_jax.reproduce table ...
#
#   launch/reproduce_paper.sh WORKDIR --manual_dir PATH [OPTIONS]  # paper
#   launch/reproduce_paper.sh WORKDIR --sample [OPTIONS]  # COVID vs Normal
#   launch/reproduce_paper.sh WORKDIR --cxr2k5 [OPTIONS]  # the 2,579 images
#   launch/reproduce_paper.sh WORKDIR --sample --smoke    # toy size (CI)
#
# Options:
#   --sample            the 600-image sample (../shared/data/...) at a CPU
#                       budget, 3 seeds; default: the 4-class Kaggle database
#   --cxr2k5            the 2,579-image set (../shared/data/covid19_radiography
#                       _2k5), COVID vs Normal, 3 seeds, one shared teacher,
#                       sized for two hours on 2 cores (drpl_jax/reproduce/protocol.py)
#   --smoke             two presets, one seed, a few steps, 32 px
#   --seeds N           seeds 0..N-1 (default: 1 paper, 3 sample)
#   --manual_dir PATH   the raw data (the Kaggle download: folder or .zip)
#   --data_dir PATH     prepared data (default WORKDIR/data)
#   --teacher PATH      use this teacher .safetensors; no teacher step
#   --teacher_init PATH torchvision ImageNet weights to fine-tune from
#   --launcher NAME     local (default) | gpu_node | slurm | tpu_pod
#   --table PATH        also copy the table there (default WORKDIR/results.md)
#   --setup             run launch/setup.sh data,torch first
#   --dry_run           print the steps, run nothing (also DRPL_DRY_RUN=1)
#
# Every step is printed ("+ COMMAND") before it runs; a step whose output
# exists is skipped ("= skip"): the prepared data, the teacher, a run's
# eval/test/report.json. An interrupted run resumes from its latest
# checkpoint when the script is run again with the same arguments. The
# settings come from drpl_jax/reproduce/protocol.py; WORKDIR/reproduce.json records
# them and a rerun with other settings is refused. Step times go to
# WORKDIR/timings/. Environment: PYTHON (default .venv/bin/python).
#
# Launchers: local and gpu_node run each training in turn on this machine;
# slurm submits each with `sbatch --wait` (SBATCH_EXTRA adds options, e.g.
# "--nodes=2 --gpus-per-node=8"); tpu_pod runs each on every worker of the
# slice at once through `launch/tpu_pod.sh exec` (blocking; TPU_NAME, ZONE...
# as for tpu_pod.sh), prepares the data on every worker, and needs
# --teacher, a path every worker can read; WORKDIR should then be gs://.
# See docs/reproduction.md.
#
# Tried here: --sample --smoke and --sample on a 2-core CPU machine (local
# launcher); the other launchers in dry runs and against stand-ins only.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

usage() {
  [[ -n "${1:-}" ]] && echo "reproduce_paper.sh: $1" >&2
  echo "usage: launch/reproduce_paper.sh WORKDIR [--sample|--cxr2k5]" \
      "[--smoke]" \
      "[--seeds N] [--manual_dir P] [--data_dir P] [--teacher P]" \
      "[--teacher_init P] [--launcher local|gpu_node|slurm|tpu_pod]" \
      "[--table P] [--setup] [--dry_run]" >&2
  exit 2
}

invocation="$(drpl_show "launch/reproduce_paper.sh" "$@")"
[[ $# -ge 1 && "$1" != -* ]] || usage "need WORKDIR first"
workdir="$1"
shift
drpl_check_workdir "${workdir}"
[[ "${workdir}" == gs://* ]] || workdir="$(realpath -m "${workdir}")"
mode=paper smoke="" seeds="" launcher=local table="" setup=0 given_teacher=0
dry="${DRPL_DRY_RUN:-0}"
paths=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sample) mode=sample; shift ;;
    --cxr2k5) mode=cxr2k5; shift ;;
    --smoke) smoke=--smoke; shift ;;
    --setup) setup=1; shift ;;
    --dry_run) dry=1; shift ;;
    --seeds|--manual_dir|--data_dir|--teacher|--teacher_init|--launcher\
    |--table)
      [[ $# -ge 2 && -n "$2" ]] || usage "$1 needs a value"
      case "$1" in
        --seeds) [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage "--seeds '$2'"
                 seeds="$2" ;;
        --launcher) launcher="$2" ;;
        --table) table="$(realpath -m "$2")" ;;
        *) [[ "$1" == --teacher ]] && given_teacher=1
           paths+=("$1" "$2") ;;
      esac
      shift 2 ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
case "${launcher}" in
  local|gpu_node|slurm|tpu_pod) ;;
  *) usage "unknown launcher '${launcher}'" ;;
esac
export DRPL_DRY_RUN="${dry}"
# Local paths are relative to where the script was started (not for
# tpu_pod: there they are paths on the workers, relative to the repo).
if [[ "${launcher}" != tpu_pod ]]; then
  for ((i = 1; i < ${#paths[@]}; i += 2)); do
    [[ "${paths[i]}" == gs://* ]] || paths[i]="$(realpath -m "${paths[i]}")"
  done
fi

cd "${REPO}"
if [[ "${setup}" == 1 ]]; then
  drpl_run bash launch/setup.sh data,torch
fi
PY="$(drpl_python)"
ctx=(--workdir "${workdir}" --mode "${mode}" ${smoke:+"${smoke}"}
     ${seeds:+--seeds "${seeds}"} ${paths[@]+"${paths[@]}"})

# repro SUBCOMMAND ARGS...: the Python side (settings live there).
repro() { "${PY}" -m drpl_jax.reproduce "$@"; }

# lines VAR SUBCOMMAND ARGS...: VAR=(one element per output line).
lines() {
  local -n _out="$1"
  shift
  local text
  text="$(repro "$@")"
  _out=()
  [[ -z "${text}" ]] || mapfile -t _out <<< "${text}"
}

# exists PATH: local paths with test, gs:// through etils.
exists() {
  if [[ "$1" == gs://* ]]; then repro exists "$1"; else [[ -e "$1" ]]; fi
}

# step NAME COMMAND...: prints, runs and times a step (WORKDIR/timings).
# A dry run runs only launchers (they print their commands, indented).
step() {
  local name="$1" start end rc=0
  shift
  printf '+ %s\n' "$(drpl_show "$@")"
  if [[ "${dry}" == 1 ]]; then
    [[ "$1 $2" != "bash launch/"* && "$1" != env ]] || "$@" | sed 's/^/    /'
    return 0
  fi
  start="$(date +%s.%N)"
  "$@" || rc=$?
  end="$(date +%s.%N)"
  repro record --workdir "${workdir}" --step "${name}" --start "${start}" \
      --end "${end}" --rc "${rc}" -- "$@" > /dev/null
  if [[ "${rc}" -ne 0 ]]; then
    echo "reproduce_paper.sh: step ${name} failed (exit ${rc}); fix it and" \
        "rerun the same command: finished steps are skipped, an" \
        "interrupted run resumes" >&2
    exit "${rc}"
  fi
}

skip() { printf '= skip %s: %s exists\n' "$1" "$2"; }

# The plan: checks the arguments, refuses a WORKDIR begun with other
# settings, records the command.
repro plan "${ctx[@]}" --launcher "${launcher}" --command "${invocation}" \
    $([[ "${dry}" == 1 ]] && echo --dry_run)
declare -A where
lines path_lines paths "${ctx[@]}"
for line in "${path_lines[@]}"; do
  where["${line%%$'\t'*}"]="${line#*$'\t'}"
done
if [[ "${launcher}" == tpu_pod && "${given_teacher}" == 0 ]]; then
  usage "--launcher tpu_pod needs --teacher PATH (readable on every worker)"
fi

# 1. Data.
lines prepare_args args prepare "${ctx[@]}"
if [[ "${launcher}" == tpu_pod ]]; then
  step prepare bash launch/tpu_pod.sh exec -- .venv/bin/python \
      -m drpl_jax.data "${prepare_args[@]}"
elif exists "${where[prepared]}"; then
  skip prepare "${where[prepared]}"
else
  step prepare "${PY}" -m drpl_jax.data "${prepare_args[@]}"
fi

# 2. Teacher (PyTorch, on this machine; CUDA when it has a GPU).
if [[ "${given_teacher}" == 1 ]]; then
  [[ "${launcher}" == tpu_pod || -f "${where[teacher]}" ]] \
      || usage "--teacher ${where[teacher]} does not exist"
  echo "= teacher given: ${where[teacher]}"
elif exists "${where[teacher]}"; then
  skip teacher "${where[teacher]}"
else
  lines teacher_args args teacher "${ctx[@]}"
  step teacher "${PY}" -m drpl_jax.train_teacher "${teacher_args[@]}"
fi

# 3. Every preset and seed: train, then evaluate the test split.
lines runs runs "${ctx[@]}"
for line in "${runs[@]}"; do
  IFS=$'\t' read -r preset seed run_dir report <<< "${line}"
  if exists "${report}"; then
    skip "${preset} seed ${seed}" "${report}"
    continue
  fi
  lines run_args args run "${ctx[@]}" --preset "${preset}" --seed "${seed}"
  config="${run_args[0]}"
  overrides=("${run_args[@]:1}")
  case "${launcher}" in
    local|gpu_node)
      cmd=(bash "launch/${launcher}.sh" "${config}" "${run_dir}") ;;
    slurm)
      cmd=(env "SBATCH_EXTRA=${SBATCH_EXTRA:-} --wait" bash launch/slurm.sh
           "${config}" "${run_dir}") ;;
    tpu_pod)
      cmd=(bash launch/tpu_pod.sh exec -- env DRPL_DISTRIBUTED=1
           .venv/bin/python -m drpl_jax.main "--config=${config}"
           "--workdir=${run_dir}") ;;
  esac
  step "run-${preset}-seed${seed}" "${cmd[@]}" "${overrides[@]}"
  if [[ "${dry}" != 1 ]] && ! exists "${report}"; then
    echo "reproduce_paper.sh: ${preset} seed ${seed} ended without" \
        "${report} (preempted?); rerun the same command to resume" >&2
    exit 3
  fi
done

# 4. The table (rewritten every time; the same runs give the same table).
for out in "${where[table]}" ${table:+"${table}"}; do
  drpl_run "${PY}" -m drpl_jax.reproduce table --workdir "${workdir}" \
      --out "${out}"
done
[[ "${dry}" == 1 ]] && exit 0
echo "Table: ${where[table]}${table:+ and ${table}}"
