#!/usr/bin/env bash
# The main command of the README: set up .venv if needed, then run the embedded default pipeline
# (configs/quickstart.yaml: prepare Fashion-MNIST, poison it with BadNet, train a tiny ViT CLIP on it with
# Ray Train, evaluate CA and ASR; local Ray, CPU). Extra arguments are
# config overrides, e.g. `scripts/quickstart.sh run.output_dir=/tmp/qs`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/ubt pipeline --config configs/quickstart.yaml "$@"
