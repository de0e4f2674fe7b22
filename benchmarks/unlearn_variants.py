"""Benchmark: unlearning variants on one finished defense's selection, each judged by CA on the training and the
held-out prompt sets and by ASR (docs/results.md).

    .venv/bin/python benchmarks/unlearn_variants.py -c CONFIG [-c LAYER ...] --defense DIR
        --variant NAME [key=value ...] [--variant NAME ...] [--name NAME] [--out DIR] [overrides...]

    e.g. benchmarks/unlearn_variants.py -c configs/quickstart.yaml run.output_dir=outputs/bench/quickstart
         --defense outputs/bench/quickstart/defend --variant plain --variant anchor1 experimental.unlearn.anchor_weight=1

For each variant, one after the other in its own process: `ubt unlearn` from defend.model on the forget and retain
rows the defense selected (DIR/select, so every variant unlearns the same rows), with the variant's overrides, into
DIR/variants/NAME, then `ubt evaluate` of the result on the whole test set. The first row is θ₀ (DIR/eval_before).
Writes NAME.md and NAME.json (default unlearn_variants).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_io import resolved_config, write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ubt_ray import storage  # noqa: E402
from ubt_ray.config import load_config  # noqa: E402
from ubt_ray.errors import UserError  # noqa: E402


def ubt(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "ubt_ray.cli", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ubt {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")


def metrics(path: Path) -> dict:
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("clean_accuracy", "clean_accuracy_heldout", "attack_success_rate")}


def check_inputs(configs: list[str], overrides: list[str], variants: list[list[str]], defense: Path) -> None:
    """What the variants read after their unlearning, checked before the first (long) one: θ₀'s evaluation, and
    every variant's data.test (each is evaluated on it)."""
    if not (defense / "eval_before" / "metrics.json").is_file():
        raise SystemExit(f"{defense} has no eval_before/metrics.json: pass --defense a finished defense that "
                         f"evaluated θ₀ (defend.evaluate=true).")
    for name, *variant in variants:
        try:
            cfg = load_config(configs, [*overrides, *variant])
        except UserError as e:
            raise SystemExit(f"variant {name}: {e}") from None
        if not storage.exists(cfg.data.test, cfg.storage):
            raise SystemExit(f"data.test={cfg.data.test} (variant {name}) does not exist: point data.test at the "
                             f"labelled test shards every variant is evaluated on, e.g. "
                             f"data.test=outputs/bench/quickstart/data/test.")


def to_markdown(rows: list[dict]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    base = rows[0]
    out = ["| unlearning | settings | CA | CA (held-out prompts) | ASR | ΔCA | Δ held-out CA | unlearn time |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        deltas = ["", ""] if r is base else [
            f"{100 * (r[k] - base[k]):+.1f} pts" if r[k] is not None and base[k] is not None else "n/a"
            for k in ("clean_accuracy", "clean_accuracy_heldout")]
        took = f"{r['unlearn_time_s']:.0f} s" if r.get("unlearn_time_s") is not None else ""
        out.append(f"| {r['variant']} | {' '.join(r['overrides']) or 'as configured'} | {pct(r['clean_accuracy'])} | "
                   f"{pct(r['clean_accuracy_heldout'])} | {pct(r['attack_success_rate'])} | {deltas[0]} | "
                   f"{deltas[1]} | {took} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True)
    parser.add_argument("--defense", required=True, help="a finished defense's output (its select/ and eval_before/)")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [key=value ...]")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="unlearn_variants")
    args, overrides = parser.parse_known_args()
    defense = Path(args.defense)
    check_inputs(args.config, overrides, args.variant, defense)
    configs = [a for c in args.config for a in ("-c", c)]
    rows = [{"variant": "θ₀ (no unlearning)", "overrides": [], **metrics(defense / "eval_before" / "metrics.json")}]
    resolved = {}
    for name, *variant in args.variant:
        out = defense / "variants" / name
        common = [*configs, *overrides, *variant, f"experimental.select.output={defense / 'select'}"]
        unlearn = [*common, f"experimental.unlearn.output={out}"]
        started = time.time()
        ubt("unlearn", *unlearn)
        took = round(time.time() - started, 1)
        ubt("evaluate", *common, "--model", str(out / "model"), f"experimental.evaluate.output={out / 'eval'}")
        rows.append({"variant": name, "overrides": variant, **metrics(out / "eval" / "metrics.json"),
                     "unlearn_time_s": took})
        resolved[name] = resolved_config(*unlearn)
        print(json.dumps(rows[-1]), flush=True)
    write_results(args.out, args.name, rows, to_markdown(rows), configs=resolved)


if __name__ == "__main__":
    main()
