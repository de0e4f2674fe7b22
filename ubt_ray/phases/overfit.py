"""overfit: fine-tune a copy θₒ of the suspicious model on D so the backdoor shortcut grows (METHOD.md step 1).

High learning rate, no weight decay, no augmentation, a few dozen steps of the one training loop. With
`overfit.subset_fraction` < 1 it trains on a subset: a seeded sample, or (`prioritize: weak_similarity`)
the rows whose image-text similarity under θ₀ is weakest, found by a `cosine` scoring pass (the score phase,
into <output>/similarity), whose cost is part of the overfit's manifest.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow.compute as pc

from .. import storage
from ..cluster import ensure_ray
from ..checks import check_overfit
from ..config import Config
from ..core.score_rows import keep_keys
from ..shards import read_columns, read_shards, validate_and_write, write_hash_sample
from ..train_loop import FitResult, FitSpec, fit
from .score import score

SUBSET_ROWS_PER_FILE = 10_000  # rows per Parquet file of the overfit subset


def overfit(cfg: Config, model_uri: str, data: str) -> FitResult:
    """Overfit the checkpoint at `model_uri` on `data` (or its configured subset); θₒ goes to <output>/model."""
    started = time.time()
    o = cfg.overfit
    check_overfit(o)
    storage.claim_output(o.output, "overfit", cfg.storage)
    train_data, costs = (data, []) if o.subset_fraction >= 1 else _subset(cfg, model_uri, data)
    return fit(cfg, FitSpec(phase="overfit", data=train_data, output=o.output,
                            init=dataclasses.replace(cfg.model, checkpoint=model_uri), schedule=o,
                            started=started, costs_before=costs))


def _subset(cfg: Config, model_uri: str, data: str) -> tuple[str, list[dict]]:
    """The subset's shards, and the cost blocks of the scoring that chose it (none for a seeded sample)."""
    o = cfg.overfit
    ensure_ray(cfg.ray)
    out = storage.join(o.output, "subset")
    if o.prioritize == "weak_similarity":
        sim = score(cfg, model_uri, data, output=storage.join(o.output, "similarity"), k=None, method="cosine")
        cos = read_columns(sim.table, cfg.storage, ["key", "cos"])
        threshold = float(np.quantile(cos.column("cos").to_numpy(), o.subset_fraction))
        keys = cos.column("key").filter(pc.less_equal(cos.column("cos"), threshold)).combine_chunks()
        ds = read_shards(data, cfg).map_batches(keep_keys, batch_format="pyarrow", fn_kwargs={"keys": keys})
        validate_and_write(ds, out, cfg, rows_per_file=SUBSET_ROWS_PER_FILE)
        return out, [sim.manifest["cost"]]
    return write_hash_sample(data, out, o.subset_fraction, cfg), []

