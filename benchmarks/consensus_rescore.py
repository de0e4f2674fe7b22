"""Benchmark (prototype, not in the pipeline): re-rank a score table by how much each row's high-frequency
residual agrees with the residual shared by the current top of the ranking.

    .venv/bin/python benchmarks/consensus_rescore.py --config configs/attacks/blended.yaml \
        --column drop_blur experimental.score.output=outputs/attacks/blended/defend_multi/score

Poisons of one attack share one trigger; when it is a fixed additive pattern, their residuals r = x - blur(x)
agree where clean images' residuals (their own edges) do not. Each round takes the mean of the centred residuals
of the top `--first` rows (then `--top`), and scores every row by the cosine of its residual to that mean.
Prints AUROC and precision@k of the table's column and of each round. Reads every image into memory (60,000
Fashion-MNIST rows: 0.7 GB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ubt_ray.config import load_config  # noqa: E402
from ubt_ray.core.batches import decode_images  # noqa: E402
from ubt_ray.core.scoring import blur  # noqa: E402
from ubt_ray.core.zeroshot import auroc, precision_recall_at_k  # noqa: E402
from ubt_ray.phases.score import TABLE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--column", default="score", help="the score table's column to start from")
    ap.add_argument("--first", type=int, default=1200, help="rows whose residuals make the first estimate")
    ap.add_argument("--top", type=int, default=300, help="rows of each later estimate")
    ap.add_argument("--rounds", type=int, default=3)
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    table = pq.read_table(str(Path(cfg.score.output) / TABLE), columns=["key", args.column, "is_poison"])
    shards = pq.read_table(cfg.data.train, columns=["key", "image"])
    where = {k: i for i, k in enumerate(shards.column("key").to_pylist())}
    images = shards.column("image").to_pylist()
    x = decode_images([images[where[k]] for k in table.column("key").to_pylist()], 32).float() / 255
    residual = (x - blur(x)).flatten(1)
    residual -= residual.mean(0)
    norms = residual.norm(dim=1).clamp_min(1e-6)
    truth = table.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    scores = table.column(args.column).to_numpy().astype(np.float64)

    def show(name: str, s: np.ndarray) -> None:
        pr = precision_recall_at_k(s, truth, [150, 300, 600])
        print(f"{name:>22}: AUROC {auroc(s, truth):.3f}  "
              + "  ".join(f"p@{k} {pr[f'precision@{k}']:.2f}" for k in (150, 300, 600)))

    show(args.column, scores)
    for round_ in range(args.rounds):
        top = np.argsort(-scores, kind="stable")[:args.first if round_ == 0 else args.top]
        shared = residual[top].mean(0)
        scores = ((residual @ (shared / shared.norm())) / norms).numpy().astype(np.float64)
        show(f"consensus round {round_ + 1}", scores)


if __name__ == "__main__":
    main()
