#!/usr/bin/env bash
# The test command of the README (and of CI): set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Two test processes, each taking whole modules (one local Ray per module, as the fixtures expect);
# UBT_TEST_WORKERS=0 runs the tests in this process.
# The tests/ folder unless the arguments name test files or folders themselves.
where=tests
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then where=; fi
done
exec .venv/bin/python -m pytest -q -n "${UBT_TEST_WORKERS:-2}" --dist loadfile $where "$@"
