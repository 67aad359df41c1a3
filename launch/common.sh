# Shared helpers for the launchers in this folder; sourced, not run.
#
# Provides: drpl_quote (shell-quote one word for display), drpl_show (print a
# command as it would be typed), drpl_run (print, then run unless
# DRPL_DRY_RUN=1), drpl_python (the interpreter to use), drpl_resolve_config
# (absolute CONFIG path, file checked), drpl_overrides (extra args ->
# --config.key=value), drpl_check_workdir. Callers define usage(), which
# prints its argument and the usage and exits 2, and set REPO.

# Quotes one word so that a shell reads it back unchanged; plain words stay
# as they are, so printed commands are readable and can be pasted.
drpl_quote() {
  local word="$1"
  if [[ -n "${word}" && "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Prints a command line, every word quoted as needed.
drpl_show() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(drpl_quote "${word}")"
  done
  printf '%s\n' "${out}"
}

# Prints "+ COMMAND" and runs it, or only prints it when DRPL_DRY_RUN=1.
drpl_run() {
  printf '+ %s\n' "$(drpl_show "$@")"
  if [[ "${DRPL_DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}

# The Python interpreter: $PYTHON, else the repo's .venv, else python3.
drpl_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s' "${PYTHON}"
  elif [[ -x "${REPO}/.venv/bin/python" ]]; then
    printf '%s' "${REPO}/.venv/bin/python"
  else
    printf '%s' python3
  fi
}

# CONFIG is FILE or FILE:ARGS. Sets DRPL_CONFIG to it with FILE made
# absolute (found relative to the current directory, else to the repo root);
# usage error if the file does not exist.
drpl_resolve_config() {
  local config="$1" file args="" dir
  file="${config%%:*}"
  if [[ "${config}" == *:* ]]; then
    args=":${config#*:}"
  fi
  if [[ -z "${file}" ]]; then
    usage "empty config file in '${config}'"
  elif [[ -f "${file}" ]]; then
    dir="$(cd "$(dirname "${file}")" && pwd)"
  elif [[ "${file}" != /* && -f "${REPO}/${file}" ]]; then
    dir="$(cd "$(dirname "${REPO}/${file}")" && pwd)"
  else
    usage "config file '${file}' not found (from '${config}')"
  fi
  DRPL_CONFIG="${dir}/$(basename "${file}")${args}"
}

# Sets the array DRPL_OVERRIDES to the extra arguments as flags for
# drpl_jax.main: key=value -> --config.key=value; --config.key=value and
# other --flags pass through unchanged; anything else is a usage error.
drpl_overrides() {
  local arg
  DRPL_OVERRIDES=()
  for arg in "$@"; do
    case "${arg}" in
      --?*) DRPL_OVERRIDES+=("${arg}") ;;
      [A-Za-z_]*=*) DRPL_OVERRIDES+=("--config.${arg}") ;;
      *) usage "override '${arg}' is not key=value or --config.key=value" ;;
    esac
  done
}

# Usage error unless WORKDIR is non-empty (a local path or gs://bucket/dir).
drpl_check_workdir() {
  if [[ -z "$1" ]]; then
    usage "empty WORKDIR"
  elif [[ "$1" == gs:/* && ! "$1" =~ ^gs://[^/]+ ]]; then
    usage "WORKDIR '$1' is not gs://BUCKET/PATH"
  fi
}
