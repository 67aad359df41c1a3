#!/usr/bin/env bash
# Runs DRPL-ViT training on a Cloud TPU VM pod slice with gcloud: one JAX
# process per TPU host, all started together over ssh --worker=all.
#
#   launch/tpu_pod.sh [OPTIONS] create
#   launch/tpu_pod.sh [OPTIONS] copy       # this repo -> every worker
#   launch/tpu_pod.sh [OPTIONS] install    # venv, .[data], jax[tpu]
#   launch/tpu_pod.sh [OPTIONS] exec [-w WORKER] -- COMMAND...  # in the repo
#   launch/tpu_pod.sh [OPTIONS] run CONFIG WORKDIR [OVERRIDE...]
#   launch/tpu_pod.sh [OPTIONS] logs [-f] [-n LINES] [WORKER|all]
#   launch/tpu_pod.sh [OPTIONS] stop       # SIGTERM to the run on every host
#   launch/tpu_pod.sh [OPTIONS] delete
#
# OPTIONS (flag, or the environment variable in brackets):
#   --name NAME              TPU VM name [TPU_NAME, default drpl-pod]
#   --zone ZONE              [ZONE, default us-central2-b]
#   --project PROJECT        [PROJECT, default gcloud's configured project]
#   --accelerator-type TYPE  [ACCELERATOR_TYPE, default v4-32 = 4 hosts]
#   --version RUNTIME        TPU software version [RUNTIME_VERSION, default
#                            tpu-ubuntu2204-base]
#   --spot                   create a Spot (preemptible) slice [SPOT=1]
#   --remote-dir DIR         repo on the workers, relative to the home
#                            directory [REMOTE_DIR, default drpl-jax]
#   --python PY              interpreter for the venv [REMOTE_PYTHON, default
#                            python3.11, apt-installed when missing]
#   --dry-run                only print the commands [DRPL_DRY_RUN=1]
# e.g. v5e: --zone us-west4-a --accelerator-type v5litepod-16
#           --version v2-alpha-tpuv5-lite
#
# `run` starts `python -m drpl_jax.main` with DRPL_DISTRIBUTED=1 under nohup
# on every worker (log: REMOTE_DIR/logs/run-HOSTNAME.log, pid in
# logs/run.pid); jax.distributed.initialize() then reads the worker list
# from the TPU VM metadata. WORKDIR should be gs://bucket/dir: every host
# writes its shards of the checkpoint there, and rerunning the same `run`
# command after a preemption resumes from the latest checkpoint. CONFIG is
# relative to the repo root; OVERRIDE is key=value (--config.key=value) or a
# --flag. Every command is printed ("+ ...") before it runs.
#
# Tried here: --dry-run of every verb, and the printed tar and remote shell
# lines of copy, run, logs, stop and exec executed in a local stand-in for a
# worker's home (tests/test_launch.py). Not tried: any gcloud call, TPU VM
# or pod slice.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "${REPO}/launch/common.sh"

LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  [[ -n "${1:-}" ]] && echo "tpu_pod.sh: $1" >&2
  grep '^#   launch/tpu_pod.sh' "${BASH_SOURCE[0]}" | sed 's/^#  */usage: /' >&2
  echo "options: see the header of launch/tpu_pod.sh" >&2
  exit 2
}

name="${TPU_NAME:-drpl-pod}"
zone="${ZONE:-us-central2-b}"
project="${PROJECT:-}"
accel="${ACCELERATOR_TYPE:-v4-32}"
version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
spot="${SPOT:-0}"
remote_dir="${REMOTE_DIR:-drpl-jax}"
remote_python="${REMOTE_PYTHON:-python3.11}"

# Options come before the verb; --opt VALUE and --opt=VALUE both work.
while [[ $# -gt 0 && "$1" == --* ]]; do
  opt="${1%%=*}"
  if [[ "$1" == *=* ]]; then
    value="${1#*=}"; shift
  elif [[ "${opt}" == --spot || "${opt}" == --dry-run ]]; then
    value=""; shift
  else
    [[ $# -ge 2 ]] || usage "${opt} needs a value"
    value="$2"; shift 2
  fi
  case "${opt}" in
    --name) name="${value}" ;;
    --zone) zone="${value}" ;;
    --project) project="${value}" ;;
    --accelerator-type) accel="${value}" ;;
    --version) version="${value}" ;;
    --spot) spot=1 ;;
    --remote-dir) remote_dir="${value}" ;;
    --python) remote_python="${value}" ;;
    --dry-run) DRPL_DRY_RUN=1 ;;
    *) usage "unknown option ${opt}" ;;
  esac
done
for v in name zone accel version remote_dir remote_python; do
  [[ -n "${!v}" ]] || usage "empty ${v}"
