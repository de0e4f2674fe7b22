"""Benchmark (research probe): do a row's image-space neighbours disagree with its caption?

    .venv/bin/python benchmarks/caption_disagreement.py --model outputs/attacks/badnet/attack/model \
        --name badnet outputs/attacks/badnet/poison/shards --name wanet outputs/attacks/wanet/poison/shards ...

A poison carries the target's caption on another class's image, whatever its trigger. So a detector that never
looks for the trigger: embed each image in a space the trigger barely moves (here: PCA of the pixels, as they are,
3x3-blurred, or averaged over 4x4 or 8x8 cells — there are no pretrained image features on this machine), find its k nearest rows, and score the row by
how far its caption's text feature (the backdoored model's own text tower) is from its neighbours' captions:
score = 1 - mean cos(g(t_i), g(t_j)) over the k neighbours j. It needs no forward of the image tower, and it
flags mislabelled clean rows too; the label-consistent attack (captions that match their images) is out of
its reach by construction. Prints AUROC and precision@k per shard set, against `is_poison`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_io import write_results  # noqa: E402
from benchmarks.transform_choice import detection  # noqa: E402
from ubt_ray.config import ModelConfig  # noqa: E402
from ubt_ray.core.batches import decode_images  # noqa: E402
from ubt_ray.core.models import load_clip  # noqa: E402
from ubt_ray.core.scoring import blur, text_features  # noqa: E402


SPACES = {"pixels": (1, False), "pixels, blurred": (1, True), "4x4-pixel means": (4, False),
          "8x8-pixel means": (8, False)}


def image_space(pixels: torch.Tensor, dims: int, pool: int, smooth: bool) -> torch.Tensor:
    """(N, <= dims) L2-normalised PCA coordinates of the grey-level pixels, blurred or averaged over pool x pool
    cells first (coarser: less moved by a warp, less able to tell classes apart)."""
    x = pixels.float().mean(dim=1, keepdim=True) / 255.0
    if smooth:
        x = blur(x)
    if pool > 1:
        x = F.avg_pool2d(x, pool)
    x = x.flatten(1)
    dims = min(dims, x.shape[1])
    x = x - x.mean(dim=0)
    _, _, v = torch.pca_lowrank(x, q=dims, center=False, niter=4)
    return F.normalize(x @ v, dim=-1)


def neighbour_disagreement(space: torch.Tensor, text: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """1 - mean cos(text_i, text_j) over each row's k nearest rows j (cosine in `space`, itself excluded)."""
    out = torch.empty(len(space))
    for start in range(0, len(space), chunk):
        sims = space[start:start + chunk] @ space.T
        rows = torch.arange(start, min(start + chunk, len(space)))
        sims[torch.arange(len(rows)), rows] = -2.0
        idx = sims.topk(k, dim=1).indices
        out[rows] = 1 - (text[rows][:, None, :] * text[idx]).sum(-1).mean(dim=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint whose text tower embeds the captions (θ₀)")
    ap.add_argument("--name", action="append", nargs=2, metavar=("NAME", "SHARDS"), required=True)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dims", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    clip = load_clip(ModelConfig(checkpoint=args.model))
    ks = [100, 300, 600]
    result = {}
    lines = [f"Caption disagreement with the {args.k} nearest rows in PCA spaces of the pixels (at most {args.dims} "
             f"dims); text "
             f"features of {args.model}.", "",
             "| shards | poisons / rows | space | AUROC | precision@100 / @300 / @600 |", "|---|---|---|---|---|"]
    for name, shards in args.name:
        t = pq.read_table(shards, columns=["image", "caption", "is_poison"])
        truth = t.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
        captions = t.column("caption").to_pylist()
        unique = sorted(set(captions))
        with torch.no_grad():
            feats = text_features(clip.model, clip.tokenizer(unique))
        text = feats[torch.tensor([unique.index(c) for c in captions])]
        pixels = decode_images(t.column("image").to_pylist(), clip.image_size)
        result[name] = {"rows": len(truth), "poisons": int(truth.sum())}
        for space, (pool, smooth) in SPACES.items():
            score = neighbour_disagreement(image_space(pixels, args.dims, pool, smooth), text, args.k).numpy()
            m = detection(score.astype(np.float64), truth, ks)
            result[name][space] = m
            lines.append(f"| {name} | {int(truth.sum())} / {len(truth)} | {space} | {m['auroc']:.3f} | "
                         + " / ".join(f"{100 * m[f'precision@{k}']:.0f}%" for k in ks) + " |")
    write_results(args.out, "caption_disagreement", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
