"""Benchmark: the neighbour and concept choices of score.method = caption_disagreement, per attack.

    .venv/bin/python benchmarks/caption_disagreement.py \
        --name badnet outputs/attacks/badnet/poison/shards outputs/attacks/badnet/attack/model \
        --name wanet outputs/attacks/wanet/poison/shards outputs/attacks/wanet/attack/model ...

Each shard set is scored with its own backdoored model's text tower (θ₀, as `ubt defend` with
benchmarks/configs/caption_disagreement.yaml does), through the same core functions (core/neighbours.py), in one process:
neighbours = the nearest rows, or a ring of ranks; with or without ranking the target concept's rows first.
Prints AUROC, precision@k and how many poisons fall outside the top 5% (those can enter the retain set, whose
pool is the 95% least suspicious rows), against `is_poison`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.transform_choice import detection  # noqa: E402
from ubt_ray.config import ModelConfig, ScoreConfig  # noqa: E402
from ubt_ray.core.batches import decode_images  # noqa: E402
from ubt_ray.core.neighbours import (grey_vectors, pixel_space, ring_disagreement,  # noqa: E402
                                     target_concept_first)
from ubt_ray.core.scoring import CaptionFeatures  # noqa: E402
from ubt_ray.models import load_clip  # noqa: E402

# (label, first rank, last rank, target concept first)
VARIANTS = [("nearest 20", 0, 20, False), ("nearest 300", 0, 300, False), ("ranks 100-400", 100, 400, False),
            ("nearest 20, target concept first", 0, 20, True), ("nearest 300, target concept first", 0, 300, True),
            ("ranks 100-400, target concept first (default)", 100, 400, True)]
KS = [100, 300, 600]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", action="append", nargs=3, metavar=("NAME", "SHARDS", "MODEL"), required=True)
    ap.add_argument("--select", type=int, default=300, help="unlearn.num_samples: rows whose concept is the target")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    defaults = ScoreConfig()
    result = {}
    lines = [f"caption_disagreement variants ({defaults.neighbour_dims} principal axes of 32x32 grey pixels; text "
             f"features of each set's own backdoored model; target concept from the top {args.select}, cosine >= "
             f"{defaults.concept_similarity}).", "",
             "| shards | poisons / rows | neighbours | AUROC | precision@100 / @300 / @600 | poisons outside the top 5% |",
             "|---|---|---|---|---|---|"]
    for name, shards, model in args.name:
        clip = load_clip(ModelConfig(checkpoint=model))
        t = pq.read_table(shards, columns=["image", "caption", "is_poison"])
        truth = t.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
        text = CaptionFeatures(clip.model, clip.tokenizer, torch.device("cpu"))(t.column("caption").to_pylist())
        grey = grey_vectors(decode_images(t.column("image").to_pylist(), clip.image_size))
        space = pixel_space(grey, defaults.neighbour_dims)
        result[name] = {"rows": len(truth), "poisons": int(truth.sum()), "model": model}
        everyone = torch.arange(len(truth))
        rings = {}
        for label, first, last, concept in VARIANTS:
            if (first, last) not in rings:
                rings[first, last] = torch.cat([ring_disagreement(everyone[i:i + 1024], space, text, first, last)
                                                for i in range(0, len(truth), 1024)])
            score = rings[first, last]
            if concept:
                score, _, _ = target_concept_first(score, text, args.select, defaults.concept_similarity)
            m = detection(score.numpy().astype(np.float64), truth, KS)
            m["poisons_outside_top_5pct"] = int(truth.sum() - truth[np.argsort(-score.numpy())[:len(truth) // 20]].sum())
            result[name][label] = m
            lines.append(f"| {name} | {int(truth.sum())} / {len(truth)} | {label} | {m['auroc']:.3f} | "
                         + " / ".join(f"{100 * m[f'precision@{k}']:.0f}%" for k in KS)
                         + f" | {m['poisons_outside_top_5pct']} |")
            print(lines[-1], flush=True)
    write_results(args.out, "caption_disagreement", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
