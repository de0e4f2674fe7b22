"""score: every row of the suspicious shards gets a suspicion score (METHOD.md step 2), on Ray Data.

`read_parquet -> map_batches(Scorer, compute=ActorPoolStrategy) -> write_parquet`: each actor loads the model
once; nothing is collected on the driver. Rows whose image cannot be decoded are counted as rejected, with
their keys, in the manifest. With score.density, each actor also embeds a fixed seeded reference of rows once
(read by the driver in one filtering pass: memory grows with the reference, not the dataset) and gives every row
its local-density scores against it from the same forward. Several signals (transforms' drops, density scores)
are combined after a pass over their (small) columns.
When the shards carry `is_poison`, detection metrics and a score histogram are written beside the table.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from .. import console, storage
from ..checks import check_score
from ..cluster import ensure_ray
from ..config import Config, ModelConfig, ScoreConfig, StorageConfig
from ..core.batches import decode_rows, normalize
from ..core.density import Reference, density_scores, reference_keys
from ..core.score_rows import apply_transfer, combine, rank_below, signal_name
from ..core.scoring import (CaptionFeatures, prepare_model, resolve_saliency, robust_center_scale,
                            padded_rows, score_batch, score_passes, tail_strength, text_features, token_grid,
                            tokens_to_take)
from ..core.transfer import TRANSFERABLE, fuse_ranks, transfer_lift
from ..cost import Usage, devices_text
from ..core.zeroshot import auroc, precision_recall_at_k
from ..errors import UserError
from ..manifest import RowCounts, write_manifest
from ..models import load_clip
from ..report import histogram_png, selection_cutoff
from ..shards import (TABLE, batch_identity, count_rows, map_on_actor_pool, read_columns, read_shards,
                      shard_schema, start_ledger, top_k, write_shards)
from .disagreement import caption_disagreement

DETECTION_FILE = "detection.json"
HISTOGRAM_FILE = "score_histogram.png"
# The top rows the pick combine and the target concept judge when no selection size is given (score alone).
TAIL_ROWS = 300
# In files of many rows, not one per scoring batch: select reads the table back (235 files of 256 rows took it
# 35 s against 7 s for one file on the quickstart's 60,000 rows). Score rows are small: no image, a key, a few
# floats, a 64-entry token order.
TABLE_ROWS_PER_FILE = 100_000
DROPS = "drops"  # the actor pass's rows, under the score output, while the table is made from them


@dataclass
class ScoreResult:
    """Where the score table went, the row accounting, and the detection metrics (when ground truth exists)."""
    table: str
    rows: RowCounts
    detection: dict | None
    wall_time_s: float
    manifest: dict


class Scorer:
    """Ray Data actor: loads the model once, then scores batches of rows (pyarrow in, pyarrow out)."""

    def __init__(self, model: ModelConfig, storage_cfg: StorageConfig, settings: ScoreConfig, seed: int,
                 negative_captions: list[str], threads: int, use_gpu: bool, ledger, reference=None):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_clip(model, storage_cfg, self.device, seed=seed)
        prepare_model(self.clip.model, settings.amp)
        self.grid = token_grid(self.clip.model, self.clip.image_size)
        self.captions = CaptionFeatures(self.clip.model, self.clip.tokenizer, self.device)
        self.s, self.ledger = settings, ledger
        self.signals = signal_columns(settings)
        self.negatives = None
        if settings.method == "loss":
            with torch.no_grad():
                self.negatives = text_features(self.clip.model, self.clip.tokenizer(negative_captions).to(self.device))
        self.logit_scale = float(self.clip.model.logit_scale.exp())
        # Resolved here only where it is used: the sample-passes it costs (a saliency that back-propagates).
        self.saliency = (resolve_saliency(self.clip.model, settings.saliency)
                         if settings.method == "token_drop" and "token_mask" in settings.transforms else "attention")
        # The density reference: the seeded reference rows (an object ref, fetched once) embedded by this model.
        self.reference = None
        if settings.density:
            rows = ray.get(reference) if isinstance(reference, ray.ObjectRef) else reference
            self.reference = embed_reference(self.clip, self.grid, self.captions, rows, settings, self.device)
            passes = score_passes(len(self.reference.keys), "cosine", (), (), "attention", self.grid,
                                  settings.batch_size)
            ray.get(self.ledger.add_passes.remote(f"reference:{ray.get_runtime_context().get_actor_id()}", passes))

    def _score(self, pixels: np.ndarray, captions: list[str], embeddings: bool = False) -> dict[str, torch.Tensor]:
        return score_batch(self.clip.model, torch.from_numpy(pixels).to(self.device), self.captions(captions),
                           self.clip.preprocess_cfg, self.grid, self.s.method, tuple(self.s.token_portions),
                           tuple(self.s.transforms), self.negatives, self.logit_scale, self.s.saliency,
                           tuple(self.s.attention_blocks), rows_per_forward=self.s.batch_size, embeddings=embeddings)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = batch_identity(table)  # a batch retried after this actor was restarted replaces its first count
        table, pixels, counts, passes = self.decode(table)
        here = ray.get_runtime_context()
        ray.get(self.ledger.add.remote(batch, counts, source=here.get_actor_id(), passes=passes,
                                       node=here.get_node_id()))
        return self.score_rows(table, pixels)

    def decode(self, table: pa.Table) -> tuple[pa.Table, np.ndarray | None, RowCounts, tuple[int, int]]:
        """The rows of `table` whose image decodes, their pixels, the row counts and the sample-passes that
        scoring them costs."""
        table, pixels, counts = decode_rows(table, self.clip.image_size)
        passes = score_passes(0 if pixels is None else len(pixels), self.s.method, tuple(self.s.token_portions),
                              tuple(self.s.transforms), self.saliency, self.grid, self.s.batch_size)
        return table, pixels, counts, passes

    def score_rows(self, table: pa.Table, pixels: np.ndarray | None) -> pa.Table:
        """The score-table rows of `decode`'s rows: the scoring itself, with no Ray call, so that a plain
        single-process loop (benchmarks/scale.py) runs the very same computation."""
        if pixels is None:
            return _empty_output(table, self.s)
        keys = table.column("key").to_pylist()
        out = self._score(pixels, table.column("caption").to_pylist(), embeddings=self.reference is not None)
        if self.reference is not None:
            embedded = out.pop("image_embedding")
            for name, values in density_scores(embedded.double(), keys, self.reference, which=self.s.density).items():
                out[f"density_{name}"] = values
            signals = self.signals
            if len(signals) > 1:
                out.pop("score", None)  # several signals: combined over the whole dataset afterwards
            else:
                out["score"] = out[signals[0]]
        columns = {"key": table.column("key")}
        for name, values in out.items():
            if name == "token_order":  # (N, T) -> list<int16> from offsets, without a Python list per row
                flat = values.to(torch.int16).cpu().numpy()
                offsets = pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32))
                columns[name] = pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)))
            else:
                columns[name] = pa.array(values.detach().float().cpu().numpy())
        if "is_poison" in table.column_names:
            columns["is_poison"] = table.column("is_poison").fill_null(False)
        return pa.table(columns)


def signal_columns(s: ScoreConfig) -> list[str]:
    """The score table's columns that are suspicion signals: each transform's drop, then each density score."""
    if s.method != "token_drop":
        return ["score"]
    return [f"drop_{t}" for t in s.transforms] + [f"density_{d}" for d in s.density]


def reference_rows(cfg: Config, data: str) -> pa.Table:
    """The density reference's rows (key, image, caption): the score.reference_rows rows of lowest
    `key_rank(run.seed, key)` (seeded_rows)."""
    return seeded_rows(cfg, data, cfg.score.reference_rows)[1]


def seeded_rows(cfg: Config, data: str, size: int, exclude: frozenset = frozenset()) -> tuple[pa.Table, pa.Table]:
    """(the rows whose key is in `exclude`, the `size` other rows of lowest `key_rank(run.seed, key)`), each as
    (key, image, caption), from one streaming pass that keeps only those keys and the rows whose rank falls in a
    share of the hash range a little larger than needed (widened if too few pass), so the driver holds about
    twice what it returns, whatever the dataset's size."""
    total = count_rows(data, cfg.storage)
    size = max(0, min(size, total - len(exclude)))
    fraction = min(1.0, 2.0 * size / max(total, 1))
    empty = pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                      "caption": pa.array([], pa.string())})
    while True:
        limit = int(fraction * 2 ** 64)
        ds = read_shards(data, cfg, columns=["key", "image", "caption"]).map_batches(
            rank_below, batch_format="pyarrow", fn_kwargs={"seed": cfg.run.seed, "limit": limit, "also": exclude})
        refs = ds.to_arrow_refs()
        table = pa.concat_tables([t for t in ray.get(refs) if t.num_rows]) if refs else None
        table = empty if table is None else table
        keys = table.column("key").to_pylist()
        if sum(k not in exclude for k in keys) >= size or fraction >= 1.0:
            break
        fraction = min(1.0, fraction * 2)
    inside = [i for i, k in enumerate(keys) if k in exclude]
    others = [k for k in keys if k not in exclude]
    chosen = set(reference_keys(others, cfg.run.seed, min(size, len(others)))) if size and others else set()
    keep = [i for i, k in enumerate(keys) if k in chosen]
    return table.take(pa.array(inside, pa.int64())), table.take(pa.array(keep, pa.int64()))


