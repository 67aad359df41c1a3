#!/usr/bin/env bash
# Sets up .venv (pinned versions) and runs the default test suite (slow
# tests excluded; run them with: .venv/bin/python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh data,torch,dev
exec .venv/bin/python -m pytest -m "not slow" -n 2 -q "$@"
