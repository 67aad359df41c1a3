#!/usr/bin/env bash
# Sets up .venv (pinned versions) and runs the test suite.
#   launch/test.sh [PYTEST_ARGS]          the default suite (slow tests excluded)
#   launch/test.sh --slow [PYTEST_ARGS]   only the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
marker="not slow"
if [[ "${1:-}" == "--slow" ]]; then
  marker="slow"
  shift
fi
bash launch/setup.sh data,torch,dev
exec .venv/bin/python -m pytest -m "${marker}" -n 2 -q "$@"