def embed_reference(clip, grid, captions: CaptionFeatures, rows: pa.Table, s: ScoreConfig,
                    device: torch.device) -> Reference:
    """The density `Reference` of the reference rows under the scoring model: their image embeddings from the
    same forwards (and fixed chunks) as a scored row's, their caption features, in float64. Rows whose image does
    not decode are left out of the reference (they are counted where the main pass meets them)."""
    rows, pixels, _ = decode_rows(rows, clip.image_size)
    if pixels is None or rows.num_rows <= s.density_k:
        raise UserError(f"score.density needs more than experimental.score.density_k={s.density_k} decodable reference rows, "
                        f"found {0 if pixels is None else rows.num_rows}: lower score.density_k or check the data.")
    text = captions(rows.column("caption").to_pylist())
    images = score_batch(clip.model, torch.from_numpy(pixels).to(device), text, clip.preprocess_cfg, grid, "cosine",
                         rows_per_forward=s.batch_size, embeddings=True)["image_embedding"]
    return Reference(images.double(), rows.column("key").to_pylist(), s.density_k, captions=text.double())


def _empty_output(table: pa.Table, s: ScoreConfig) -> pa.Table:
    cols = {"key": pa.array([], pa.string())}
    if s.method == "caption_disagreement":
        cols.update({c: pa.array([], pa.float32()) for c in ("score", "disagreement", "target_similarity")})
    else:
        cols["cos"] = pa.array([], pa.float32())
    if s.method == "token_drop":
        cols.update({f"drop_{t}": pa.array([], pa.float32()) for t in s.transforms})
        if "token_mask" in s.transforms:
            cols["token_order"] = pa.array([], pa.list_(pa.int16()))
        cols.update({f"density_{d}": pa.array([], pa.float32()) for d in s.density})
    if s.method == "loss":
        cols["loss"] = pa.array([], pa.float32())
    if s.method in ("cosine", "loss") or (s.method == "token_drop" and len(signal_columns(s)) == 1):
        cols["score"] = pa.array([], pa.float32())
    if "is_poison" in table.column_names:
        cols["is_poison"] = pa.array([], pa.bool_())
    return pa.table(cols)


