"""Prototype: re-rank the top of a score table by how much each row's embedding shift agrees with the shift
shared by the current top.

    .venv/bin/python benchmarks/shift_consensus.py --model M --shards S --table T [--pool 1000 2000 4000] \
        [--k 300] [--rounds 3] [--name shift_consensus]

A trigger-removing transform moves a poison's image embedding along the direction the trigger adds (the same
for every poison of one attack), while a clean row that the transform happens to move goes its own way. For the
`--pool` rows of highest score: s = f(x) - f(x̄) (x̄: the row's own transform, token order from the table), then
rounds of d = mean of the normalised s of the current top k, then a new score of each pool row from d (cos(s, d),
the projection s.d, their rank sums with the table's score, or the score times max(cos(s, d), 0)). Writes the
precision@k of each variant after each round (results_io), with the table's own precision@k beside them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from ubt_ray.config import ModelConfig, load_config  # noqa: E402
from ubt_ray.core.batches import decode_images, normalize  # noqa: E402
from ubt_ray.core.scoring import image_features, remove_trigger, token_grid, tokens_to_take  # noqa: E402
from ubt_ray.models import load_clip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--pool", type=int, nargs="+", default=[3000])
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--portions", type=float, nargs="+", default=load_config().score.token_portions,
                    help="the token mask's portions (default: the scoring default's)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="shift_consensus")
    args = ap.parse_args()
    torch.set_num_threads(2)
    table = pq.read_table(args.table)
    order = np.argsort(-table.column("score").to_numpy(), kind="stable")
    truth_all = table.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    pool_n = max(args.pool)
    pool = table.take(pa.array(order[:pool_n]))
    keys = pool.column("key").to_pylist()
    src = pq.read_table(args.shards, columns=["key", "image"])
    src = src.filter(pc.is_in(src.column("key"), value_set=pa.array(keys)))
    pos = {k: i for i, k in enumerate(src.column("key").to_pylist())}
    src = src.take(pa.array([pos[k] for k in keys]))
    clip = load_clip(ModelConfig(checkpoint=args.model))
    model = clip.model.eval()
    grid = token_grid(model, clip.image_size)
    counts = sorted({tokens_to_take(p, grid) for p in args.portions})
    transform = pool.column("transform").to_pylist() if "transform" in pool.column_names else ["token_mask"] * pool_n
    if len(set(transform)) > 1:
        raise SystemExit(f"{args.table} mixes transforms (score.combine max_z): re-rank a table of the pick combine, "
                         f"which gives every row the same transform.")
    orders = (torch.tensor(pool.column("token_order").to_pylist(), dtype=torch.long)
              if "token_order" in pool.column_names else None)
    shifts = []
    with torch.no_grad():
        for lo in range(0, pool_n, 256):
            px = decode_images(src.column("image").slice(lo, 256).to_pylist(), clip.image_size)
            x = normalize(px, clip.preprocess_cfg)
            f = image_features(model, x)
            t = transform[lo]
            if t == "token_mask":
                o = orders[lo:lo + 256]
                fb = torch.stack([image_features(model, remove_trigger(x, t, o, c, grid)) for c in counts]).mean(0)
            else:
                fb = image_features(model, remove_trigger(x, t))
            shifts.append(f - fb)
    raw = torch.cat(shifts)
    s = F.normalize(raw, dim=-1)
    truth = pool.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    base = torch.from_numpy(pool.column("score").to_numpy().astype(np.float32))

    def ranks(v):
        return torch.argsort(torch.argsort(v)).float() / len(v)

    records = []
    for n in sorted(args.pool):
        ss, rr, bb = s[:n], raw[:n], base[:n]
        variants = {
            "cos(s, d)": lambda d: ss @ d,
            "s.d": lambda d: rr @ d,
            "rank sum: score, cos(s, d)": lambda d: ranks(ss @ d) + ranks(bb),
            "rank sum: score, s.d": lambda d: ranks(rr @ d) + ranks(bb),
            "score x max(cos(s, d), 0)": lambda d: bb * (ss @ d).clamp(min=0),
        }
        for name, fn in variants.items():
            sc, by_round = bb.clone(), []
            for _ in range(args.rounds):
                top = torch.argsort(sc, descending=True)[:args.k]
                d = F.normalize(ss[top].mean(0), dim=0)
                sc = fn(d)
                got = np.asarray(torch.argsort(sc, descending=True)[:args.k])
                by_round.append(float(truth[:n][got].mean()))
            records.append({"pool": n, "pool_poisons": int(truth[:n].sum()), "variant": name,
                            "precision_by_round": by_round})
    table_p = float(truth[:args.k].mean())
    lines = [f"Score table {args.table} ({table.num_rows} rows, {int(truth_all.sum())} poisons, transform "
             f"{', '.join(sorted(set(transform)))}), shifts under {args.model}. The table's own precision@{args.k}: "
             f"{table_p:.1%}.", "",
             f"| pool (poisons in it) | re-ranking | precision@{args.k} after round " + " / ".join(
                 str(r + 1) for r in range(args.rounds)) + " |", "|---|---|---|"]
    for r in records:
        lines.append(f"| {r['pool']} ({r['pool_poisons']}) | {r['variant']} | "
                     + " / ".join(f"{v:.1%}" for v in r["precision_by_round"]) + " |")
    write_results(args.out, args.name, {"table": args.table, "model": args.model, "k": args.k,
                                        "table_precision": table_p, "records": records}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
