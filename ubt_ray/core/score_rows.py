"""The score table's row-wise Ray Data functions, in a module that imports neither torch nor open_clip.

A Ray worker imports the module of every function it runs; torch, torchvision and open_clip take about 7 s to
import on a 2-core machine, paid again by each fresh worker. The functions that only filter, combine or re-assign
columns of score rows live here, so the tasks that run them start in about a second.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def key_rank(seed: int, key: str) -> int:
    """A 64-bit pseudo-random rank of a row key for a seed (blake2b of both), the same in every process and
    Python version, unlike hash(): rows of rank below fraction * 2**64 are a seeded sample any worker can test."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_below(table: pa.Table, seed: int, limit: int, also: frozenset = frozenset()) -> pa.Table:
    """Ray Data UDF: the rows whose key_rank is below `limit`, and those whose key is in `also`."""
    keys = table.column("key")
    inside = (pc.is_in(keys, value_set=pa.array(sorted(also), keys.type)).to_numpy(zero_copy_only=False)
              if also else np.zeros(len(keys), bool))
    ranked = np.fromiter((key_rank(seed, k) < limit for k in keys.to_pylist()), bool, len(keys))
    return table.filter(pa.array(inside | ranked))


def keep_keys(table: pa.Table, keys: pa.Array) -> pa.Table:
    """Ray Data UDF: the rows whose key is in `keys`."""
    return table.filter(pc.is_in(table.column("key").cast(keys.type), value_set=keys))


def signal_name(column: str) -> str:
    """A signal's name in the table's `transform` column: the transform (token_mask, blur, downup) or the
    density score's column (density_slof, ...), which unlearning treats as a whole-image signal."""
    return column[len("drop_"):] if column.startswith("drop_") else column


def combine_drops(drops: dict[str, np.ndarray], stats: dict[str, tuple[float, float]]) -> tuple[np.ndarray, list[str]]:
    """Several transforms' drops as one score: the maximum of the drops standardised over the dataset
    (stats: transform -> (mean, std)), and for each row the transform that gave it (the first on a tie)."""
    names = sorted(drops)
    z = np.stack([(np.asarray(drops[n], np.float32) - np.float32(stats[n][0])) / np.float32(max(stats[n][1], 1e-12))
                  for n in names], axis=1)
    which = z.argmax(axis=1)
    return z[np.arange(len(z)), which], [names[i] for i in which]


def combine(table: pa.Table, stats: dict, picked: str | None = None) -> pa.Table:
    """Ray Data UDF: the `score` and `transform` columns (the signal that gave the score, by `signal_name`), from
    the picked signal column or the max_z rule over the signal columns in `stats`."""
    if picked is not None:
        return (table.append_column("score", table.column(picked))
                .append_column("transform", pa.array([signal_name(picked)] * table.num_rows, pa.string())))
    best, which = combine_drops({name: table.column(name).to_numpy(zero_copy_only=False) for name in stats}, stats)
    return table.append_column("score", pa.array(best)).append_column(
        "transform", pa.array([signal_name(w) for w in which], pa.string()))


def apply_transfer(table: pa.Table, keys: pa.Array, fused: np.ndarray, lift: np.ndarray) -> pa.Table:
    """Ray Data UDF: `score` re-assigned to the pool's rows (`keys`, with their `fused` scores and `lift`), their
    lift (NaN elsewhere), the score before."""
    where = pc.index_in(table.column("key"), value_set=keys)  # null where a key is not in the pool
    inside = pc.is_valid(where).to_numpy(zero_copy_only=False)
    at = pc.fill_null(where, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    before = table.column("score").to_numpy()
    score = np.where(inside, fused[at], before).astype(np.float32)
    lift = np.where(inside, lift[at], np.nan).astype(np.float32)
    i = table.column_names.index("score")
    return (table.set_column(i, "score", pa.array(score)).append_column("transfer_lift", pa.array(lift))
            .append_column("score_before_transfer", pa.array(before.astype(np.float32))))
