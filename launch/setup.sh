#!/usr/bin/env bash
# Creates .venv in the repo root and installs drpl-jax with the pinned
# versions. Usage: launch/setup.sh [EXTRAS]   (default: data,torch,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data,torch,dev}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
