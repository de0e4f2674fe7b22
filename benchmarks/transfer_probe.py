"""Detection only: re-rank the top of a score table by the trigger-transfer test (ubt_ray/core/transfer.py).

    .venv/bin/python benchmarks/transfer_probe.py --model M --shards S --table T --k 300 \
        [--pools 2 4 8] [--refs 8 32] [--name transfer_probe]

For the top `pool x k` rows of a score table made without the test (score.transfer_pool=0), each row's lift
(what its transform removes, put on reference images: the mean rise of their similarity to the row's caption),
against the `refs` rows of lowest seeded key rank outside the pool, exactly as the score phase picks them. Writes
precision@k of the table's score, of the lift alone and of the two fused by rank (`fuse_ranks`, what the score
phase does), for each pool and reference count (results_io).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from ubt_ray.config import ModelConfig, load_config  # noqa: E402
from ubt_ray.core.batches import decode_images, normalize  # noqa: E402
from ubt_ray.core.density import key_rank  # noqa: E402
from ubt_ray.core.scoring import CaptionFeatures, prepare_model, token_grid, tokens_to_take  # noqa: E402
from ubt_ray.core.transfer import fuse_ranks, transfer_lift  # noqa: E402
from ubt_ray.models import load_clip  # noqa: E402


def rows_of(src: pa.Table, keys: list[str]) -> pa.Table:
    """The rows of `src` whose key is in `keys`, in their order."""
    return src.take(pc.index_in(pa.array(keys), value_set=src.column("key")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the scoring model (the overfit θₒ of the defense that scored)")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--table", required=True, help="a score table made with score.transfer_pool=0")
    ap.add_argument("--k", type=int, required=True, help="the rows the selection takes (unlearn.num_samples)")
    ap.add_argument("--pools", type=int, nargs="+", default=[2, 4, 8], help="pool sizes, in multiples of k")
    ap.add_argument("--refs", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seed", type=int, default=0, help="run.seed of the reference rows' rank")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default="transfer_probe")
    args = ap.parse_args()
    torch.set_num_threads(2)
    s = load_config().score
    table = pq.read_table(args.table)
    if "transfer_lift" in table.column_names:
        raise SystemExit(f"{args.table} was already re-ranked (score.transfer_pool > 0): probe a table made without.")
    order = np.argsort(-table.column("score").to_numpy(), kind="stable")
    truth_all = table.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    clip = load_clip(ModelConfig(checkpoint=args.model))
    prepare_model(clip.model, s.amp)
    dtype = next(clip.model.parameters()).dtype
    grid = token_grid(clip.model, clip.image_size)
    count = tokens_to_take(max(s.token_portions), grid)
    captions = CaptionFeatures(clip.model, clip.tokenizer, torch.device("cpu"))
    all_keys = table.column("key").to_pylist()
    shards = pq.read_table(args.shards, columns=["key", "image", "caption"])  # read once, every pool takes from it
    records = []
    for mult in sorted(args.pools):
        n = min(mult * args.k, table.num_rows)
        pool = table.take(pa.array(order[:n]))
        keys = pool.column("key").to_pylist()
        inside = set(keys)
        ranked = sorted((key_rank(args.seed, k), k) for k in all_keys if k not in inside)
        src = rows_of(shards, keys)
        x = normalize(decode_images(src.column("image").to_pylist(), clip.image_size), clip.preprocess_cfg).to(dtype)
        text = captions(src.column("caption").to_pylist())
        transforms = (pool.column("transform").to_pylist() if "transform" in pool.column_names
                      else ["token_mask"] * n)
        tokens = (torch.tensor(np.stack(pool.column("token_order").to_numpy(zero_copy_only=False)).astype(np.int64))
                  if "token_order" in pool.column_names else None)
        truth = pool.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
        score = pool.column("score").to_numpy().astype(np.float64)
        for r in sorted(args.refs):
            ref_rows = rows_of(shards, [k for _, k in ranked[:r]])
            y = normalize(decode_images(ref_rows.column("image").to_pylist(), clip.image_size),
                          clip.preprocess_cfg).to(dtype)
            started = time.time()
            lift = transfer_lift(clip.model, x, text, y, transforms, tokens, count, grid, s.batch_size).numpy()
            took = time.time() - started
            fused = fuse_ranks(score, lift)

            def precision(values):
                return float(truth[np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:args.k]].mean())

            records.append({"pool": n, "pool_poisons": int(truth.sum()), "refs": r, "seconds": round(took, 1),
                            "score": precision(score), "lift": precision(lift), "fused": precision(fused)})
            print(records[-1], flush=True)
    picked = sorted(set(table.column("transform").to_pylist())) if "transform" in table.column_names else ["token_mask"]
    lines = [f"Score table {args.table} ({table.num_rows} rows, {int(truth_all.sum())} poisons, transform "
             f"{', '.join(picked)}), lifts under {args.model}; k = {args.k}.", "",
             f"| pool (poisons in it) | reference images | precision@{args.k}: score | lift alone | fused (rank sum) "
             f"| test time |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['pool']} ({r['pool_poisons']}) | {r['refs']} | {r['score']:.1%} | {r['lift']:.1%} | "
                     f"{r['fused']:.1%} | {r['seconds']} s |")
    write_results(args.out, args.name, {"table": args.table, "model": args.model, "k": args.k, "records": records},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
