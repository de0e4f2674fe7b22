"""score.method = caption_disagreement on Ray Data (core/neighbours.py says what it measures and why).

Three passes, each over every row once. (1) `read_parquet -> map_batches(Embedder, ActorPoolStrategy)`: each
actor loads the text tower once and turns a row into its grey-level vector and its caption's text feature;
undecodable images are counted as rejected. (2) On the driver: the moments of all grey vectors give the
principal axes; every row's coordinates on them and its text feature form two matrices put in the object store
once. (3) `range(N) -> map_batches(_disagreement)`: Ray Data tasks score row indices against all rows (the kNN
needs every row's coordinates). The driver holds at least N x (1 KiB + 4 x (d + dims)) bytes (107 MB for 60,000
rows with d = 128): fine to a few million rows, beyond which an approximate-kNN index would be the way (not
built). On a GPU cluster the embedding actors take the GPUs; the kNN tasks run on CPUs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from ..config import Config, ModelConfig, StorageConfig
from ..core.batches import decode_rows
from ..core.neighbours import grey_vectors, pixel_space, ring_disagreement, target_concept_first
from ..core.scoring import CaptionFeatures
from ..models import load_clip
from ..shards import batch_identity, map_on_actor_pool

QUERY_ROWS = 1024  # rows scored per kNN step: a (QUERY_ROWS x N) similarity matrix, 240 MB at N = 60,000


class Embedder:
    """Ray Data actor: loads the text tower once; rows -> key, grey vector, caption text feature."""

    def __init__(self, model: ModelConfig, storage_cfg: StorageConfig, seed: int, threads: int, use_gpu: bool,
                 ledger):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.clip = load_clip(model, storage_cfg, self.device, seed=seed)
        self.captions = CaptionFeatures(self.clip.model, self.clip.tokenizer, self.device)
        self.ledger = ledger

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = batch_identity(table)  # a batch retried after this actor was restarted replaces its first count
        table, pixels, counts = decode_rows(table, self.clip.image_size)
        # One text-tower pass per decodable row (an upper bound: a repeated caption is encoded once).
        rows = 0 if pixels is None else len(pixels)
        here = ray.get_runtime_context()
        ray.get(self.ledger.add.remote(batch, counts, source=here.get_actor_id(), passes=(rows, 0),
                                       node=here.get_node_id()))
        if pixels is None:  # no fixed-size columns to build: the whole dataset's rows are gathered, empty ones dropped
            return table.select(["key"])
        grey = grey_vectors(torch.from_numpy(pixels))
        text = self.captions(table.column("caption").to_pylist()).float().cpu().numpy()
        columns = {"key": table.column("key"), "caption": table.column("caption"),
                   "grey": pa.FixedSizeListArray.from_arrays(pa.array(grey.numpy().reshape(-1)), grey.shape[1]),
                   "text": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), text.shape[1])}
        if "is_poison" in table.column_names:
            columns["is_poison"] = table.column("is_poison").fill_null(False)
        return pa.table(columns)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as an (N, width) array."""
    flat = column.combine_chunks()
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), flat.type.list_size).copy()


def _disagreement(batch: dict, space_ref, text_ref, first: int, last: int) -> dict:
    """Ray Data UDF: the ring disagreement of the row indices in `batch["id"]`, against all rows."""
    space, text = torch.from_numpy(ray.get(space_ref)), torch.from_numpy(ray.get(text_ref))
    rows = torch.from_numpy(batch["id"].astype(np.int64))
    out = torch.cat([ring_disagreement(rows[i:i + QUERY_ROWS], space, text, first, last)
                     for i in range(0, len(rows), QUERY_ROWS)])
    return {"id": batch["id"], "disagreement": out.numpy()}


def caption_disagreement(cfg: Config, model: ModelConfig, data: str, columns: list[str], actors: int,
                         threads: int, ledger, k: int) -> tuple[ray.data.Dataset | None, dict]:
    """The score dataset (key, score, disagreement, target_similarity[, is_poison]) of every decodable row of
    `data`, and what the manifest should say about it; None when no row could be decoded."""
    s = cfg.score
    embedded = map_on_actor_pool(data, cfg, columns, Embedder, s.batch_size, actors, s.cpus_per_actor, s.use_gpu,
                                 {"model": model, "storage_cfg": cfg.storage, "seed": cfg.run.seed,
                                  "threads": threads, "use_gpu": s.use_gpu, "ledger": ledger})
    # In dataset order (blocks as read): a row's index below is its position here, whatever the block sizes.
    tables = [t for t in embedded.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    if not tables:
        return None, {}
    table = pa.concat_tables(tables)
    space = pixel_space(torch.from_numpy(_matrix(table.column("grey"))), s.neighbour_dims).numpy()
    text = _matrix(table.column("text"))
    rows = table.num_rows
    first, last = s.neighbour_ranks
    refs = {"space_ref": ray.put(space), "text_ref": ray.put(text)}
    scored = ray.data.range(rows, override_num_blocks=max(1, min(rows // QUERY_ROWS, 4 * actors))) \
        .map_batches(_disagreement, batch_format="numpy", fn_kwargs={**refs, "first": first, "last": last}) \
        .materialize()
    disagreement = np.empty(rows, np.float32)
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        disagreement[batch["id"]] = batch["disagreement"]
    info = {"neighbour_ranks": [first, min(last, rows - 1)], "principal_axes": int(space.shape[1])}
    score, cos = torch.from_numpy(disagreement), torch.zeros(rows)
    if s.target_concept:
        # The caption concept of the most suspicious rows: an attack's poisons share its target's caption.
        score, cos, medoid = target_concept_first(score, torch.from_numpy(text), k, s.concept_similarity)
        info.update({"target_caption": table.column("caption")[medoid].as_py(),
                     "rows_in_target_concept": int((cos >= s.concept_similarity).sum())})
    columns = {"key": table.column("key"), "score": pa.array(score.numpy()),
               "disagreement": pa.array(disagreement), "target_similarity": pa.array(cos.numpy())}
    if "is_poison" in table.column_names:
        columns["is_poison"] = table.column("is_poison")
    return ray.data.from_arrow(pa.table(columns)), info
