"""Benchmark: `ubt defend` with its defaults and with every shipped defense config, on every attack's backdoored
model, into one table (docs/results.md).

    .venv/bin/python benchmarks/defense_table.py [--configs configs/scenes] [--attacks badnet sig ...]
        [--defenses default patch_only caption_disagreement density] [--out DIR] [--name NAME] [--merge FILE.json]...
        [overrides...]

Each (attack, defense) runs `ubt defend -c <configs>/<attack>.yaml [-c configs/<defense>.yaml]` in its own process,
one after the other, on the model the attack's pipeline trained (benchmarks/attack_table.py or
benchmarks/scenes.py make them first), into `<run.output_dir>/defend_<defense>`. It reports what the defense
shows, whatever it shows: CA on the training and the held-out prompt sets and ASR before and after, detection
AUROC and precision@k at the unlearned k, and the defense's time. Writes NAME.md and NAME.json (default
<folder of the configs>_defense_table, e.g. scenes_defense_table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from attack_table import ATTACKS
from results_io import cli_summary, read_result, resolved_config, write_results

REPO = Path(__file__).resolve().parent.parent
DEFENSES = ("default", "patch_only", "caption_disagreement", "density")


# The experimental defense settings a table can compare with the default (benchmarks/configs/).
DEFENSE_CONFIGS = {"patch_only": REPO / "benchmarks" / "configs" / "patch_only.yaml",
                   "caption_disagreement": REPO / "benchmarks" / "configs" / "caption_disagreement.yaml",
                   "density": REPO / "benchmarks" / "configs" / "density.yaml"}


def defense_args(configs: Path, attack: str, defense: str, overrides: list[str]) -> list[str]:
    layer = [] if defense == "default" else ["-c", str(DEFENSE_CONFIGS[defense])]
    return ["-c", str(configs / f"{attack}.yaml"), *layer, *overrides,
            f"defend.output=${{run.output_dir}}/defend_{defense}"]


def run_defense(configs: Path, attack: str, defense: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ubt_ray.cli", "defend",
                           *defense_args(configs, attack, defense, overrides)], cwd=REPO, capture_output=True, text=True)
    row = {"attack": attack, "defense": defense}
    if proc.returncode != 0:
        return {**row, "error": proc.stderr.strip().splitlines()[-1:]}
    out = cli_summary(proc.stdout)
    report = json.loads(Path(REPO, out["report"], "report.json").read_text())
    det, sel = report.get("detection") or {}, report.get("selection") or {}
    k = sel.get("num_forget")
    return {**row, "before": report["before"], "after": report["after"], "auroc": det.get("auroc"),
            "k": k, "precision_at_k": sel.get("forget_precision"),
            "poisons_unlearned": sel.get("forget_poisons"), "defense_time_s": report["defense_wall_time_s"]}


def to_markdown(rows: list[dict]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"
    out = ["| attack | defense | CA before → after | CA held-out prompts before → after | ASR before → after | "
           "AUROC | precision@k (k) | time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['attack']} | {r['defense']} | failed: {r['error']} | | | | | |")
            continue
        b, a = r["before"] or {}, r["after"] or {}
        auroc = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
        out.append(f"| {r['attack']} | {r['defense']} | {pct(b.get('clean_accuracy'))} → "
                   f"{pct(a.get('clean_accuracy'))} | {pct(b.get('clean_accuracy_heldout'))} → "
                   f"{pct(a.get('clean_accuracy_heldout'))} | {pct(b.get('attack_success_rate'))} → "
                   f"{pct(a.get('attack_success_rate'))} | {auroc} | {pct(r['precision_at_k'])} ({r['k']}) | "
                   f"{r['defense_time_s'] / 60:.1f} min |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=str(REPO / "configs" / "scenes"))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--merge", action="append", default=[], metavar="FILE.json",
                        help="JSON results of an earlier run to include (repeat it for several)")
    args, overrides = parser.parse_known_args()
    configs = Path(args.configs).absolute()
    name = args.name or f"{configs.name}_defense_table"
    earlier = {(r["attack"], r["defense"]): r for f in args.merge for r in read_result(f)}
    rows = []
    for attack in args.attacks:
        for defense in args.defenses:
            rows.append(run_defense(configs, attack, defense, overrides))
            print(json.dumps(rows[-1]), flush=True)
    done = {(r["attack"], r["defense"]) for r in rows}
    rows = sorted([r for key, r in earlier.items() if key not in done] + rows,
                  key=lambda r: (ATTACKS.index(r["attack"]), DEFENSES.index(r["defense"])))
    resolved = {f"{a}/{d}": resolved_config(*defense_args(configs, a, d, overrides))
                for a in args.attacks for d in args.defenses}
    write_results(args.out, name, rows, to_markdown(rows), configs=resolved)


if __name__ == "__main__":
    main()
