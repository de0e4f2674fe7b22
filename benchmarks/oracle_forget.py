"""Benchmark: the unlearning step with a perfect detector — a forget set of the true poisons (`is_poison`).

    .venv/bin/python benchmarks/oracle_forget.py --config configs/attacks/blended.yaml \
        --select outputs/attacks/blended/defend_multi/select --transform blur --out /tmp/oracle_blended \
        experimental.score.output=outputs/attacks/blended/defend_multi/score
    .venv/bin/ubt unlearn -c configs/attacks/blended.yaml experimental.select.output=/tmp/oracle_blended \
        experimental.unlearn.output=/tmp/oracle_blended/unlearn experimental.unlearn.forget=push_away
    .venv/bin/ubt evaluate -c configs/attacks/blended.yaml --model /tmp/oracle_blended/unlearn/model

Writes `<out>/forget` (the first `--count` poisons of the config's training shards, each with the score table's
score and token order, and `--transform` as the view its forget loss trains towards) and copies `<select>/retain`
to `<out>/retain`, so that `ubt unlearn` runs exactly as after `ubt select`. It separates the two halves of the
defense: if unlearning fails on true poisons, detection is not what limits it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ubt_ray.config import load_config  # noqa: E402
from ubt_ray.phases.score import TABLE  # noqa: E402
from ubt_ray.phases.select import _pick  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--select", required=True, help="a finished select phase's output (its retain set is reused)")
    ap.add_argument("--transform", default="token_mask", help="the view each forget row is trained towards")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--out", required=True)
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "forget").mkdir(parents=True)
    shutil.copytree(Path(args.select) / "retain", out / "retain")
    poisons = pq.read_table(cfg.data.train).filter(pc.field("is_poison")).slice(0, args.count)
    scored = pq.read_table(str(Path(cfg.score.output) / TABLE), columns=["key", "score", "token_order"])
    scored = scored.filter(pc.is_in(scored.column("key"), poisons.column("key"))).sort_by([("score", "descending")])
    chosen = {row["key"]: {"rank": rank, **row, "transform": args.transform}
              for rank, row in enumerate(scored.to_pylist())}
    # Tagged as `ubt select` tags its forget rows (rank, FORGET_COLUMNS), in rank order.
    forget = _pick(poisons, chosen, frozenset()).drop_columns(["set"]).sort_by([("rank", "ascending")])
    pq.write_table(forget, out / "forget" / "part-0.parquet")
    print(f"{forget.num_rows} poisons -> {out / 'forget'}; retain copied from {args.select}")


if __name__ == "__main__":
    main()
