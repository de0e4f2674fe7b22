"""Local-density suspicion scores in the model's own embedding space: k-distance, SLOF and DAO (pure torch).

Huang et al., "Detecting Backdoor Samples in Contrastive Language Image Pretraining" (ICLR 2025) find that a
backdoored CLIP gives its poisoned training images a local neighbourhood far *sparser* than clean images have,
so that local outlier scores flag them: k-distance, SLOF (simplified LOF) and DAO (dimensionality-aware outlier
score, Anderberg et al., SDM 2024). As in their code, every score here is higher = sparser = more suspicious.
That holds while the reference the neighbours come from holds fewer poisons than k (their batches at a 0.01-0.1%
poisoning rate): the k-th neighbour of a poison is then a clean image, far away. A reference with many more
poisons than k makes a poison's k nearest neighbours other poisons, packed tight by the shared trigger: its
k-distance is then the *lowest* of all, and SLOF and DAO lose the signal (tests/test_density.py, both regimes).

Every row is scored against one fixed `Reference` (e.g. the rows `reference_keys` picks, embedded once), never
against the other rows of its batch, so that a score does not depend on the batching, the number of actors or
the row order, and memory is O(chunk x reference), whatever the dataset's size. A row never counts itself (nor
its own caption) as a neighbour: reference points are matched to queries by row key.

Use from a Ray actor: build the `Reference` once in the constructor from the reference rows' embeddings and keys,
then call `density_scores` on each batch's image embeddings and keys.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .score_rows import key_rank
from .names import DENSITY_SCORES as SCORES

DEFAULT_CHUNK = 256  # query rows per distance matrix: memory chunk x reference points
LID_MAX = 1000.0  # LID of a point whose k nearest neighbours are all at the same distance (the MLE is infinite)
# Smallest cosine distance, in units of the dtype's epsilon: 1 - cos of two (near-)duplicates is rounding noise
# of a D-term dot product (a few tens of eps for D = 512), and a floor keeps every ratio and logarithm finite.
FLOOR_EPS = 64


def reference_keys(keys: Sequence[str], seed: int, size: int) -> list[str]:
    """The `size` keys of lowest `key_rank` (ties by key), in key order: a seeded sample of rows that depends on
    the set of keys alone, not on their order or on how the dataset is split into blocks."""
    if size < 1:
        raise ValueError(f"the reference needs at least one row, got size={size}.")
    unique = set(keys)
    if len(unique) < size:
        raise ValueError(f"a reference of {size} rows needs as many distinct keys, got {len(unique)}.")
    return sorted(sorted(unique, key=lambda key: (key_rank(seed, key), key))[:size])


def _floor(dtype: torch.dtype) -> float:
    return FLOOR_EPS * torch.finfo(dtype).eps


def _lid(knn: torch.Tensor) -> torch.Tensor:
    """MLE of local intrinsic dimensionality (Amsaleg et al., KDD 2015) from each row's k nearest-neighbour
    distances in ascending order: k / sum_i ln(d_k / d_i), at most LID_MAX (all k distances equal)."""
    spread = torch.log(knn[:, -1:] / knn).sum(dim=1)
    return (knn.shape[1] / spread).clamp(max=LID_MAX)  # spread == 0 -> inf -> LID_MAX


def _nearest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k-th smallest distance (n,) and the columns of its k nearest (n, k), in column order. Columns
    tied at the k-th distance are taken lowest first (the reference's key order), whatever topk would pick."""
    kth = d.kthvalue(k, dim=1, keepdim=True).values
    below = d < kth
    tied = d == kth
    take = below | (tied & (tied.cumsum(dim=1) <= k - below.sum(dim=1, keepdim=True)))
    return kth.squeeze(1), take.nonzero()[:, 1].view(-1, k)