ROBUST_STATS_ROWS = 1_000_000


def robust_stats(ds: ray.data.Dataset, columns: list[str], seed: int,
                 max_rows: int = ROBUST_STATS_ROWS) -> dict[str, tuple[float, float]]:
    """Each signal column's median and robust standard deviation (`robust_center_scale`) over the scored rows,
    or over a seeded sample of `max_rows` of them where there are more (the driver holds the values it reads:
    4 bytes a row and signal; a median from a million rows is off by about a thousandth of a std)."""
    part = ds.select_columns(columns)
    rows = ds.count()
    if rows > max_rows:
        part = part.random_sample(max_rows / rows, seed=seed)
    batches = list(part.iter_batches(batch_format="numpy", batch_size=None))
    return {column: robust_center_scale(np.concatenate([b[column] for b in batches])) for column in columns}


def signal_statistics(uri: str, cfg: Config, columns: list[str], rows: int, k: int,
                      max_rows: int = ROBUST_STATS_ROWS) -> tuple[dict, dict, dict]:
    """Each signal column's (mean, std), robust (median, robust std) and tail strength over its k largest values,
    over the `rows` scored rows in the Parquet shards under `uri`. Up to `max_rows` rows, all three come from
    the columns read once on this process (4 bytes a row and signal): a Ray job per statistic would cost more
    than the scoring on a small table. Beyond, mean and std are Ray Data aggregates, the robust statistics come
    from a seeded sample and the top k from per-block top-k (robust_stats, tail_strengths)."""
    if rows <= max_rows:
        table = read_columns(uri, cfg.storage, columns)
        return column_statistics({c: table.column(c).to_numpy() for c in columns}, k)
    ds = read_shards(uri, cfg, columns=["key"] + columns, required=("key",))
    stats = {c: (float(ds.mean(c)), float(ds.std(c))) for c in columns}
    robust = robust_stats(ds, columns, cfg.run.seed, max_rows)
    return stats, robust, tail_strengths(ds, robust, k)


