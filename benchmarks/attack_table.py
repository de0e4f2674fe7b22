"""Benchmark: every attack end to end (prepare, poison, train, evaluate, then UBT's defend), into one table.

    .venv/bin/python benchmarks/attack_table.py [--configs DIR] [--attacks badnet sig ...] [--no-defend]
        [--out DIR] [--name NAME] [--merge FILE.json]... [overrides...]

Each attack runs `ubt pipeline --config <configs>/<attack>.yaml` (default configs/attacks; configs/scenes for
fashion-scenes) in its own process (its own local Ray),
one after the other so that the timings do not share the CPU. A training that already finished (same config, same
data) is found and not repeated: its time column then shows the seconds that took, not the training's. Writes
NAME.md and NAME.json (default attack_table); `--merge` adds the rows of earlier runs' JSON files (an attack run again replaces its earlier row).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from results_io import cli_summary, read_result, resolved_config, write_results

REPO = Path(__file__).resolve().parent.parent
ATTACKS = ("badnet", "blended", "sig", "wanet", "label_consistent")


def run_attack(attack: str, overrides: list[str], configs: Path) -> dict:
    cfg = configs / f"{attack}.yaml"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "ubt_ray.cli", "pipeline", "--config", str(cfg), *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"attack": attack, "error": proc.stderr.strip().splitlines()[-1:]}
    summary = cli_summary(proc.stdout)
    phases = summary["phases"]
    return {"attack": attack,
            "poisons": phases.get("poison", {}).get("num_poisoned"),
            "train_rows": summary.get("train_rows"),
            "clean_accuracy": summary["metrics"]["clean_accuracy"],
            "clean_accuracy_heldout": summary["metrics"].get("clean_accuracy_heldout"),
            "attack_success_rate": summary["metrics"]["attack_success_rate"],
            "train_time_s": phases["train"]["wall_time_s"],
            **_defense(summary.get("defense")),
            "total_time_s": round(time.time() - started, 1)}


def _defense(report: dict | None) -> dict:
    if not report:
        return {}
    return {"ubt_clean_accuracy": report["after"]["clean_accuracy"],
            "ubt_attack_success_rate": report["after"]["attack_success_rate"],
            "ubt_auroc": (report.get("detection") or {}).get("auroc"),
            "ubt_defense_time_s": report["defense_wall_time_s"]}


def to_markdown(rows: list[dict]) -> str:
    out = ["| attack | poisons | poison rate | CA | CA (held-out prompts) | ASR | attack training time | CA after UBT | "
           "ASR after UBT | detection AUROC | defense time | whole pipeline |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['attack']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        rate = f"{100 * r['poisons'] / r['train_rows']:.2f}%" if r.get("train_rows") else "?"
        held = r.get("clean_accuracy_heldout")
        out.append(f"| {r['attack']} | {r['poisons']} | {rate} | {100 * r['clean_accuracy']:.1f}% | "
                   f"{'n/a' if held is None else f'{100 * held:.1f}%'} | "
                   f"{100 * r['attack_success_rate']:.1f}% | {r['train_time_s'] / 60:.1f} min | "
                   + (f"{100 * r['ubt_clean_accuracy']:.1f}% | {100 * r['ubt_attack_success_rate']:.1f}% | "
                      f"{r['ubt_auroc']:.3f} | {r['ubt_defense_time_s'] / 60:.1f} min | " if "ubt_clean_accuracy" in r
                      else "| | | | ") + f"{r['total_time_s'] / 60:.1f} min |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--configs", default=str(REPO / "configs" / "attacks"),
                        help="folder of the attack configs (<attack>.yaml), e.g. configs/scenes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="attack_table", help="file name (no suffix) of the results")
    parser.add_argument("--merge", action="append", default=[], metavar="FILE.json",
                        help="JSON results of an earlier run to include (repeat it for several)")
    parser.add_argument("--no-defend", action="store_true", help="stop after the attack's evaluation")
    args, overrides = parser.parse_known_args()
    if args.no_defend:
        overrides.append("pipeline.phases=[prepare, poison, train, evaluate]")
    earlier = {r["attack"]: r for f in args.merge for r in read_result(f)}
    configs = Path(args.configs).absolute()
    rows = []
    for attack in args.attacks:
        rows.append(run_attack(attack, overrides, configs))
        print(json.dumps(rows[-1]), flush=True)
    done = {r["attack"] for r in rows}
    rows = [r for a, r in earlier.items() if a not in done] + rows
    rows.sort(key=lambda r: ATTACKS.index(r["attack"]))
    write_results(args.out, args.name, rows, to_markdown(rows),
                  configs={a: resolved_config("-c", str(configs / f"{a}.yaml"), *overrides) for a in args.attacks})


if __name__ == "__main__":
    main()
