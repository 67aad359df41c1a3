#!/usr/bin/env bash
# The formatter and the linter, as CI runs them (configured in pyproject.toml).
#   launch/lint.sh         check only: exit 1 if a file needs formatting or
#                          the linter finds something
#   launch/lint.sh --fix   reformat the files and apply the linter's safe fixes
# Needs the dev extra (launch/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(drpl_jax tests configs)
if [[ "${1:-}" == "--fix" ]]; then
  .venv/bin/python -m pyink --quiet "${paths[@]}"
  .venv/bin/ruff check --fix --quiet "${paths[@]}"
else
  .venv/bin/python -m pyink --check --quiet "${paths[@]}"
  .venv/bin/ruff check --quiet "${paths[@]}"
fi