def column_statistics(values: dict[str, np.ndarray], k: int) -> tuple[dict, dict, dict]:
    """signal_statistics of signal columns held in memory (column -> every row's value)."""
    stats, robust, strengths = {}, {}, {}
    for c, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        stats[c] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        robust[c] = robust_center_scale(v)
        cut = max(len(v) - k, 0)  # the k largest values, unordered
        strengths[c] = tail_strength(torch.from_numpy(np.partition(v, cut)[cut:]), *robust[c])
    return stats, robust, strengths


def tail_strengths(ds: ray.data.Dataset, stats: dict[str, tuple[float, float]], k: int) -> dict[str, float]:
    """Each signal column's `tail_strength` over the scored dataset: its k largest values against its (centre,
    scale) in `stats` (per-block top-k merged on the driver, so memory is bounded by k)."""
    out = {}
    for column, (center, scale) in stats.items():
        top = top_k(ds.select_columns(["key", column]), k, column)
        out[column] = tail_strength(torch.tensor(top.column(column).to_numpy()), center, scale)
    return out


def num_actors(s: ScoreConfig) -> int:
    """One actor per GPU with use_gpu; else one per `cpus_per_actor` CPUs less one CPU, which Ray Data's read
    tasks need, or, with cpus_per_actor unset, one per CPU (actor_cpus leaves the reads their CPU)."""
    resources = ray.cluster_resources()
    if s.use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    if s.cpus_per_actor is None:
        return max(1, int(resources.get("CPU", 1)))
    return max(1, int((resources.get("CPU", 1) - 1) // s.cpus_per_actor))


def actor_cpus(s: ScoreConfig, actors: int) -> float:
    """The CPUs each of `actors` scoring actors reserves: score.cpus_per_actor when set, 1 with use_gpu, else
    the cluster's CPUs less one per node shared among them. The reservation left free then totals one CPU per
    node, so at least one node has a whole CPU for the read tasks however Ray places the actors; a reservation
    above 1 is rounded down to a whole number, the only kind Ray takes."""
    if s.cpus_per_actor is not None:
        return s.cpus_per_actor
    if s.use_gpu:
        return 1
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    share = max(0.0, ray.cluster_resources().get("CPU", 0) - len(nodes)) / actors
    return float(int(share)) if share >= 1 else int(share * 10_000) / 10_000


def check_cpus_left(s: ScoreConfig, actors: int) -> None:
    """CPU actors that reserve every CPU of the cluster leave none to the read tasks that feed them, and the
    job stalls without an error (seen on a 2-CPU machine with 2 actors of 1 CPU): refuse that up front."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if not s.use_gpu and actors * s.cpus_per_actor >= cpus:
        raise UserError(f"score.num_actors={actors} x experimental.score.cpus_per_actor={s.cpus_per_actor:g} "
                        f"reserves all {cpus} CPUs of the Ray cluster, leaving none to the tasks that read the "
                        f"shards: use at most {max(1, int((cpus - 1) // s.cpus_per_actor))} actors (or leave "
                        f"experimental.score.cpus_per_actor unset).")


@console.phase("score", lambda cfg, model_uri, data, output=None, *, k, method=None: f"{method or cfg.score.method} "
               f"of every row of {data} with {model_uri}", lambda r: f"{r.rows.rows_out} rows scored" + (
                   f", AUROC {r.detection['auroc']:.3f}" if r.detection and "auroc" in r.detection else ""))
def score(cfg: Config, model_uri: str, data: str, output: str | None = None, *, k: int | None,
          method: str | None = None) -> ScoreResult:
    """Score every row of `data` with the checkpoint at `model_uri`; the table goes to `<output>/table`. `k` is
    the number of rows the selection will take (None: no selection follows): the pick combine judges each
    signal's top k, and the detection metrics and histogram mark the k-th score as the cut-off. `method`, when
    given, replaces score.method (overfit's weak-similarity subset scores with cosine)."""
    started = time.time()
    if method is not None:
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, method=method))
    s = cfg.score
    check_score(s)
    output = output or s.output
    storage.claim_output(output, "score", cfg.storage)
    ensure_ray(cfg.ray)
    schema = shard_schema(data, cfg.storage)
    columns = ["key", "image", "caption"] + (["is_poison"] if "is_poison" in schema.names else [])
    negatives = []
    if s.method == "loss":
        captions = read_columns(data, cfg.storage, ["caption"], max_rows=max(s.negatives * 50, 10_000))
        negatives = list(dict.fromkeys(captions.column("caption").to_pylist()))[:s.negatives]
    actors = s.num_actors or num_actors(s)
    s = dataclasses.replace(s, cpus_per_actor=actor_cpus(s, actors))
    cfg = dataclasses.replace(cfg, score=s)
    check_cpus_left(s, actors)
    threads = s.threads_per_actor or max(1, (os.cpu_count() or 1) // actors)
    ledger = start_ledger()
    model = dataclasses.replace(cfg.model, checkpoint=storage.absolute(model_uri))
    table_uri = storage.join(output, TABLE)
    # The rows the actors have scored so far, from the ledger they report to (the scoring runs in the first
    # write: the table's, or that of the drops that need a second look).
    with console.watch("score", count_rows(data, cfg.storage), lambda: ray.get(ledger.rows_done.remote())):
        if s.method == "caption_disagreement":
            ds, extra = caption_disagreement(cfg, model, data, columns, actors, threads, ledger, k or TAIL_ROWS)
            if ds is None:  # every image undecodable: the counts say so, the table is empty
                ds = ray.data.from_arrow(_empty_output(pa.table({c: [] for c in columns}), s))
            write_shards(ds, table_uri, cfg, TABLE_ROWS_PER_FILE)
        else:
            extra = _drop_scores(cfg, model, data, output, columns, negatives, actors, threads, ledger, k or TAIL_ROWS)
    rows, rows_per_actor, rows_per_node, passes = ray.get([ledger.get.remote(), ledger.rows_by_source.remote(),
                                                           ledger.rows_by_node.remote(), ledger.total_passes.remote()])
    ray.kill(ledger)
    rows.check("score")
    written = count_rows(table_uri, cfg.storage) if rows.rows_out else 0
    if written != rows.rows_out:
        raise RuntimeError(f"score: {rows.rows_out} rows scored but {written} written; this is a bug in ubt_ray.")
    detection = None
    if "is_poison" in columns and rows.rows_out:
        detection = detection_metrics(table_uri, cfg, s.top_k, output, k)
    manifest = write_manifest(output, "score", cfg, inputs={"data": data, "model": model_uri}, rows=rows,
                              started=started, usage=score_usage(s, actors, *passes), extra={"table": table_uri, "method": s.method,
                                                      "transforms": s.transforms, "density": s.density,
                                                      "token_portions": s.token_portions,
                                                      "actors": actors, "threads_per_actor": threads,
                                                      "rows_per_actor": rows_per_actor, "rows_per_node": rows_per_node,
                                                      "combine": s.combine,
                                                      **extra, "detection": detection})
    return ScoreResult(table_uri, rows, detection, time.time() - started, manifest)


def score_usage(s: ScoreConfig, actors: int, forward: int, backward: int) -> Usage:
    """The scoring's cost (cost.py): the sample-passes its actors filed with the ledger (each decodable row's
    image forwards, `score_passes`, and each actor's embedding of the density reference; caption_disagreement:
    one text-tower pass per row), and the actors' reservation (the driver's reads and kNN tasks not counted)."""
    gpus = 1 if s.use_gpu else 0
    return Usage(forward, backward, cpus=actors * s.cpus_per_actor, gpus=actors * gpus,
                 devices=devices_text(actors, "actor", s.cpus_per_actor, gpus))


def _drop_scores(cfg: Config, model: ModelConfig, data: str, output: str, columns: list[str], negatives: list[str],
                 actors: int, threads: int, ledger, k: int) -> dict:
    """Write the token_drop / cosine / loss score table to `<output>/table`; return what the manifest records of
    it: with several signals their statistics (with `pick` also the robust ones, the tail strengths and the picked
    signal), and the trigger-transfer re-ranking's counts.
    The actor pass streams its rows to Parquet (`<output>/drops`, removed at the end) whenever they need a second
    look (statistics over every row, the transfer pool's top rows): held in the object store instead, they would
    grow the whole job's memory, and the driver's bookkeeping, with the dataset."""
    s = cfg.score
    extra: dict = {}
    reference = None
    if s.density:  # read once here, put in the object store once, embedded by each actor
        rows = reference_rows(cfg, data)
        extra["density_reference_rows"] = rows.num_rows
        reference = ray.put(rows)
    ds = map_on_actor_pool(data, cfg, columns, Scorer, s.batch_size, actors, s.cpus_per_actor, s.use_gpu,
                           {"model": model, "storage_cfg": cfg.storage, "settings": s, "seed": cfg.run.seed,
                            "negative_captions": negatives, "threads": threads, "use_gpu": s.use_gpu,
                            "ledger": ledger, "reference": reference})
    table_uri = storage.join(output, TABLE)
    signals = signal_columns(s)
    transfer = s.method == "token_drop" and s.transfer_pool > 0
    if len(signals) == 1 and not transfer:
        write_shards(ds, table_uri, cfg, TABLE_ROWS_PER_FILE)
        return extra
    drops = storage.join(output, DROPS)
    write_shards(ds, drops, cfg, TABLE_ROWS_PER_FILE)
    scored = ray.get(ledger.get.remote()).rows_out  # the actor pass is over: every row it kept is counted
    if not scored:
        # Every row rejected: nothing to combine or re-rank; the empty table and the counts say so.
        with storage.replacing_dir(table_uri, cfg.storage):
            pass
        storage.remove_dir(drops, cfg.storage)
        return {**extra, "transfer": {"pool_rows": 0}} if transfer else extra
    ds = read_shards(drops, cfg, required=("key",))
    if len(signals) > 1:
        stats, robust, strengths = signal_statistics(drops, cfg, signals, scored, k)
        extra["signal_stats"] = stats
        picked = None
        if s.combine == "pick":
            picked = max(strengths, key=strengths.get)
            extra.update(signal_robust_stats=robust, tail_strengths=strengths, picked_signal=picked)
        # A task per output file's worth of rows, not per scoring batch: starting a task costs more than combining.
        ds = ds.map_batches(combine, batch_format="pyarrow", batch_size=TABLE_ROWS_PER_FILE,
                            fn_kwargs={"stats": stats, "picked": picked})
    if transfer:
        ds, extra["transfer"] = transfer_rerank(cfg, model, data, ds, k, actors, threads, ledger)
    write_shards(ds, table_uri, cfg, TABLE_ROWS_PER_FILE)
    storage.remove_dir(drops, cfg.storage)
    return extra


def transfer_rerank(cfg: Config, model: ModelConfig, data: str, ds: ray.data.Dataset, k: int, actors: int,
                    threads: int, ledger) -> tuple[ray.data.Dataset, dict]:
    """The score dataset with its top score.transfer_pool x k rows re-ordered by the trigger-transfer test
    (core/transfer.py) fused with their score (fuse_ranks), and what the manifest records of it. The pool's
    rows and score.transfer_refs reference rows (seeded, outside the pool) are read in one filtering pass and
    tested by `actors` tasks with a scoring actor's resources each: its cost grows with k, not with the dataset.
    `ds` (at least one row) is read twice: for the pool, then for the re-ranked table."""
    s = cfg.score
    # Each block's top rows found in a task, so the driver holds the pool, not a block of the table (reading the
    # blocks here grew the driver's peak with their size).
    pool = top_k(ds, s.transfer_pool * k, "score")
    pool = pool.select([c for c in ("key", "score", "transform", "token_order") if c in pool.column_names])
    pool_images, refs = seeded_rows(cfg, data, s.transfer_refs, exclude=frozenset(pool.column("key").to_pylist()))
    pool = _join_on_key(pool, pool_images)
    if not refs.num_rows:  # the pool is the whole dataset: nothing outside it to test on, nothing to re-order
        return ds, {"pool_rows": pool.num_rows, "reference_rows": 0, "moved": 0, "forward_passes": 0}
    # One task per scoring actor's resources, each on a contiguous part of the pool (a row's lift does not
    # depend on the rows tested with it).
    task = ray.remote(_transfer_task).options(num_cpus=s.cpus_per_actor, num_gpus=1 if s.use_gpu else 0)
    cuts = np.linspace(0, pool.num_rows, min(actors, pool.num_rows) + 1).astype(int)
    refs_ref = ray.put(refs)
    parts = ray.get([task.remote(model, cfg.storage, s, cfg.run.seed, threads, s.use_gpu, pool.slice(a, b - a),
                                 refs_ref) for a, b in zip(cuts, cuts[1:])])
    lift = np.concatenate([p[0] for p in parts])
    passes = (sum(p[1][0] for p in parts), 0)
    ray.get(ledger.add_passes.remote("transfer", passes))
    scores = pool.column("score").to_numpy().astype(np.float64)
    fused = fuse_ranks(scores, lift)
    out = ds.map_batches(apply_transfer, batch_format="pyarrow", batch_size=TABLE_ROWS_PER_FILE,
                         fn_kwargs={"keys": pool.column("key").combine_chunks(), "fused": fused, "lift": lift})
    return out, {"pool_rows": pool.num_rows, "reference_rows": refs.num_rows,
                 "moved": int((fused != scores).sum()), "forward_passes": passes[0]}


def _transfer_task(model: ModelConfig, storage_cfg: StorageConfig, s: ScoreConfig, seed: int, threads: int,
                   use_gpu: bool, pool: pa.Table, refs: pa.Table) -> tuple[np.ndarray, tuple[int, int]]:
    """Ray task: the transfer lift of each `pool` row (in its order) against the decodable `refs` rows, and the
    image forwards it took."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    clip = load_clip(model, storage_cfg, device, seed=seed)
    prepare_model(clip.model, s.amp)
    grid = token_grid(clip.model, clip.image_size)
    dtype = next(clip.model.parameters()).dtype
    _, pixels, _ = decode_rows(pool, clip.image_size)  # every pool row decoded when it was scored
    _, ref_pixels, _ = decode_rows(refs, clip.image_size)
    if ref_pixels is None:
        return np.full(pool.num_rows, np.nan), (0, 0)
    x = normalize(torch.from_numpy(pixels).to(device), clip.preprocess_cfg).to(dtype)
    y = normalize(torch.from_numpy(ref_pixels).to(device), clip.preprocess_cfg).to(dtype)
    text = CaptionFeatures(clip.model, clip.tokenizer, device)(pool.column("caption").to_pylist())
    transforms = (pool.column("transform").to_pylist() if "transform" in pool.column_names
                  else [signal_name(signal_columns(s)[0])] * pool.num_rows)
    order = None
    if "token_order" in pool.column_names:
        order = torch.tensor(np.stack(pool.column("token_order").to_numpy(zero_copy_only=False)).astype(np.int64),
                             device=device)
    count = tokens_to_take(max(s.token_portions), grid)
    lift = transfer_lift(clip.model, x, text, y, transforms, order, count, grid, s.batch_size)
    tested = sum(t in TRANSFERABLE for t in transforms)
    forwards = padded_rows(len(y), s.batch_size) + len(y) * padded_rows(tested, s.batch_size)
    return lift.numpy().astype(np.float64), (forwards, 0)


def _join_on_key(pool: pa.Table, rows: pa.Table) -> pa.Table:
    """`pool` (in its order) with the image and caption of its rows from `rows`."""
    where = {key: i for i, key in enumerate(rows.column("key").to_pylist())}
    take = pa.array([where[key] for key in pool.column("key").to_pylist()], pa.int64())
    return pool.append_column("image", rows.column("image").take(take)).append_column(
        "caption", rows.column("caption").take(take))


def detection_metrics(table_uri: str, cfg: Config, ks: list[int], output: str, k: int | None) -> dict:
    """AUROC and precision/recall@k of the scores against `is_poison`, the clean rows above the selection's
    cut-off (the k-th score), plus the histogram PNG."""
    t = read_columns(table_uri, cfg.storage, ["score", "is_poison"])
    scores = t.column("score").to_numpy().astype(np.float64)
    truth = t.column("is_poison").to_numpy(zero_copy_only=False).astype(bool)
    metrics = {"rows": len(scores), "poisons": int(truth.sum())}
    if 0 < truth.sum() < len(truth):
        metrics["auroc"] = auroc(scores, truth)
        metrics.update(precision_recall_at_k(scores, truth, [k for k in ks if k <= len(scores)]))
    cutoff = selection_cutoff(scores, k) if k else None
    if cutoff is not None:
        metrics.update(cutoff=cutoff, clean_above_cutoff=int(((scores >= cutoff) & ~truth).sum()),
                       poisons_above_cutoff=int(((scores >= cutoff) & truth).sum()))
    storage.write_json(storage.join(output, DETECTION_FILE), metrics, cfg.storage)
    storage.write_bytes(storage.join(output, HISTOGRAM_FILE),
                        histogram_png(scores, truth, cfg.score.method, cutoff), cfg.storage)
    return metrics


