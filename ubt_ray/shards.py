"""Parquet shards (DESIGN.md schema) through Ray Data: read with a column check, validate with counted rejections, write.

Shard schema: `key` string (unique, stable), `image` binary (encoded PNG/JPEG), `caption` string;
optional `label` int32 and `is_poison` bool.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import Config, DataConfig, StorageConfig
from .core.captions import caption_rejection
from .core.images import image_rejection
from .core.score_rows import keep_keys
from .errors import UserError
from .manifest import RowCounts
from . import console, storage

REQUIRED_COLUMNS = ("key", "image", "caption")
OPTIONAL_COLUMNS = {"label": pa.int32(), "is_poison": pa.bool_()}
BASE_SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string())])
# The score table's folder under a score output: here, not in phases.score, so that select (whose Ray Data
# tasks import it in fresh workers) does not import torch: 6 s per fresh worker on 2 cores.
TABLE = "table"
# A column a reader (prepare's) may add: the reason its row is rejected, null for a row to validate as usual.
# validate_table counts it and drops the column.
REJECT_COLUMN = "reject_reason"


def shard_files(uri: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """The Parquet files of a shard directory/prefix; an empty one, or one inside an unfinished output, is a
    user error."""
    storage.require_finished(uri, storage_cfg)
    files = storage.list_files(uri, (".parquet",), storage_cfg)
    if not files:
        raise UserError(f"no Parquet shards under {uri}: run `ubt prepare` first or point the config at shards.")
    return files


def shard_schema(uri: str, storage_cfg: StorageConfig | None = None,
                 required: tuple[str, ...] = REQUIRED_COLUMNS) -> pa.Schema:
    """Schema of the shards under `uri` (the first file's), after checking that every file has a readable Parquet
    footer with every required column: from the footers only, so that a damaged file is named here, in one
    sentence, rather than failing a Ray task later."""
    schema = None
    for f in shard_files(uri, storage_cfg):
        file_schema = _read_footer(f, storage_cfg, pq.read_schema)
        missing = [c for c in required if c not in file_schema.names]
        if missing:
            raise UserError(f"shards under {uri} lack column(s) {', '.join(missing)} ({f}): they must have "
                            f"{', '.join(required)} (re-create them with `ubt prepare`).")
        schema = schema or file_schema
    return schema


def _read_footer(f: str, storage_cfg: StorageConfig | None, read):
    """`read` (pq.read_schema or pq.read_metadata) of the Parquet file `f`; a damaged file is a user error."""
    loc = storage.resolve(f, storage_cfg)
    with storage.friendly_errors(f, storage_cfg, "read"):
        try:
            return read(loc.path, filesystem=loc.fs)
        except pa.ArrowInvalid:
            raise UserError(_not_parquet(f)) from None


def _not_parquet(f: str) -> str:
    return f"{f} is not a readable Parquet file: remove it, or re-create it with the phase that wrote it."


def count_rows(uri: str, storage_cfg: StorageConfig | None = None) -> int:
    """Rows in the shards under `uri`, from the Parquet footers only (no data read)."""
    return sum(_read_footer(f, storage_cfg, pq.read_metadata).num_rows for f in shard_files(uri, storage_cfg))


def _file_tables(uri: str, storage_cfg: StorageConfig | None, columns: list[str]):
    """`columns` of each shard file under `uri`, one table per file, read on this process."""
    for f in shard_files(uri, storage_cfg):
        loc = storage.resolve(f, storage_cfg)
        with storage.friendly_errors(f, storage_cfg, "read"):
            try:
                table = pq.read_table(loc.path, filesystem=loc.fs, columns=columns)
            except pa.ArrowInvalid:  # no footer, or data pages that do not decode
                raise UserError(_not_parquet(f)) from None
        yield table


def read_columns(uri: str, storage_cfg: StorageConfig | None, columns: list[str],
                 max_rows: int | None = None) -> pa.Table:
    """A few columns of the shards under `uri` read straight from Parquet on this process (the first `max_rows`
    rows when set): for small column reads where a Ray job would cost more than it saves."""
    tables, read = [], 0
    for table in _file_tables(uri, storage_cfg, columns):
        tables.append(table)
        read += table.num_rows
        if max_rows is not None and read >= max_rows:
            break
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.slice(0, max_rows) if max_rows is not None else table


def read_rows_by_key(uri: str, storage_cfg: StorageConfig | None, keys: list[str], columns: list[str]) -> pa.Table:
    """The rows of the shards under `uri` whose key is in `keys` (a few: read on this process, file by file,
    stopping once all are found)."""
    wanted, tables, found = pa.array(sorted(set(keys)), pa.string()), [], 0
    for table in _file_tables(uri, storage_cfg, columns):
        tables.append(keep_keys(table, wanted))
        found += tables[-1].num_rows
        if found >= len(wanted):
            break
    return pa.concat_tables(tables, promote_options="permissive")


def read_shards(uri: str, cfg: Config, columns: list[str] | None = None,
                required: tuple[str, ...] = REQUIRED_COLUMNS) -> ray.data.Dataset:
    """A Ray Dataset streaming the shards under `uri` (local or s3://)."""
    schema = shard_schema(uri, cfg.storage, required)
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise UserError(f"shards under {uri} lack column(s) {', '.join(missing)} needed here: "
                            f"re-create them with the phase that adds them.")
    files = shard_files(uri, cfg.storage)
    loc = storage.resolve(uri, cfg.storage)
    paths = [storage.resolve(f, cfg.storage).path for f in files]
    with storage.friendly_errors(uri, cfg.storage, "read"):
        ds = _read_parquet(paths, loc.fs, cfg.ray.parquet_reader)
        return ds.select_columns(columns) if columns is not None else ds


def _read_parquet(paths: list[str], fs, reader: str) -> ray.data.Dataset:
    """`ray.data.read_parquet` through the chosen read path (`ray.parquet_reader`). The flag is read when the
    read is planned, here, so it is set for this call only and the process's DataContext is left as it was."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, reader == "v2"
    try:
        return ray.data.read_parquet(paths, filesystem=fs)
    finally:
        ctx.use_datasource_v2 = before


def write_shards(ds: ray.data.Dataset, uri: str, cfg: Config, rows_per_file: int) -> None:
    """Write `ds` as Parquet shards of at most `rows_per_file` rows to `uri`, replacing any previous shards there
    only once all are written (storage.replacing_dir).
    The cap matters: Ray Data packs small input files into one read task, so without it a phase that reads many
    shards writes one big file, which later phases can read as one block only (one scoring actor at a time)."""
    with storage.replacing_dir(uri, cfg.storage) as into:
        loc = storage.resolve(into, cfg.storage)
        with storage.friendly_errors(uri, cfg.storage, "write"):
            ds.write_parquet(loc.path, filesystem=loc.fs, min_rows_per_file=rows_per_file,
                             max_rows_per_file=rows_per_file)


def normalise_table(table: pa.Table) -> pa.Table:
    """Cast to the shard schema: base columns first, optional columns typed, anything else kept as is."""
    cols, fields = [], []
    for f in BASE_SCHEMA:
        cols.append(table.column(f.name).cast(f.type))
        fields.append(f)
    for name in table.column_names:
        if name in BASE_SCHEMA.names:
            continue
        col = table.column(name)
        if name in OPTIONAL_COLUMNS:
            col = col.cast(OPTIONAL_COLUMNS[name])
        cols.append(col)
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def validate_table(table: pa.Table, data_cfg: DataConfig) -> tuple[pa.Table, RowCounts]:
    """Keep the rows whose image and caption are usable; count every other row with its reason (a reader's own,
    in the REJECT_COLUMN column, first)."""
    counts = RowCounts(rows_in=table.num_rows)
    keys = table.column("key").to_pylist()
    images = table.column("image").to_pylist()
    captions = table.column("caption").to_pylist()
    given = table.column(REJECT_COLUMN).to_pylist() if REJECT_COLUMN in table.column_names else [None] * len(keys)
    keep = np.zeros(table.num_rows, dtype=bool)
    for i, (key, img, cap) in enumerate(zip(keys, images, captions)):
        reason = given[i] or ("key missing" if not key else None) or caption_rejection(cap) or image_rejection(
            img, data_cfg.image_modes, data_cfg.min_image_side, data_cfg.max_image_pixels)
        if reason:
            counts.reject(reason, str(key))
        else:
            keep[i] = True
    counts.rows_out = int(keep.sum())
    kept = table.filter(pa.array(keep))
    if REJECT_COLUMN in kept.column_names:
        kept = kept.drop_columns([REJECT_COLUMN])
    return normalise_table(kept), counts


def _order(by: str, descending: bool) -> list[tuple[str, str]]:
    return [(by, "descending" if descending else "ascending"), ("key", "ascending")]


def block_top_k(table: pa.Table, k: int, by: str, descending: bool = True) -> pa.Table:
    """The k first rows of `table` ordered by `by` (ties by key)."""
    return table.take(pc.sort_indices(table, sort_keys=_order(by, descending))[:k])


def merge_top_k(tables: Iterable[pa.Table], k: int, by: str, descending: bool = True) -> pa.Table | None:
    """Merge per-block top-k tables into the global top-k, holding at most 2k rows plus one table at a time."""
    best = None
    for t in tables:
        if t.num_rows == 0:
            continue
        best = t if best is None else pa.concat_tables([best, t], promote_options="permissive")
        best = block_top_k(best, k, by, descending)
    return best


def top_k(ds: ray.data.Dataset, k: int, by: str, descending: bool = True) -> pa.Table | None:
    """The global top-k rows of a Ray Dataset by column `by`, with driver memory bounded by k."""
    per_block = ds.map_batches(block_top_k, batch_format="pyarrow", batch_size=None,
                               fn_kwargs={"k": k, "by": by, "descending": descending})
    return merge_top_k(per_block.iter_batches(batch_format="pyarrow", batch_size=None), k, by, descending)


def batch_identity(table: pa.Table) -> str:
    """What a ledger report is filed under: the row count and a hash of the keys of the batch it counts (keys are
    unique in shards, so two batches with the same keys in the same order are one batch reported twice)."""
    h = hashlib.sha256()
    for key in table.column("key").to_pylist():
        data = b"\x00" if key is None else b"\x01" + str(key).encode()
        h.update(len(data).to_bytes(4, "little") + data)
    return f"{table.num_rows}:{h.hexdigest()[:32]}"


class _Report(NamedTuple):
    """One batch's report to the ledger."""
    counts: RowCounts
    keys: list[str]
    source: str | None
    node: str | None


@ray.remote(num_cpus=0)
class RowLedger:
    """Collects the row accounting (and, where a phase needs them, the keys) of every Ray Data task of one phase,
    so nothing is lost without a count. Start it with `start_ledger`, on the driver's node.

    Each report is filed under its batch's `batch_identity`, and a batch reported again replaces its first report:
    Ray retries a task whose worker died and restarts a killed actor, which then runs its batch again, and the
    counts must not depend on that."""

    def __init__(self) -> None:
        self.batches: dict[str, _Report] = {}
        self.passes: dict[str, tuple[int, int]] = {}

    def add(self, batch: str, counts: RowCounts, keys: list[str] | None = None, source: str | None = None,
            passes: tuple[int, int] | None = None, node: str | None = None) -> None:
        """File one batch's `counts` (and `keys`) under its identity `batch`; `source` (e.g. an actor id) and
        `node` (a Ray node id) tally the rows each one took; `passes` are the (forward, backward) sample-passes the
        batch cost (cost.py)."""
        self.batches[batch] = _Report(counts, list(keys or []), source, node)
        if passes is not None:
            self.passes[batch] = (int(passes[0]), int(passes[1]))

    def add_passes(self, name: str, passes: tuple[int, int]) -> None:
        """Sample-passes of work outside any batch (e.g. an actor's set-up), filed under `name` like a batch's."""
        self.passes[name] = (int(passes[0]), int(passes[1]))

    def total_passes(self) -> tuple[int, int]:
        """(forward, backward) sample-passes of every batch and set-up filed (a retried one counted once)."""
        return (sum(f for f, _ in self.passes.values()), sum(b for _, b in self.passes.values()))

    def _rows_by(self, field: str) -> dict[str, int]:
        tally: dict[str, int] = {}
        for report in self.batches.values():
            who = getattr(report, field)
            if who is not None:
                tally[who] = tally.get(who, 0) + report.counts.rows_in
        return dict(sorted(tally.items(), key=lambda item: -item[1]))

    def rows_by_source(self) -> list[int]:
        """Rows taken by each source, most first (a retried batch counts for the source that reported it last)."""
        return list(self._rows_by("source").values())

    def rows_by_node(self) -> dict[str, int]:
        """Rows taken on each node, by node id, most first (a retried batch counts for the node that ran it last)."""
        return self._rows_by("node")

    def rows_done(self) -> int:
        """Rows counted so far (a phase's progress)."""
        return sum(report.counts.rows_in for report in self.batches.values())

    def get(self) -> RowCounts:
        total = RowCounts()
        for report in self.batches.values():
            total.merge(report.counts)
        return total

    def get_with_keys(self) -> tuple[RowCounts, list[str]]:
        return self.get(), [key for report in self.batches.values() for key in report.keys]


def start_ledger():
    """A new RowLedger actor on this process's node: the driver's node lasts as long as the phase, while a
    worker node may be lost mid-run and take the counts with it (a two-node test cluster placed 6 of 8
    unpinned ledgers on its worker node)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RowLedger.options(scheduling_strategy=here).remote()


def validate_batch(table: pa.Table, data_cfg: DataConfig, ledger) -> pa.Table:
    """Ray Data UDF around `validate_table` that reports its counts to the ledger actor."""
    kept, counts = validate_table(table, data_cfg)
    ray.get(ledger.add.remote(batch_identity(table), counts))
    return kept


def validate_and_write(ds: ray.data.Dataset, uri: str, cfg: Config, rows_per_file: int,
                       batch_size: int = 1024, progress: str = "write", total: int | None = None) -> RowCounts:
    """Validate every row of `ds`, write the good ones to `uri`, and return the checked row accounting; the rows
    validated so far (of `total`, when known) are shown as the `progress` phase's."""
    ledger = start_ledger()
    checked = ds.map_batches(validate_batch, batch_format="pyarrow", batch_size=batch_size,
                             fn_kwargs={"data_cfg": cfg.data, "ledger": ledger})
    with console.watch(progress, total, lambda: ray.get(ledger.rows_done.remote())):
        write_shards(checked, uri, cfg, rows_per_file)
    counts = ray.get(ledger.get.remote())
    ray.kill(ledger)
    written = count_rows(uri, cfg.storage) if counts.rows_out else 0
    if written != counts.rows_out:
        raise RuntimeError(f"{uri}: {written} rows written but {counts.rows_out} validated; "
                           f"this is a bug in ubt_ray, please report it.")
    counts.check(uri)
    return counts


def key_hash(key: str, seed: int) -> int:
    """A 63-bit hash of (seed, key): a seeded random order of rows that does not depend on how they are split
    into files or blocks (sha256, not hash(), which Python salts per process)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


def keep_hash_sample(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The rows whose key_hash falls in the first `fraction` of the hash range: a seeded sample of about that
    share that does not depend on how the rows are split into blocks."""
    limit = int(fraction * (1 << 63))
    return table.filter(pa.array([key_hash(k, seed) < limit for k in table.column("key").to_pylist()], pa.bool_()))


def write_hash_sample(data: str, out: str, fraction: float, cfg: Config) -> str:
    """Write the keep_hash_sample of `data` (about `fraction` of its rows) as validated shards at `out`."""
    ds = read_shards(data, cfg).map_batches(keep_hash_sample, batch_format="pyarrow",
                                            fn_kwargs={"fraction": fraction, "seed": cfg.run.seed})
    validate_and_write(ds, out, cfg, rows_per_file=cfg.poison.rows_per_file)
    return out


def map_on_actor_pool(data: str, cfg: Config, columns: list[str], actor: type, batch_size: int, actors: int,
                      cpus_per_actor: int, use_gpu: bool, constructor_kwargs: dict) -> ray.data.Dataset:
    """`read_parquet -> map_batches(actor class, ActorPoolStrategy)` over the shards under `data` (pyarrow
    batches). Blocks of at most one batch, so that every actor gets work: Ray Data packs few small files into one
    read task, which one actor would otherwise take alone while the others wait (streaming, no shuffle).
    An actor that dies (out of memory, a lost node) is restarted and its batches run again, without limit: Ray
    Data's defaults, set here because the phases count on them (tests/test_faults.py kills a scoring actor)."""
    return read_shards(data, cfg, columns=columns).repartition(target_num_rows_per_block=batch_size).map_batches(
        actor, batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0, fn_constructor_kwargs=constructor_kwargs,
        max_restarts=-1, max_task_retries=-1)
