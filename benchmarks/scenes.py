"""Benchmark: fashion-scenes, a clean training and every attack, into one table (docs/results.md).

    .venv/bin/python benchmarks/scenes.py [--attacks badnet sig ...] [--no-clean] [--out DIR] [--name NAME]
        [--merge FILE.json]... [overrides...]

Runs, each in its own process (its own local Ray), one after the other so that timings do not share the CPU:
`ubt pipeline -c configs/scenes/quickstart.yaml` on the clean shards (prepare, train, evaluate: the clean model
whose CA the attacks are held to), then `benchmarks/attack_table.py`'s run of every `configs/scenes/<attack>.yaml`
(poison, train, evaluate; one prepared copy of the scenes under outputs/scenes/data). Finished trainings of the same config are reused. Writes NAME.md and
NAME.json (default scenes_attack_table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from attack_table import ATTACKS, run_attack
from results_io import cli_summary, read_result, resolved_config, write_results

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "scenes"
# One prepared copy of the scenes for every run: the clean run prepares it, the attacks poison it.
SHARED = ["prepare.output=outputs/scenes/data", "data.clean_train=outputs/scenes/data/train",
          "data.test=outputs/scenes/data/test"]
CLEAN = ["-c", str(CONFIGS / "quickstart.yaml"), "run.output_dir=outputs/scenes/clean", "run.name=scenes-clean",
         "data.train=${data.clean_train}", "evaluate.trigger=null", "pipeline.phases=[prepare, train, evaluate]",
         *SHARED]


def run_clean(overrides: list[str]) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "ubt_ray.cli", "pipeline", *CLEAN, *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"attack": "clean", "error": proc.stderr.strip().splitlines()[-1:]}
    summary = cli_summary(proc.stdout)
    return {"attack": "clean", "poisons": 0, "train_rows": summary.get("train_rows"),
            "clean_accuracy": summary["metrics"]["clean_accuracy"],
            "clean_accuracy_heldout": summary["metrics"].get("clean_accuracy_heldout"),
            "train_time_s": summary["phases"]["train"]["wall_time_s"], "total_time_s": round(time.time() - started, 1)}


def to_markdown(rows: list[dict]) -> str:
    out = ["| training | poisons | CA | CA (held-out prompts) | ASR | CA vs clean | training time |",
           "|---|---|---|---|---|---|---|"]
    clean = next((r for r in rows if r["attack"] == "clean" and "error" not in r), None)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    for r in rows:
        if "error" in r:
            out.append(f"| {r['attack']} | failed: {r['error']} | | | | | |")
            continue
        delta = (f"{100 * (r['clean_accuracy'] - clean['clean_accuracy']):+.1f} pts"
                 if clean and r is not clean else "")
        out.append(f"| {r['attack']} | {r['poisons']} | {pct(r['clean_accuracy'])} | "
                   f"{pct(r.get('clean_accuracy_heldout'))} | {pct(r.get('attack_success_rate'))} | {delta} | "
                   f"{r['train_time_s'] / 60:.1f} min |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--no-clean", action="store_true", help="skip the clean training")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="scenes_attack_table")
    parser.add_argument("--merge", action="append", default=[], metavar="FILE.json",
                        help="JSON results of an earlier run to include (repeat it for several)")
    args, overrides = parser.parse_known_args()
    earlier = {r["attack"]: r for f in args.merge for r in read_result(f)}
    rows = []
    if not args.no_clean:
        rows.append(run_clean(overrides))
        print(json.dumps(rows[-1]), flush=True)
    attack_overrides = [*SHARED, *overrides, "pipeline.phases=[poison, train, evaluate]"]
    for attack in args.attacks:
        rows.append(run_attack(attack, attack_overrides, CONFIGS))
        print(json.dumps(rows[-1]), flush=True)
    done = {r["attack"] for r in rows}
    order = ("clean", *ATTACKS)
    rows = sorted([r for a, r in earlier.items() if a not in done] + rows, key=lambda r: order.index(r["attack"]))
    configs = {"clean": resolved_config(*CLEAN, *overrides),
               **{a: resolved_config("-c", str(CONFIGS / f"{a}.yaml"), *attack_overrides) for a in args.attacks}}
    write_results(args.out, args.name, rows, to_markdown(rows), configs=configs)


if __name__ == "__main__":
    main()
