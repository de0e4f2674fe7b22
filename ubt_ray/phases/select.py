"""select: the top-k most suspicious rows to unlearn, and a retain set of the least suspicious (METHOD.md step 3).

Driver memory is bounded by k (and by the retain set's size), never by |D|: each block keeps its own top-k
(a Ray Data task), and the driver merges those k-row tables one at a time. Ties are broken by key, so the
result does not depend on how the table is split into blocks. The retain set is a seeded sample (rows ordered
by a hash of seed and key) of the rows whose score is below the `select.retain_pool` quantile, estimated on
that same sample, so it is spread over captions like D rather than skewed toward whatever scores lowest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import console, storage
from ..cluster import ensure_ray
from ..config import Config
from ..errors import UserError
from ..cost import cluster_cpu_usage
from ..manifest import write_manifest
from ..shards import TABLE, block_top_k, count_rows, key_hash, merge_top_k, read_shards

FORGET, RETAIN = "forget", "retain"
# Score-table columns the forget rows carry into their shards (those the score table has).
FORGET_COLUMNS = {"score": pa.float32(), "transform": pa.string(), "token_order": pa.list_(pa.int16())}


@dataclass
class SelectResult:
    forget: str
    retain: str
    num_forget: int
    num_retain: int
    stats: dict
    wall_time_s: float
    manifest: dict


def _with_hash(table: pa.Table, seed: int) -> pa.Table:
    h = [key_hash(k, seed) for k in table.column("key").to_pylist()]
    return table.append_column("sample_hash", pa.array(h, pa.int64()))


def _pick(table: pa.Table, forget: dict, retain: frozenset) -> pa.Table:
    """Ray Data UDF: keep the selected rows, tagged with their set and (forget rows) their score columns."""
    keys = table.column("key").to_pylist()
    keep = [i for i, k in enumerate(keys) if k in forget or k in retain]
    table = table.take(pa.array(keep, pa.int64()))
    keys = [keys[i] for i in keep]
    table = table.append_column("set", pa.array([FORGET if k in forget else RETAIN for k in keys], pa.string()))
    rank = [forget[k]["rank"] if k in forget else -1 for k in keys]
    table = table.append_column("rank", pa.array(rank, pa.int32()))
    carried = next(iter(forget.values()), {})
    for name, typ in FORGET_COLUMNS.items():
        if name in carried:
            table = table.append_column(name, pa.array([forget[k][name] if k in forget else None for k in keys], typ))
    return table


def _candidates(table: pa.Table, k: int, sample_size: int, seed: int) -> pa.Table:
    """Ray Data UDF: a block's top-k by score and its first `sample_size` rows by hash, tagged by role."""
    top = block_top_k(table, k, "score").append_column("role", pa.array([FORGET] * min(k, table.num_rows)))
    hashed = block_top_k(_with_hash(table.select(["key", "score"]), seed), sample_size, "sample_hash", False)
    hashed = hashed.append_column("role", pa.array([RETAIN] * hashed.num_rows))
    return pa.concat_tables([top, hashed], promote_options="permissive")


@console.phase("select", lambda cfg, scores, data, output=None, *, k: f"the {k} "
               f"most suspicious rows under {scores} and a retain set",
               lambda r: f"{r.num_forget} forget rows, {r.num_retain} retain rows")
