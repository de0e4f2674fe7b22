"""The trigger-transfer test: does what a row's transform removes carry the row's caption to other images?

A backdoor's defining property is that its trigger, put on any image, pulls that image to the target caption. A
scored row's trigger candidate is what its trigger-removing transform takes away (the masked tokens for token_mask;
x - T(x) for blur and downup). Put on reference images y, a poison's candidate holds the trigger and lifts their
similarity to the row's caption; a clean row's candidate is its object's own detail, which means little on another
image. `transfer_lift` measures that lift; `fuse_ranks` re-orders the top of a score table by it and by the score.
Plain PyTorch, no Ray (the score phase runs it on the rows it re-ranks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .scoring import TokenGrid, full_mask, image_features, in_fixed_chunks, remove_trigger, token_mask

# Transforms whose removed part can be put on another image; a density-flagged row has no such part.
TRANSFERABLE = ("token_mask", "blur", "downup")


def trigger_part(x: torch.Tensor, transform: str, order: torch.Tensor | None = None, count: int = 0,
                 grid: TokenGrid | None = None) -> torch.Tensor:
    """What `transform` removes from each row of normalised `x`: for token_mask the (N, 1, H, W) bool mask of its
    first `count` tokens of `order`; for blur and downup the residual x - T(x)."""
    if transform == "token_mask":
        return full_mask(token_mask(order, count, grid), x)
    return x - remove_trigger(x, transform)


def put_on(y: torch.Tensor, x: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The rows' `trigger_part` on the one reference image `y` (1, C, H, W): x's masked tokens pasted over y, or
    the residual added to it."""
    return torch.where(part, x, y) if part.dtype == torch.bool else y + part


def transplants(x: torch.Tensor, y: torch.Tensor, transform: str, order: torch.Tensor | None = None, count: int = 0,
                grid: TokenGrid | None = None) -> torch.Tensor:
    """Each row of normalised `x`'s trigger candidate put on the one normalised reference image `y` (1, C, H, W):
    token_mask pastes x's first `count` tokens of `order` over y; blur and downup add x - T(x) to y."""
    return put_on(y, x, trigger_part(x, transform, order, count, grid))


def transfer_lift(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, refs: torch.Tensor,
                  transforms: Sequence[str], order: torch.Tensor | None = None, count: int = 0,
                  grid: TokenGrid | None = None, rows_per_forward: int = 256) -> torch.Tensor:
    """Per row of normalised `x` (N, C, H, W) with caption features `text` (N, D): the mean over the reference
    images `refs` (R, C, H, W) of cos(f(y ⊕ r), g(t)) - cos(f(y), g(t)), where y ⊕ r is `transplants` of the row's
    own transform (`transforms`, one per row; NaN for a row whose transform is not in TRANSFERABLE). The forwards
    run on `rows_per_forward` rows at a time (in_fixed_chunks), so a row's lift does not depend on the others."""
    lift = torch.full((x.shape[0],), float("nan"))
    if not len(refs):
        return lift
    with torch.no_grad():
        ref_features = in_fixed_chunks(lambda r: image_features(model, r), rows_per_forward, refs)
        for transform in dict.fromkeys(transforms):
            if transform not in TRANSFERABLE:
                continue
            rows = torch.tensor([i for i, t in enumerate(transforms) if t == transform])
            xs, ts = x[rows], text[rows]
            orders = order[rows] if order is not None and transform == "token_mask" else None
            part = trigger_part(xs, transform, orders, count, grid)  # once, whatever the number of references
            total = torch.zeros(len(rows), dtype=torch.float64)
            for j in range(len(refs)):
                moved = put_on(refs[j:j + 1], xs, part)
                f = in_fixed_chunks(lambda m: image_features(model, m), rows_per_forward, moved)
                total += ((f * ts).sum(-1) - ts @ ref_features[j]).double().cpu()
            lift[rows] = (total / len(refs)).float()
    return lift


def fuse_ranks(score: np.ndarray, lift: np.ndarray) -> np.ndarray:
    """The pool's scores re-assigned by the sum of each row's rank by score and by lift (ties to the larger lift,
    then the larger score): the row first by that sum gets the pool's largest score, and so on, so the pool keeps
    its set of values (and its place above every other row) and only its order changes. A row without a lift
    (NaN) counts its score rank twice."""
    score = np.asarray(score, dtype=np.float64)
    lift = np.asarray(lift, dtype=np.float64)
    n = len(score)

    def ranks(values: np.ndarray) -> np.ndarray:
        out = np.empty(len(values), dtype=np.int64)
        out[np.argsort(-values, kind="stable")] = np.arange(len(values))
        return out

    by_score = ranks(score)
    known = ~np.isnan(lift)
    by_lift = by_score.copy()
    if known.any():
        # The rows with a lift ranked among themselves, spread over the pool's ranks.
        sub = ranks(lift[known])
        by_lift[known] = np.round(sub * (n - 1) / max(known.sum() - 1, 1)).astype(np.int64)
    filled = np.where(known, lift, -np.inf)
    order = np.lexsort((-score, -filled, by_score + by_lift))
    fused = np.empty(n, dtype=np.float64)
    fused[order] = np.sort(score)[::-1]
    return fused
