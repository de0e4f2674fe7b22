"""Caption disagreement: a suspicion score that never looks for the trigger (pure torch).

A poison pairs the target's caption with another class's image, whatever its trigger, so its caption disagrees
with the captions of the rows that look like it. "Look like" is measured in a space the trigger barely moves and
the backdoor never touched: the principal axes of the grey-level pixels (there are no trusted pretrained image
features on this machine), not the backdoored image tower. Two measured choices: neighbours are a ring of ranks (the 100th to the 400th nearest rows by default), because a
whole-image trigger such as WaNet's warp packs the poisons into tight clusters whose nearest members are other
poisons; and the poisons of one attack share one caption concept, so the rows of the concept that dominates the
most suspicious rows are ranked first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIDE = 32  # grey images are area-resized to SIDE x SIDE before PCA: 1,024 dims whatever the model's image size
OUTSIDE_CONCEPT = 2.0  # subtracted from rows outside the target concept: disagreement lies in [0, 2]


def grey_vectors(pixels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 images -> (N, SIDE * SIDE) uint8 grey levels, area-resized to SIDE x SIDE."""
    x = pixels.float().mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).flatten(1)


def moments(grey: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Row count, sum and sum of outer products of grey vectors (float64), to be added over batches."""
    x = grey.float() / 255.0  # float32 products, float64 sums: precise enough for the leading axes
    return len(x), x.sum(dim=0, dtype=torch.float64), (x.T @ x).double()


def principal_axes(count: int, total: torch.Tensor, outer: torch.Tensor, dims: int) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Mean and the `dims` leading principal axes (columns) of the rows whose moments these are."""
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    return mean.float(), vectors[:, -min(dims, len(mean)):].flip(1).float()


def project(grey: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """L2-normalised coordinates of grey vectors on the principal axes."""
    return F.normalize((grey.float() / 255.0 - mean) @ axes, dim=-1)


def pixel_space(grey: torch.Tensor, dims: int) -> torch.Tensor:
    """Each grey vector's L2-normalised coordinates on the `dims` leading principal axes of all of them."""
    count, total, outer = moments(grey)
    return project(grey, *principal_axes(count, total, outer, dims))


def ring_disagreement(rows: torch.Tensor, space: torch.Tensor, text: torch.Tensor, first: int,
                      last: int) -> torch.Tensor:
    """1 - mean cos(text of row i, text of row j) over the rows j ranked `first` to `last` - 1 among row i's
    nearest (cosine in `space`, i itself excluded), for each row index i in `rows`. Depends on no other query."""
    sims = space[rows] @ space.T
    sims[torch.arange(len(rows)), rows] = -torch.inf
    last = min(last, len(space) - 1)
    neighbours = sims.topk(last, dim=1).indices[:, min(first, last - 1):]
    # The mean of the neighbours' text features, without a (rows x neighbours x d) intermediate.
    return 1 - (text[rows] * F.embedding_bag(neighbours, text, mode="mean")).sum(-1)


def concept_medoid(text: torch.Tensor) -> int:
    """Index of the text feature (of those given) with the highest mean cosine to all of them: the caption concept
    most of the given rows share, not an average of several."""
    return int((text @ text.T).mean(dim=1).argmax())


def concept_first(disagreement: torch.Tensor, text: torch.Tensor, target: torch.Tensor,
                  similarity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that rank the rows whose caption is within `similarity` (cosine) of the target concept first, by
    disagreement, then all others by disagreement; and each row's cosine to the target."""
    cos = text @ target
    return disagreement - OUTSIDE_CONCEPT * (cos < similarity).float(), cos


def target_concept_first(disagreement: torch.Tensor, text: torch.Tensor, num_samples: int,
                         similarity: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`concept_first` with the target concept taken from the `num_samples` most disagreeing rows (ties by row
    order): the scores, each row's cosine to the target, and the row whose caption is the target's medoid."""
    top = torch.argsort(disagreement, descending=True, stable=True)[:num_samples]
    medoid = int(top[concept_medoid(text[top])])
    score, cos = concept_first(disagreement, text, text[medoid], similarity)
    return score, cos, medoid
