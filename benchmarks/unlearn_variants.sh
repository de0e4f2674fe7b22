#!/usr/bin/env bash
# Benchmark: one unlearning variant on the quickstart's finished defense (its score table and backdoored model),
# then its CA and ASR on the whole test set: for comparing unlearning choices.
#
#   benchmarks/unlearn_variants.sh NAME RETAIN_POOL [section.key=value ...]
#   e.g. benchmarks/unlearn_variants.sh push_m02 0.95 experimental.unlearn.forget=push_away experimental.unlearn.margin=0.2
#
# Selects (top unlearn.num_samples rows + a retain set from the RETAIN_POOL least suspicious share) into
# outputs/unlearn_variants/select_<pool> once, unlearns into outputs/unlearn_variants/NAME, evaluates, and
# prints "NAME pool CA ASR unlearn-seconds". Needs scripts/quickstart.sh (or `ubt pipeline`) to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; pool=$2; shift 2
root=outputs/unlearn_variants
sel=$root/select_$pool
out=$root/$name
ubt=(.venv/bin/ubt)
mkdir -p "$root"
if [ ! -f "$sel/manifest.json" ]; then
    "${ubt[@]}" select -c configs/quickstart.yaml experimental.select.output="$sel" experimental.select.retain_pool="$pool" > "$sel.log" 2>&1
fi
start=$(date +%s)
"${ubt[@]}" unlearn -c configs/quickstart.yaml experimental.select.output="$sel" experimental.unlearn.output="$out" "$@" > "$out.unlearn.log" 2>&1
took=$(( $(date +%s) - start ))
"${ubt[@]}" evaluate -c configs/quickstart.yaml --model "$out/model" experimental.evaluate.output="$out/eval" > /dev/null 2>&1
.venv/bin/python - "$out/eval/metrics.json" "$name" "$pool" "$took" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]} pool {sys.argv[3]} CA {100 * m['clean_accuracy']:.2f} ASR {100 * m['attack_success_rate']:.2f} "
      f"unlearn {sys.argv[4]} s")
PY
