"""Benchmark: the end-to-end test's defense (tests/test_defend.py) over several seeds, so that its bounds rest on
a measured spread: per seed, the backdoored model's and the cleaned model's CA, held-out-prompt CA and ASR, the
detection, and where the CA was lost (the target class, and the three other classes that lost most).

    .venv/bin/python benchmarks/defense_seeds.py --seeds 2 3 4 5 [--attack blended] [--out DIR] [--name NAME]

Each seed, one after the other in its own process (one local Ray each): the test fixture's steps (3,000
Fashion-MNIST rows, 150 poisons, the tests' small CLIP, 10 epochs) then the default `ubt defend` with the test's
sizes (150 forget rows, 1,500 retain rows), into DIR/seed-N. A seed whose run finished is read back, not rerun.
Writes NAME.md and NAME.json (default defense_seeds_<attack>).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from results_io import write_results

REPO = Path(__file__).resolve().parent.parent

# The fixture of tests/test_defend.py and the test's defense, run in a fresh process per seed.
RUN_SEED = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path[:0] = [{repo!r}, {tests!r}]
    import ray
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    from ubt_ray.cli import main
    from helpers import UBT, backdoor_fixture
    root = Path({root!r})
    ov = backdoor_fixture(root, {attack!r}, {seed})
    assert main(["poison", *ov]) == 0
    assert main(["train", *ov]) == 0
    assert main(["evaluate", *ov, "--model", str(root / "attack" / "model")]) == 0
    assert main(["defend", *ov, *UBT]) == 0
""")

def run_seed(root: Path, attack: str, seed: int) -> dict:
    report = root / "defend" / "report.json"
    if not report.is_file():
        code = RUN_SEED.format(repo=str(REPO), tests=str(REPO / "tests"), root=str(root), attack=attack, seed=seed)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    r = json.loads(report.read_text())
    before = json.loads((root / "defend" / "eval_before" / "metrics.json").read_text())
    after = json.loads((root / "defend" / "eval_after" / "metrics.json").read_text())
    picked = json.loads((root / "defend" / "score" / "manifest.json").read_text()).get("picked_signal")
    return {"seed": seed, "before": {k: before[k] for k in ("clean_accuracy", "clean_accuracy_heldout",
                                                             "attack_success_rate", "class_accuracy")},
            "after": {k: after[k] for k in ("clean_accuracy", "clean_accuracy_heldout", "attack_success_rate",
                                            "class_accuracy")},
            "target_label": before["target_label"], "class_names": before["fingerprint"]["settings"]["data"]["class_names"],
            "detection": r["detection"], "picked": picked,
            "defense_wall_time_s": r.get("defense_wall_time_s")}


def pts(a: float, b: float) -> str:
    return f"{100 * (b - a):+.1f}"


def markdown(rows: list[dict], attack: str) -> str:
    lines = ["| seed | CA | CA (held-out prompts) | ASR | AUROC | P@150 | picked | ΔCA of the target class | "
             "the three other classes that lost most (ΔCA) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, t = r["before"], r["after"], r["target_label"]
        losses = sorted((y - x, c) for c, (x, y) in enumerate(zip(b["class_accuracy"], a["class_accuracy"]))
                        if c != t and x is not None)[:3]
        d = r["detection"]
        lines.append(
            f"| {r['seed']} | {100 * b['clean_accuracy']:.1f} → {100 * a['clean_accuracy']:.1f}% "
            f"({pts(b['clean_accuracy'], a['clean_accuracy'])}) | {100 * b['clean_accuracy_heldout']:.1f} → "
            f"{100 * a['clean_accuracy_heldout']:.1f}% ({pts(b['clean_accuracy_heldout'], a['clean_accuracy_heldout'])}) | "
            f"{100 * b['attack_success_rate']:.1f} → {100 * a['attack_success_rate']:.1f}% | {d['auroc']:.3f} | "
            f"{100 * d['precision@150']:.0f}% | {r['picked']} | "
            f"{pts(b['class_accuracy'][t], a['class_accuracy'][t])} | "
            + ", ".join(f"{r['class_names'][c]} {100 * d:+.1f}" for d, c in losses) + " |")
    ca = [100 * (r["after"]["clean_accuracy"] - r["before"]["clean_accuracy"]) for r in rows]
    asr = [100 * (r["before"]["attack_success_rate"] - r["after"]["attack_success_rate"]) for r in rows]
    lines += ["", f"The default `ubt defend` on the {attack} fixture of tests/test_defend.py (3,000 rows, 150 "
              f"poisons, the tests' small CLIP), one fresh training per seed. Over these seeds ASR fell "
              f"{min(asr):.1f} to {max(asr):.1f} points and CA changed {min(ca):+.1f} to {max(ca):+.1f} points; "
              f"ΔCA per class in points."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5])
    ap.add_argument("--attack", default="blended")
    ap.add_argument("--out", default="outputs/bench/defense_seeds")
    ap.add_argument("--name", default=None)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(out / args.attack / f"seed-{seed}", args.attack, seed))
        print(f"seed {seed} done", file=sys.stderr, flush=True)
    name = args.name or f"defense_seeds_{args.attack}"
    write_results(args.results, name, rows, markdown(rows, args.attack))


if __name__ == "__main__":
    main()
