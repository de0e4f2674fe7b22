"""Probe: detection by the local-density scores of core/density.py (k-distance, SLOF, DAO), per k and reference size.

    .venv/bin/python benchmarks/density_probe.py MODEL_DIR SHARD_DIR [--ks 8,16,32,64] [--refs 1024,4096,16384]
        [--captions] [--name NAME]

Embeds every row of the shards (Parquet: key, image, caption, is_poison) with the model's image tower (and its
text tower for --captions) in this process, picks a seeded reference of R rows by key hash (the same rows a Ray
actor would pick), scores every row against it and prints AUROC and precision@top of each score, higher =
sparser = more suspicious as in Huang et al. (ICLR 2025). The scores presume fewer poisons in the reference
than k: the "poisons in ref" column says how many it holds; an AUROC well below 0.5 means the opposite regime
(each poison's neighbours are poisons, and the poisons are the densest rows). With --name, the table also goes
to benchmarks/results/NAME.{json,md} with its provenance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from results_io import write_results  # noqa: E402

from ubt_ray.core.batches import decode_rows  # noqa: E402
from ubt_ray.core.density import SCORES, Reference, density_scores, reference_keys  # noqa: E402
from ubt_ray.core.models import load_checkpoint_dir, pick_device  # noqa: E402
from ubt_ray.core.scoring import text_features  # noqa: E402
from ubt_ray.core.zeroshot import auroc, image_embeddings, precision_recall_at_k  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def embed(model_dir: str, shards: str, device: torch.device, batch_size: int, captions: bool):
    """Keys, is_poison flags, image embeddings (N, D) and, with `captions`, caption embeddings of the rows whose
    image decodes (both L2-normalised, float32 on the CPU)."""
    clip = load_checkpoint_dir(model_dir, device)
    clip.model.eval()
    table = pq.read_table(shards, columns=["key", "image", "caption", "is_poison"])
    table, pixels, counts = decode_rows(table, clip.image_size)
    if pixels is None:
        raise SystemExit(f"no image of {shards} decodes ({counts.rows_in} rows)")
    if counts.rows_out < counts.rows_in:
        print(f"left out {counts.rows_in - counts.rows_out} rows whose image does not decode", flush=True)
    images = image_embeddings(clip.model, torch.from_numpy(pixels), clip.preprocess_cfg, batch_size, device)
    texts = None
    if captions:
        with torch.inference_mode():
            tokens = clip.tokenizer(table.column("caption").to_pylist()).to(device)
            texts = text_features(clip.model, tokens, batch_size).cpu()
    truth = table.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    return table.column("key").to_pylist(), truth, images, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="local-dir checkpoint (open_clip_config.json + open_clip_model.safetensors)")
    ap.add_argument("shards", help="directory of Parquet shards with key, image, caption, is_poison")
    ap.add_argument("--ks", type=ints, default=[8, 16, 32, 64], help="neighbour counts k")
    ap.add_argument("--refs", type=ints, default=[1024, 4096, 16384], help="reference sizes R (rows)")
    ap.add_argument("--top", type=ints, default=[100, 300, 600], help="precision@top of the most suspicious rows")
    ap.add_argument("--seed", type=int, default=0, help="seed of the reference rows' key hash")
    ap.add_argument("--captions", action="store_true", help="also score with the captions in the reference")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--float64", action="store_true", help="distances in float64 (near-duplicates)")
    ap.add_argument("--name", help="also write benchmarks/results/NAME.{json,md}")
    args = ap.parse_args()

    device = pick_device(args.device)
    start = time.time()
    keys, truth, images, texts = embed(args.model, args.shards, device, args.batch_size, args.captions)
    if truth.all() or not truth.any():
        raise SystemExit(f"AUROC needs poisoned and clean rows; the shards have {int(truth.sum())} poisons in "
                         f"{len(truth)} rows")
    print(f"{len(keys)} rows, {int(truth.sum())} poisons, embedded in {time.time() - start:.1f} s on {device}",
          flush=True)
    dtype = torch.float64 if args.float64 else torch.float32
    images = images.to(device, dtype)
    texts = texts.to(device, dtype) if texts is not None else None
    position = {key: i for i, key in enumerate(keys)}
    top = [t for t in args.top if t <= len(keys)] or [len(keys)]
    header = ["| reference | R | poisons in ref | k | score | AUROC | " + " / ".join(f"P@{t}" for t in top) + " |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(header))
    lines, records = list(header), []
    for refs in args.refs:
        size = min(refs, len(keys))
        chosen = reference_keys(keys, args.seed, size)
        rows = torch.tensor([position[key] for key in chosen], device=device)
        in_ref = int(truth[rows.cpu().numpy()].sum())
        variants = [("images", None)] + ([("images+captions", texts)] if texts is not None else [])
        for label, caps in variants:
            pairs = 1 if caps is None else 2
            ks = [k for k in args.ks if 2 <= k <= pairs * (size - 1)]
            if not ks:
                continue
            t0 = time.time()
            ref = Reference(images[rows], chosen, max(ks), captions=None if caps is None else caps[rows])
            for k in ks:
                scores = density_scores(images, keys, ref, k)
                for name in SCORES:
                    s = scores[name].double().cpu().numpy()
                    pr = precision_recall_at_k(s, truth, top)
                    lines.append(f"| {label} | {size} | {in_ref} | {k} | {name} | {auroc(s, truth):.3f} | "
                                 + " / ".join(f"{100 * pr[f'precision@{t}']:.0f}%" for t in top) + " |")
                    print(lines[-1], flush=True)
                    records.append({"reference": label, "rows": size, "poisons_in_reference": in_ref, "k": k,
                                    "score": name, "auroc": auroc(s, truth), **pr})
            print(f"(R={size} {label}: {time.time() - t0:.1f} s for {len(ks)} k values)", file=sys.stderr,
                  flush=True)
    if args.name:
        intro = (f"Model {args.model}, shards {args.shards}: {len(keys)} rows, {int(truth.sum())} poisons; "
                 f"higher score = sparser neighbourhood = more suspicious.")
        write_results(Path(__file__).resolve().parent / "results", args.name,
                      {"model": args.model, "shards": args.shards, "rows": records}, intro + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