class Reference:
    """The fixed reference set that every row is scored against: its L2-normalised points (R images, then R
    captions when given), their row keys, and each point's distances to its k nearest other-row points, from
    which SLOF and DAO take each neighbour's k-distance and LID. Built once, O(R x k) memory after the build.

    `images` (R, D) and optional `captions` (R, D) are the rows' embeddings, `keys` their distinct row keys; the
    points are put in key order, so the given order does not matter and ties between neighbours break by key.
    Compute in float64 when near-duplicates matter: 1 - cos loses the distances below ~1e-6 in float32. On a GPU,
    keep TF32 matmuls off (torch's default), or distances are rounded to 1e-3.
    """

    def __init__(self, images: torch.Tensor, keys: Sequence[str], k: int, captions: torch.Tensor | None = None,
                 chunk: int = DEFAULT_CHUNK):
        if images.ndim != 2 or len(images) != len(keys):
            raise ValueError(f"the reference needs embeddings (R, D) and R keys, got {tuple(images.shape)} and "
                             f"{len(keys)} keys.")
        if not images.is_floating_point():
            raise ValueError(f"reference embeddings must be floating point, got {images.dtype}.")
        if captions is not None and captions.shape != images.shape:
            raise ValueError(f"caption embeddings {tuple(captions.shape)} must match the image embeddings "
                             f"{tuple(images.shape)}, one per reference row.")
        if len(set(keys)) != len(keys):
            raise ValueError("reference keys must be distinct: a key names one row of the dataset.")
        self.pairs = 1 if captions is None else 2  # points per row: its image, and its caption
        if k < 2:
            raise ValueError(f"k must be at least 2 (the LID estimate needs two distances), got {k}.")
        if self.pairs * (len(keys) - 1) < k:
            raise ValueError(f"a reference of {len(keys)} rows offers {self.pairs * (len(keys) - 1)} neighbours "
                             f"to a point once its own row is left out, fewer than k={k}: use more rows or a "
                             f"smaller k.")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}.")
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        pick = torch.tensor(order, dtype=torch.long, device=images.device)
        points = [F.normalize(images[pick], dim=-1)]
        if captions is not None:
            points.append(F.normalize(captions.to(images)[pick], dim=-1))
        self.points = torch.cat(points)  # (pairs * R, D): row i's image at i, its caption at R + i
        self.keys = [keys[i] for i in order]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.k, self.chunk, self.rows = int(k), int(chunk), len(keys)
        own = torch.arange(self.rows, device=self.points.device).repeat(self.pairs)
        self.knn = torch.cat([self._distances(x, o).topk(self.k, dim=1, largest=False).values
                              for x, o in self._chunks(self.points, own)])[:len(self.points)]

    @property
    def with_captions(self) -> bool:
        return self.pairs == 2

    def _chunks(self, x: torch.Tensor, own: torch.Tensor):
        """(points, own row index) in chunks of exactly `chunk` rows, the last padded with zero vectors of no
        row: every distance matrix has the same shape, so a row's distances never depend on its batch (a
        matrix product's rounding can depend on its shape; see core/scoring.py in_fixed_chunks)."""
        for lo in range(0, len(x), self.chunk):
            part, mine = x[lo:lo + self.chunk], own[lo:lo + self.chunk]
            if len(part) < self.chunk:
                part = torch.cat([part, part.new_zeros((self.chunk - len(part), part.shape[1]))])
                mine = torch.cat([mine, mine.new_full((self.chunk - len(mine),), -1)])
            yield part, mine

    def _distances(self, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Cosine distances (n, points) of normalised rows `x` to the reference points, +inf to the points of
        each row's own reference row (`own`, -1 for none) so that no row is its own neighbour.

        Cosine distance 1 - cos, because CLIP is trained and used on the cosine of normalised embeddings: the
        angle is the model's own geometry. On the sphere the Euclidean distance (the paper's) is sqrt(2 (1 - cos)),
        a monotone function of it: the same neighbours and k-distance ranking, the same DAO (it is invariant to
        d -> d**a, which divides LID by a); only SLOF's ratios change (they are square-rooted). And it costs one
        matrix product."""
        d = (1.0 - x @ self.points.T).clamp_min(_floor(self.points.dtype))
        rows = (own >= 0).nonzero().squeeze(1)
        for p in range(self.pairs):
            d[rows, own[rows] + p * self.rows] = torch.inf
        return d


def density_scores(queries: torch.Tensor, query_keys: Sequence[str], reference: Reference, k: int | None = None,
                   which: Sequence[str] = SCORES) -> dict[str, torch.Tensor]:
    """Local outlier scores (N,) of image embeddings `queries` (N, D) against `reference`, higher = sparser
    neighbourhood = more suspicious (Huang et al., ICLR 2025): for each name in `which`, 'kdist' (k-distance),
    'slof' (simplified LOF) or 'dao' (log of DAO). Each query's neighbours are its k (at most reference.k)
    nearest reference points outside its own row (matched by key); a row's score depends on nothing else.

    With d the cosine distance (floored at FLOOR_EPS x eps), kd(x) the k-th smallest d from x to the points of
    other rows, N(q) those k points (ties by key) and LID(o) = k / sum_{i<=k} ln(kd(o) / d_i(o)) (MLE):
    kdist(q) = kd(q); slof(q) = mean_{o in N(q)} kd(q) / kd(o);
    dao(q) = ln mean_{o in N(q)} (kd(q) / kd(o)) ** LID(o)  (the log keeps it finite, and ranks alike).
    A reference point's kd and LID are taken within the reference, leaving out only its own row's points."""
    k = reference.k if k is None else int(k)
    if not 2 <= k <= reference.k:
        raise ValueError(f"k must be between 2 and the reference's k={reference.k}, got {k}.")
    unknown = [w for w in which if w not in SCORES]
    if unknown or not which:
        raise ValueError(f"unknown density score {unknown[0] if unknown else None!r}: use some of {', '.join(SCORES)}.")
    if queries.ndim != 2 or queries.shape[1] != reference.points.shape[1] or len(queries) != len(query_keys):
        raise ValueError(f"queries must be (N, {reference.points.shape[1]}) with N keys, got "
                         f"{tuple(queries.shape)} and {len(query_keys)} keys.")
    ref = reference.points
    x = F.normalize(queries.to(ref), dim=-1)
    own = torch.tensor([reference.index.get(key, -1) for key in query_keys], dtype=torch.long, device=ref.device)
    kd_ref = reference.knn[:, k - 1]
    log_kd_ref = kd_ref.log()
    lid_ref = _lid(reference.knn[:, :k]) if "dao" in which else None
    out: dict[str, list[torch.Tensor]] = {w: [] for w in which}
    for part, mine in reference._chunks(x, own):
        kd, nn = _nearest(reference._distances(part, mine), k)
        if "kdist" in which:
            out["kdist"].append(kd)
        if "slof" in which:
            out["slof"].append((kd[:, None] / kd_ref[nn]).mean(dim=1))
        if "dao" in which:
            terms = lid_ref[nn] * (kd.log()[:, None] - log_kd_ref[nn])
            out["dao"].append(torch.logsumexp(terms, dim=1) - math.log(k))
    n = len(queries)
    return {w: (torch.cat(v)[:n] if v else ref.new_zeros(0)).to(queries.device) for w, v in out.items()}