done
[[ "${remote_dir}" != *[[:space:]\'\"\$\`]* ]] || usage "bad --remote-dir"
[[ $# -ge 1 ]] || usage "need a verb"
verb="$1"
shift

# gcloud compute tpus tpu-vm SUBCOMMAND with the name/zone/project flags.
tpu_vm() {
  local sub="$1"
  shift
  drpl_run gcloud compute tpus tpu-vm "${sub}" "${name}" "--zone=${zone}" \
      ${project:+"--project=${project}"} "$@"
}

# Runs a shell command line in the repo directory on every worker, or on
# the worker given as $2.
on_all() {
  tpu_vm ssh "--worker=${2:-all}" "--command=cd ${remote_dir} || exit 1; $1"
}

# Quotes words for the remote shell.
remote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(drpl_quote "${word}")"
  done
  printf '%s' "${out}"
}

do_create() {
  [[ $# -eq 0 ]] || usage "create takes no arguments"
  local spot_flag=""
  [[ "${spot}" == 1 ]] && spot_flag="--spot"
  tpu_vm create "--accelerator-type=${accel}" "--version=${version}" \
      ${spot_flag:+"${spot_flag}"}
}

do_copy() {
  [[ $# -eq 0 ]] || usage "copy takes no arguments"
  local tarball="${TMPDIR:-/tmp}/drpl-jax-src.tar.gz" rc=0
  drpl_run tar -czf "${tarball}" -C "${REPO}" --exclude=./.venv \
      --exclude=./.git --exclude=./.pytest_cache --exclude=__pycache__ \
      --exclude='*.egg-info' . || rc=$?
  # GNU tar exits 1 when a file changed while it was read: warn, go on.
  if [[ "${rc}" -eq 1 ]]; then
    echo "tpu_pod.sh: warning: files changed during tar; copy again" \
        "once you stop editing" >&2
  elif [[ "${rc}" -ne 0 ]]; then
    exit "${rc}"
  fi
  drpl_run gcloud compute tpus tpu-vm scp "${tarball}" \
      "${name}:drpl-jax-src.tar.gz" --worker=all "--zone=${zone}" \
      ${project:+"--project=${project}"}
  tpu_vm ssh --worker=all "--command=mkdir -p ${remote_dir} && tar -xzf \
drpl-jax-src.tar.gz -C ${remote_dir} && rm drpl-jax-src.tar.gz"
}

do_install() {
  [[ $# -eq 0 ]] || usage "install takes no arguments"
  local py="${remote_python}"
  on_all "(command -v ${py} > /dev/null || (sudo apt-get update -q && \
sudo apt-get install -y -q ${py} ${py}-venv)) && ${py} -m venv .venv && \
.venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q -c constraints.txt -e '.[data]' && \
.venv/bin/pip install -q -c constraints.txt 'jax[tpu]' -f ${LIBTPU_INDEX} && \
.venv/bin/python -c 'import jax; print(jax.__version__)'"
}

do_exec() {
  local worker=all
  if [[ "${1:-}" == -w ]]; then
    [[ "${2:-}" =~ ^([0-9]+|all)$ ]] || usage "-w needs a worker number"
    worker="$2"
    shift 2
  fi
  [[ "${1:-}" == -- ]] && shift
  [[ $# -ge 1 ]] || usage "exec needs a command"
  on_all "$(remote_words "$@")" "${worker}"
}

do_run() {
  [[ $# -ge 2 ]] || usage "run needs CONFIG and WORKDIR"
  local file="${1%%:*}"
  [[ "${file}" != /* ]] || usage \
      "config file '${file}' must be a path relative to the repo root"
  [[ -f "${REPO}/${file}" ]] || usage \
      "config file '${file}' does not exist (looked in ${REPO})"
  drpl_check_workdir "$2"
  [[ "$2" == gs://* ]] || echo "tpu_pod.sh: warning: WORKDIR '$2' is not" \
      "gs://...; a multi-host slice needs storage every host shares" >&2
  local config="$1" workdir="$2"
  shift 2
  drpl_overrides "$@"
  local train
  train="$(remote_words .venv/bin/python -m drpl_jax.main \
      "--config=${config}" "--workdir=${workdir}" \
      ${DRPL_OVERRIDES[@]+"${DRPL_OVERRIDES[@]}"})"
  # `&` backgrounds only the nohup command, so $! is the trainer's pid.
  on_all "mkdir -p logs; DRPL_DISTRIBUTED=1 nohup ${train} \
> logs/run-\$(hostname).log 2>&1 < /dev/null & echo \$! > logs/run.pid"
}

do_logs() {
  local follow="" lines=50 worker=all
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -f|--follow) follow="-f"; shift ;;
      -n) [[ "${2:-}" =~ ^[0-9]+$ ]] || usage "-n needs a line count"
          lines="$2"; shift 2 ;;
      all|[0-9]|[0-9]*[0-9]) [[ "$1" =~ ^([0-9]+|all)$ ]] || usage \
          "logs: bad worker '$1'"
        worker="$1"; shift ;;
      *) usage "logs: unexpected '$1'" ;;
    esac
  done
  local files="${remote_dir}/logs/run-*.log"
  tpu_vm ssh "--worker=${worker}" \
      "--command=tail -n ${lines}${follow:+ ${follow}} ${files}"
}

do_stop() {
  [[ $# -eq 0 ]] || usage "stop takes no arguments"
  on_all "if [ -f logs/run.pid ]; then kill \$(cat logs/run.pid) || true; \
rm -f logs/run.pid; fi"
}

do_delete() {
  [[ $# -eq 0 ]] || usage "delete takes no arguments"
  tpu_vm delete --quiet
}

case "${verb}" in
  create|copy|install|exec|run|logs|stop|delete) ;;
  *) usage "unknown verb '${verb}'" ;;
esac
if [[ "${DRPL_DRY_RUN:-0}" != 1 ]] && ! command -v gcloud > /dev/null; then
  echo "tpu_pod.sh: gcloud not found (install the Google Cloud CLI, or" \
      "use --dry-run to see the commands)" >&2
  exit 1
fi
"do_${verb}" "$@"
