"""Benchmark: which trigger-removing transform should a defense trust, when it does not know the attack?

    .venv/bin/python benchmarks/transform_choice.py --name badnet outputs/attacks/badnet/defend_auto/score/table \
        --name blended outputs/attacks/blended/score_tm_blur/table ...

Reads score tables written with several `score.transforms` (one `drop_<transform>` column each, and `is_poison`)
and prints, per table and transform: the detection of that transform's drop alone (AUROC, precision@k), and
how far its top k drops stand above the rest (`tail_strength`, what `score.combine: pick` ranks transforms by:
standard deviations above the mean; and in robust ones above the median); plus the detection of the max of
standardised drops (the `max_z` combination). A rule is good when the transform with the strongest tail is the one that detects best.
`--extra NAME TABLE` adds another run's drops of the same rows to table NAME, e.g. the 2/64 token-mask drop of
`benchmarks/portion_choice.py --counts 2 --table T` (as `drop_mask2`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from ubt_ray.core.scoring import robust_center_scale, tail_strength  # noqa: E402
from ubt_ray.core.zeroshot import auroc, precision_recall_at_k  # noqa: E402


def tails(d: np.ndarray, k: int) -> dict:
    """How far the mean of the top k values stands above the rest: in standard deviations about the mean
    (`z`), and in robust ones about the median (`robust`: 1.4826 MAD, which the tail itself cannot inflate)."""
    top = torch.from_numpy(np.sort(d)[-k:])
    return {"z": tail_strength(top, float(d.mean()), float(d.std())),
            "robust": tail_strength(top, *robust_center_scale(d))}


def detection(scores: np.ndarray, truth: np.ndarray, ks: list[int]) -> dict:
    pr = precision_recall_at_k(scores, truth, ks)
    return {"auroc": auroc(scores, truth), **{k: v for k, v in pr.items() if k.startswith("precision")}}


def with_extra_drops(table: pa.Table, extra: pa.Table) -> pa.Table:
    """`table` with the drop_* columns of `extra` (the same rows, matched by key); portion_choice's drop_<count>
    is renamed drop_mask<count>, so that it sits beside the score table's drop_token_mask."""
    names = {c: f"drop_mask{c[len('drop_'):]}" if c[len("drop_"):].isdigit() else c
             for c in extra.column_names if c.startswith("drop_")}
    mine = table.select(["key", "is_poison", *[c for c in table.column_names if c.startswith("drop_")]])
    joined = mine.join(extra.select(["key", *names]).rename_columns(["key", *names.values()]), "key")
    if joined.num_rows != table.num_rows or extra.num_rows != table.num_rows:
        raise SystemExit(f"the extra table has {extra.num_rows} rows, {joined.num_rows} matching the table's "
                         f"{table.num_rows} keys: give it the same rows")
    return joined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", action="append", nargs=2, metavar=("NAME", "TABLE"), required=True,
                    help="a label and a score table directory (Parquet) with drop_* and is_poison columns")
    ap.add_argument("--extra", action="append", nargs=2, default=[], metavar=("NAME", "TABLE"),
                    help="more drop_* columns for table NAME, joined by key from another table (e.g. "
                         "benchmarks/portion_choice.py --table: drop_<count> becomes drop_mask<count>)")
    ap.add_argument("--name-out", default="transform_choice", help="result files: <out>/<this>.{json,md}")
    ap.add_argument("--k", type=int, default=300, help="top rows the tail statistic looks at (unlearn.num_samples)")
    ap.add_argument("--sample", type=float, default=0.1, help="also decide on seeded samples of this share of rows")
    ap.add_argument("--repeats", type=int, default=20, help="samples drawn per table")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    ks = [100, 300, 600]
    result, sample_lines = {}, []
    lines = ["| table | transform | tail of the top %d: z / robust z | AUROC | precision@100 / @300 / @600 |" % args.k,
             "|---|---|---|---|---|"]
    for name, path in args.name:
        t = pq.read_table(path)
        for extra_name, extra_path in args.extra:
            if extra_name == name:
                t = with_extra_drops(t, pq.read_table(extra_path))
        truth = t.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
        drops = {c[len("drop_"):]: t.column(c).to_numpy().astype(np.float64)
                 for c in t.column_names if c.startswith("drop_")}
        rows = {}
        for transform, d in sorted(drops.items()):
            rows[transform] = {"tail": tails(d, args.k), **detection(d, truth, ks)}
        # The same decision on small samples (k scaled with them): how often each transform wins.
        rng = np.random.default_rng(0)
        n, k_small = len(truth), max(1, round(args.k * args.sample))
        wins = {statistic: dict.fromkeys(drops, 0) for statistic in ("robust", "z")}
        for _ in range(args.repeats):
            idx = rng.choice(n, size=round(n * args.sample), replace=False)
            strengths = {t: tails(d[idx], k_small) for t, d in drops.items()}
            for statistic, tally in wins.items():
                tally[max(strengths, key=lambda t: strengths[t][statistic])] += 1
        z = np.stack([(d - d.mean()) / d.std() for d in drops.values()], axis=1).max(axis=1)
        rows["max_z"] = {"tail": None, **detection(z, truth, ks)}
        result[name] = {"rows": len(truth), "poisons": int(truth.sum()), "transforms": rows, "sample_wins": wins}
        sample_lines.append(f"| {name} | " + " | ".join(", ".join(f"{t} {w}" for t, w in sorted(tally.items()))
                                                     for tally in wins.values()) + " |")
        for transform, r in rows.items():
            tail = "" if r["tail"] is None else f"{r['tail']['z']:.2f} / {r['tail']['robust']:.2f}"
            prec = " / ".join(f"{100 * r[f'precision@{k}']:.0f}%" for k in ks)
            lines.append(f"| {name} ({int(truth.sum())} poisons) | {transform} | {tail} | {r['auroc']:.3f} | {prec} |")
    lines += ["", f"Picked (largest tail) on {args.repeats} random {100 * args.sample:.0f}% samples, top "
              f"{max(1, round(args.k * args.sample))}:", "", "| table | wins by the robust z (pick's rule) | wins "
              "by the plain z |", "|---|---|---|"] + sample_lines
    write_results(args.out, args.name_out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
