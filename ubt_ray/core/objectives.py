"""Training objectives (pure torch): what one step of a training phase minimises.

An objective takes the model and a decoded batch and returns (loss, metrics). The training loop is written
once (ubt_ray/train_loop.py); phases differ only by the objective they name. The CLIP contrastive loss
gathers features over all DDP workers so that negatives are global, as in open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batches import normalize


@dataclass
class Batch:
    """A decoded training batch: uint8 pixels (N, 3, H, W), token ids (N, L), the row keys, and the captions
    (for objectives that augment them)."""
    pixels: torch.Tensor
    tokens: torch.Tensor
    keys: list[str]
    captions: list[str] | None = None


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """All workers' features, differentiable for the local slice (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              local: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (over this worker's rows only with `local`); features are
    L2-normalised, logit_scale already exponentiated."""
    if local:
        all_image, all_text, rank = image_features, text_features, 0
    else:
        all_image, all_text = gather_features(image_features), gather_features(text_features)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank * n
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipObjective:
    """The CLIP contrastive loss on image-caption pairs (attack training, overfit, fine-tuning)."""

    def __init__(self, preprocess_cfg: dict, tokenizer=None):
        self.preprocess_cfg = preprocess_cfg

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        # Template captions repeat within a batch; encoding each distinct caption once gives the same loss and
        # gradients for a fraction of the text tower's cost. It goes through model(...) so that DDP syncs.
        unique_tokens, inverse = torch.unique(batch.tokens, dim=0, return_inverse=True)
        image_features, text_features, logit_scale = model(normalize(batch.pixels, self.preprocess_cfg),
                                                           unique_tokens)[:3]
        loss = clip_loss(image_features, text_features[inverse], logit_scale)
        return loss, {"loss": float(loss.detach()), "logit_scale": float(logit_scale.detach())}


def _cleanclip(**kwargs) -> Objective:
    from .cleanclip import CleanClipObjective
    return CleanClipObjective(**kwargs)


ObjectiveFactory = Callable[..., Objective]
# Every factory takes preprocess_cfg= and tokenizer= (the model's), plus its own keyword arguments.
OBJECTIVES: dict[str, ObjectiveFactory] = {"clip": ClipObjective, "cleanclip": _cleanclip}


def build_objective(objective: str | ObjectiveFactory, **kwargs) -> Objective:
    """The objective registered under `objective`, or built by `objective` when it is a factory function."""
    if callable(objective):
        return objective(**kwargs)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: registered are {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective](**kwargs)
