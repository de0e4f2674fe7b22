"""unlearn: token-portion unlearning from θ₀ on Ray Train (METHOD.md step 4); the cleaned model is an open_clip
local-dir checkpoint.

The loop streams the retain rows (CLIP loss); the forget rows, few by design, are read whole by each worker
in `forget_objective`, which also computes once what each of them is trained towards with the frozen θ₀.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.compute as pc
import torch

from .. import storage
from ..config import Config, ModelConfig, StorageConfig
from ..core.batches import decode_image
from ..core.scoring import resolve_saliency, token_grid
from ..core.unlearning import ForgetSet, UnlearnObjective, forget_setup_passes, prepare_forget_inputs
from ..models import load_clip
from ..shards import read_columns, shard_schema
from ..train_loop import FitResult, FitSpec, Probe, fit


def unlearn(cfg: Config, model_uri: str, forget: str, retain: str, probe: Probe | None = None,
            callbacks: list | None = None) -> FitResult:
    """Unlearn the `unlearn.num_samples` top rows of `forget` from the checkpoint at `model_uri`, retaining
    with the CLIP loss on `retain`; the cleaned model goes to <unlearn.output>/model. A sweep passes a `probe`
    (intermediate metrics) and Ray Train `callbacks` (reporting them to Tune)."""
    u = cfg.unlearn
    init = dataclasses.replace(cfg.model, checkpoint=storage.absolute(model_uri))
    return fit(cfg, FitSpec(
        phase="unlearn", data=retain, output=u.output, init=init, schedule=u, objective=forget_objective,
        objective_kwargs={"forget_uri": storage.absolute(forget), "storage_cfg": cfg.storage, "init": init, "seed": cfg.run.seed,
                          "num_samples": u.num_samples, "kind": u.forget, "token_portion": u.token_portion,
                          "forget_weight": u.forget_weight, "whole_image_weight": u.whole_image_weight,
                          "margin": u.margin, "anchor_weight": u.anchor_weight,
                          "forget_batch_size": u.forget_batch_size, "push_text": u.push_text},
        trainable=u.trainable, probe=probe, callbacks=list(callbacks or [])))


def load_forget_set(forget_uri: str, storage_cfg: StorageConfig, num_samples: int, image_size: int,
                    tokenizer, grid_count: int) -> ForgetSet:
    """The `num_samples` best-ranked rows of the forget shards, decoded."""
    names = shard_schema(forget_uri, storage_cfg).names
    cols = ["key", "image", "caption", "rank"] + [c for c in ("transform", "token_order") if c in names]
    table = read_columns(forget_uri, storage_cfg, cols)
    table = table.take(pc.sort_indices(table, sort_keys=[("rank", "ascending")])[:num_samples])
    pixels = torch.from_numpy(np.stack([decode_image(b, image_size) for b in table.column("image").to_pylist()]))
    transforms = (table.column("transform").to_pylist() if "transform" in cols else ["token_mask"] * table.num_rows)
    orders = None
    if "token_order" in cols:
        orders_list = table.column("token_order").to_pylist()
        if all(o is not None and len(o) == grid_count for o in orders_list):
            orders = torch.tensor(orders_list, dtype=torch.long)
    return ForgetSet(pixels, tokenizer(table.column("caption").to_pylist()), transforms, orders)


def forget_objective(preprocess_cfg: dict, forget_uri: str, storage_cfg: StorageConfig, init: ModelConfig,
                     seed: int, num_samples: int, kind: str, token_portion: float, forget_weight: float,
                     whole_image_weight: float, margin: float, forget_batch_size: int, anchor_weight: float = 0.0,
                     push_text: bool = False, tokenizer=None) -> UnlearnObjective:
    """The unlearning objective of one Ray Train worker (a factory the training loop calls)."""
    reference = load_clip(init, storage_cfg, "cpu", seed=seed)
    reference.model.eval().requires_grad_(False)
    grid = token_grid(reference.model, reference.image_size)
    forget = load_forget_set(forget_uri, storage_cfg, num_samples, reference.image_size, reference.tokenizer,
                             grid.count)
    inputs = prepare_forget_inputs(reference.model, forget, preprocess_cfg, grid, token_portion, kind)
    # θ₀'s passes above, which the training loop counts with each step's (UnlearnObjective.sample_passes).
    setup = forget_setup_passes(len(forget.pixels), kind, forget.orders is not None,
                                resolve_saliency(reference.model, "auto"))
    return UnlearnObjective(preprocess_cfg, forget, inputs, kind, forget_weight, margin, forget_batch_size, seed,
                            whole_image_weight, reference=reference.model if anchor_weight > 0 else None,
                            anchor_weight=anchor_weight, setup_passes=setup, push_text=push_text)