def select(cfg: Config, scores: str, data: str, output: str | None = None, *, k: int) -> SelectResult:
    """Write the top-k rows of the score table under `scores` (with their images) to `<output>/forget`,
    and a retain set to `<output>/retain`."""
    started = time.time()
    sel = cfg.select
    output = output or sel.output
    storage.claim_output(output, "select", cfg.storage)
    ensure_ray(cfg.ray)
    table_uri = storage.join(scores, TABLE)
    total = count_rows(table_uri, cfg.storage)
    if total <= k:
        raise UserError(f"unlearn.num_samples={k} is not below the {total} scored rows under {table_uri}: "
                        f"select fewer rows to unlearn.")
    score_ds = read_shards(table_uri, cfg, required=("key", "score"))
    names = score_ds.schema().names
    keep = [c for c in ("key", *FORGET_COLUMNS, "is_poison") if c in names]
    # The retain sample: the first rows by a hash of (seed, key), enough that the pool's share covers the set.
    wanted = min(sel.retain_samples, total - k)
    sample_size = min(total, math.ceil(wanted / sel.retain_pool * 1.25) + k + 1000)
    # One pass over the score table yields both candidate sets; the driver merges them block by block.
    merged = {FORGET: None, RETAIN: None}
    console.log.info(f"[select] 1/2: top {k} and a retain sample of the {total} scored rows")
    candidates = score_ds.select_columns(keep).map_batches(
        _candidates, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"k": k, "sample_size": sample_size, "seed": cfg.run.seed})
    for batch in candidates.iter_batches(batch_format="pyarrow", batch_size=None):
        for role, by, size, desc in ((FORGET, "score", k, True), (RETAIN, "sample_hash", sample_size, False)):
            part = batch.filter(pc.equal(batch.column("role"), role)).drop_columns(["role"])
            if role == RETAIN:
                part = part.select(["key", "score", "sample_hash"])
            else:
                part = part.drop_columns(["sample_hash"])
            merged[role] = merge_top_k([t for t in (merged[role], part) if t is not None], size, by, desc)
    forget_table, sample = merged[FORGET], merged[RETAIN]
    forget = {}
    for rank, row in enumerate(forget_table.to_pylist()):
        forget[row["key"]] = {"rank": rank, **{c: row[c] for c in FORGET_COLUMNS if c in row}}
    threshold = float(np.quantile(sample.column("score").to_numpy(), sel.retain_pool)) if sel.retain_pool < 1 \
        else math.inf
    retain = [row["key"] for row in sample.to_pylist() if row["score"] <= threshold and row["key"] not in forget]
    retain = frozenset(retain[:wanted])
    if len(retain) < 2:
        raise UserError(f"only {len(retain)} rows qualify for the retain set: raise select.retain_pool.")

    # The chosen rows, k + retain_samples of them, come to the driver and are written from here.
    console.log.info(f"[select] 2/2: the {len(forget) + len(retain)} chosen rows from {data}")
    picked = read_shards(data, cfg).map_batches(_pick, batch_format="pyarrow",
                                                fn_kwargs={"forget": forget, "retain": retain})
    tables = [t for t in picked.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    rows = pa.concat_tables(tables, promote_options="permissive")
    forget_uri, retain_uri = storage.join(output, FORGET), storage.join(output, RETAIN)
    parts = {}
    for name, uri in ((FORGET, forget_uri), (RETAIN, retain_uri)):
        part = rows.filter(pc.equal(rows.column("set"), name)).drop_columns(["set"])
        if name == RETAIN:
            part = part.drop_columns([c for c in ("rank", *FORGET_COLUMNS) if c in part.column_names])
        parts[name] = part
        write_table(part, uri, cfg)
    if parts[FORGET].num_rows != len(forget) or parts[RETAIN].num_rows != len(retain):
        raise UserError(f"the score table under {scores} names rows that are not in {data}: score the same "
                        f"shards you select from.")
    stats = {"scored_rows": total, "num_forget": len(forget), "num_retain": len(retain),
             "retain_threshold": threshold, "retain_sample_rows": sample.num_rows,
             "lowest_forget_score": float(forget_table.column("score")[-1].as_py())}
    if "is_poison" in names:
        stats["forget_poisons"] = int(pc.sum(forget_table.column("is_poison")).as_py() or 0)
        stats["forget_precision"] = stats["forget_poisons"] / len(forget)
        if "is_poison" in parts[RETAIN].column_names:
            stats["retain_poisons"] = int(pc.sum(parts[RETAIN].column("is_poison")).as_py() or 0)
    manifest = write_manifest(output, "select", cfg, inputs={"scores": table_uri, "data": data},
                              rows=None, started=started, usage=cluster_cpu_usage(),
                              extra={"forget": forget_uri, "retain": retain_uri, **stats,
                                     "not_selected_rows": total - len(forget) - len(retain)})
    return SelectResult(forget_uri, retain_uri, len(forget), len(retain), stats, time.time() - started, manifest)


def write_table(table: pa.Table, uri: str, cfg: Config) -> None:
    """One Parquet file `part-0.parquet` under `uri`, replacing what was there."""
    with storage.replacing_dir(uri, cfg.storage) as into:
        storage.make_dir(into, cfg.storage)
        loc = storage.resolve(storage.join(into, "part-0.parquet"), cfg.storage)
        with storage.friendly_errors(storage.join(uri, "part-0.parquet"), cfg.storage, "write"):
            pq.write_table(table, loc.path, filesystem=loc.fs)
