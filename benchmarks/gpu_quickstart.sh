#!/usr/bin/env bash
# The quickstart pipeline on a GPU (issue 7's GPU check): configs/quickstart.yaml (prepare, poison, train, evaluate,
# defend) with every training phase on one Ray Train worker holding a GPU under bf16 autocast, and scoring on one GPU
# actor. The schedule is the CPU quickstart's, so its CA/ASR compare with the README's. Prints each phase's wall time
# from its manifest.json.
#   benchmarks/gpu_quickstart.sh [OUTPUT_DIR] [config overrides...]
# PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${1:-outputs/quickstart_gpu}
shift $(( $# > 0 ? 1 : 0 ))
start=$(date +%s)
"$py" -m ubt_ray.cli pipeline --config configs/quickstart.yaml run.output_dir="$out" \
    trainer.num_workers=1 trainer.use_gpu=true model.precision=amp_bf16 score.use_gpu=true "$@"
echo "pipeline wall time: $(( $(date +%s) - start )) s"
"$py" - "$out" <<'EOF'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
for path in sorted(root.rglob("manifest.json"), key=lambda p: p.stat().st_mtime):
    if "ray" in path.relative_to(root).parts:
        continue
    m = json.loads(path.read_text())
    print(f"{m['phase']:<10} {m['wall_time_s']:8.1f} s  {path.parent.relative_to(root)}")
EOF
