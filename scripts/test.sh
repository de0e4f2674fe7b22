#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q tests "$@"
