"""Benchmark: which token-mask portions should the token-drop score use, and what does each cost?

    .venv/bin/python benchmarks/portion_choice.py outputs/quickstart/defend/overfit/model \
        outputs/quickstart/poison/shards --counts 1 2 3 4

Scores every row in process once per masked-token count (one image forward for cos and the attention saliency,
then one per count), then prints the detection (AUROC, precision@150 / @300) of each count alone and of the
mean of each pair of counts, with the tail strength `score.combine: pick` ranks transforms by: a score with one
count costs two image forwards per row, a pair three. `--table PATH` also keeps the drops (Parquet).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.transform_choice import tails  # noqa: E402
from ubt_ray.config import ModelConfig  # noqa: E402
from ubt_ray.core.batches import decode_images, normalize  # noqa: E402
from ubt_ray.core.scoring import (CaptionFeatures, prepare_model, similarity_and_saliency,  # noqa: E402
                                  similarity_drop, token_grid, token_order)
from ubt_ray.core.zeroshot import auroc, precision_recall_at_k  # noqa: E402
from ubt_ray.models import load_clip  # noqa: E402

KS = [150, 300]


def drops_by_count(model_dir: str, shards: str, counts: list[int], batch: int) -> pa.Table:
    """key, is_poison and drop_<c> (cos minus cos with the top c tokens masked) for every row of `shards`."""
    clip = load_clip(ModelConfig(checkpoint=model_dir))
    model = prepare_model(clip.model)
    grid = token_grid(model, clip.image_size)
    captions = CaptionFeatures(model, clip.tokenizer, torch.device("cpu"))
    data = pq.read_table(shards, columns=["key", "image", "caption", "is_poison"])
    cols: dict[str, list] = {f"drop_{c}": [] for c in counts}
    start = time.time()
    for lo in range(0, data.num_rows, batch):
        part = data.slice(lo, batch)
        x = normalize(decode_images(part.column("image").to_pylist(), clip.image_size),
                      clip.preprocess_cfg).to(next(model.parameters()).dtype)
        text = captions(part.column("caption").to_pylist())
        cos, saliency = similarity_and_saliency(model, x, text, grid)
        order = token_order(saliency)
        for c in counts:
            cols[f"drop_{c}"].append(similarity_drop(model, x, text, cos, "token_mask", order, c, grid).float().numpy())
    print(f"scored {data.num_rows} rows with {len(counts) + 1} forwards each in {time.time() - start:.1f} s")
    return pa.table({"key": data.column("key"), "is_poison": data.column("is_poison").fill_null(False),
                     **{name: np.concatenate(v) for name, v in cols.items()}})


def detection(score: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """AUROC, precision@150 / @300, and the tail strength of the top k: in robust standard deviations (what
    `score.combine: pick` compares across transforms: with the default transforms the token mask's drop must not
    out-tail blur's on a whole-image trigger) and in plain ones (the rule before)."""
    pr = precision_recall_at_k(score, truth, KS)
    tail = tails(score, k)
    return {"auroc": round(auroc(score, truth), 4), **{f"precision@{k}": round(pr[f"precision@{k}"], 3) for k in KS},
            "tail": round(tail["robust"], 2), "tail_z": round(tail["z"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="open_clip local-dir checkpoint that scores (the overfit model)")
    ap.add_argument("shards", help="the suspicious shards (Parquet, with is_poison)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 4], help="masked-token counts to score")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=300, help="top rows of the tail statistic (unlearn.num_samples)")
    ap.add_argument("--name", default="quickstart", help="label of the result files: portion_choice_<name>.{json,md}")
    ap.add_argument("--table", help="also write the drops to this Parquet file")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    table = drops_by_count(args.model, args.shards, args.counts, args.batch)
    if args.table:
        pq.write_table(table, args.table)
    truth = table.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    drop = {c: table.column(f"drop_{c}").to_numpy() for c in args.counts}
    rows = {f"{c}/64": detection(drop[c], truth, args.k) for c in args.counts}
    rows.update({f"mean({a}/64, {b}/64)": detection((drop[a] + drop[b]) / 2, truth, args.k)
                 for a, b in itertools.combinations(args.counts, 2)})
    lines = [f"| token-drop portions | forwards per row | AUROC | precision@150 | precision@300 | tail of the top "
             f"{args.k}: robust z / z |", "|---|---|---|---|---|---|"]
    for name, d in rows.items():
        lines.append(f"| {name} | {3 if name.startswith('mean') else 2} | {d['auroc']:.3f} | "
                     f"{d['precision@150']:.0%} | {d['precision@300']:.0%} | {d['tail']:.2f} / {d['tail_z']:.2f} |")
    write_results(args.out, f"portion_choice_{args.name}", {"model": args.model, "shards": args.shards, "rows": table.num_rows,
                                               "poisons": int(truth.sum()), "detection": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
