"""Benchmark: the README's quickstart, measured: `scripts/quickstart.sh` into a fresh output dir.

    .venv/bin/python benchmarks/quickstart.py [--out DIR] [--name NAME] [overrides...]

Runs the quickstart command exactly as the README gives it (set-up, then `ubt pipeline -c configs/quickstart.yaml`:
prepare, poison, train, evaluate, defend), with run.output_dir set to a fresh outputs/bench/quickstart so that no
phase reuses an earlier output. Writes NAME.json / NAME.md (CA with both prompt sets and ASR before and after the
defense, detection figures, time per phase) and NAME_terminal.txt, what the terminal showed (the README's
quickstart output comes from it). Run it alone on the machine: its times are part of the result.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_io import cli_summary, resolved_config, write_results

REPO = Path(__file__).resolve().parent.parent
OUTPUT = "outputs/bench/quickstart"


def to_markdown(summary: dict) -> str:
    """The defense's before/after table (as `ubt defend` prints it), detection, and the time of each phase."""
    sys.path.insert(0, str(REPO))
    from ubt_ray.report import before_after_table
    defense = summary["defense"]
    out = [before_after_table(defense), ""]
    det = defense.get("detection") or {}
    if "auroc" in det:
        pk = ", ".join(f"{k} {v:.2f}" for k, v in det.items() if "@" in k)
        out += [f"Detection ({det['poisons']} poisons in {det['rows']} rows): AUROC {det['auroc']:.3f}; {pk}", ""]
    out += ["Time per phase: " + ", ".join(f"{p} {info['wall_time_s']:.0f} s" for p, info in summary["phases"].items()
                                           if "wall_time_s" in info)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="quickstart")
    args, overrides = parser.parse_known_args()
    overrides = [f"run.output_dir={OUTPUT}", *overrides]
    shutil.rmtree(REPO / OUTPUT, ignore_errors=True)
    started = time.time()
    proc = subprocess.run(["bash", "scripts/quickstart.sh", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    took = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    terminal = out / f"{args.name}_terminal.txt"
    if proc.returncode != 0:
        terminal.write_text(proc.stdout)
        raise SystemExit(f"the quickstart failed (exit {proc.returncode}); its output is in {terminal}")
    summary = cli_summary(proc.stdout)
    summary["total_time_s"] = took
    markdown = to_markdown(summary) + f"\nWhole command (set-up included): {took / 60:.1f} min\n"
    # The results first: their provenance reads the commit, which the (tracked) terminal file would mark dirty.
    write_results(out, args.name, summary, markdown,
                  configs={"quickstart": resolved_config("-c", "configs/quickstart.yaml", *overrides)})
    terminal.write_text(proc.stdout)


if __name__ == "__main__":
    main()
