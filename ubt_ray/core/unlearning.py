"""Token-portion unlearning (METHOD.md step 4), pure torch: L = forget_weight * L_forget + L_retain.

The retain loss is the CLIP loss on the loop's batch (least suspicious rows). The forget loss acts on the
selected suspicious rows, held in memory (k is small): `token_invariance` pulls f_θ(x) towards what the
original model saw without the trigger, stopgrad f_θ₀(x̄); `push_away` pushes cos(f_θ(x), g_θ(t)) below a
margin on the whole image by moving the image features alone (with push_text, the caption's too);
`local_push` does the same on the image with only its top-ρ tokens kept; `invariance_push` is the sum of
token_invariance and push_away; `auto` picks per row by the transform that flagged it: token_invariance
(weight forget_weight) for a row the token mask flagged, push_away (weight whole_image_weight) for one a
whole-image transform (blur, downup) or a density score flagged. With an
anchor weight, a third term keeps the retain batch's image and caption features where θ₀ has them (1 - cosine),
so that what the model knew beyond the training captions' words moves as little as the forgetting allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batches import normalize
from .names import FORGET_LOSSES, TRAINABLE
from .objectives import Batch, clip_loss
from .scoring import (TRANSFORMS, TokenGrid, apply_mask, image_features, remove_trigger, text_features, token_mask,
                      token_order, token_saliency, tokens_to_take)

INVARIANCE = ("token_invariance", "invariance_push")  # trained towards f_θ₀(x̄), on the unmasked image x
PUSH = ("push_away", "local_push", "invariance_push")  # cos(f_θ(·), g_θ(t)) pushed below the margin
LOCAL_TRANSFORM = "token_mask"  # the one transform that removes a local trigger; under auto its rows use invariance


@dataclass
class ForgetSet:
    """The selected rows: uint8 pixels (k, 3, H, W), caption tokens (k, L), the transform that flagged each
    row, and each row's token order by saliency (None where the score gave none: computed with θ₀ then)."""
    pixels: torch.Tensor
    tokens: torch.Tensor
    transforms: list[str]
    orders: torch.Tensor | None


def prepare_forget_inputs(reference: torch.nn.Module, forget: ForgetSet, preprocess_cfg: dict, grid: TokenGrid,
                          token_portion: float, kind: str, batch_size: int = 256) -> torch.Tensor:
    """What each forget row is trained towards, computed once with the frozen θ₀ (`reference`):
    token_invariance and invariance_push: the target features f_θ₀(x̄); local_push: the normalised images
    with only the top-ρ tokens kept; push_away: the normalised images; auto: f_θ₀(x̄) of every row, which the
    objective uses only on the rows the token mask flagged (the others are pushed away)."""
    count = tokens_to_take(token_portion, grid)
    out = []
    for start in range(0, len(forget.pixels), batch_size):
        part = slice(start, start + batch_size)
        x = normalize(forget.pixels[part], preprocess_cfg)
        if kind == "push_away":
            out.append(x)
            continue
        order = forget.orders[part] if forget.orders is not None else None
        if order is None:
            text = text_features(reference, forget.tokens[part]).detach()
            order = token_order(token_saliency(reference, x, text, grid))
        if kind == "local_push":
            out.append(apply_mask(x, token_mask(order, count, grid, keep=True)))
            continue
        # A row a density score flagged has no trigger-removing transform: it is pushed away under auto, and its
        # invariance target (never used then) is its own image's feature.
        cleaned = torch.stack([remove_trigger(x[i:i + 1], t, order[i:i + 1], count, grid)[0] if t in TRANSFORMS
                               else x[i] for i, t in enumerate(forget.transforms[part])])
        with torch.no_grad():
            out.append(image_features(reference, cleaned))
    return torch.cat(out)


def forget_setup_passes(rows: int, kind: str, has_orders: bool, saliency: str) -> tuple[int, int]:
    """(forward, backward) image-tower passes of θ₀ in `prepare_forget_inputs` over `rows` forget rows: none for
    push_away; else a saliency forward per row when the rows carry no token order (and a backward unless the
    saliency, resolve_saliency's, is attention), then, but for local_push, a forward of the row with its trigger
    removed."""
    if kind == "push_away":
        return 0, 0
    saliency_rows = 0 if has_orders else rows
    return saliency_rows + (0 if kind == "local_push" else rows), 0 if saliency == "attention" else saliency_rows


def worker_share(chosen: list, rank: int, world: int) -> list:
    """The forget rows of a step that DDP rank `rank` of `world` takes: every world-th one, and at least one."""
    return chosen[rank::world] or chosen[:1]


class UnlearnObjective:
    """One unlearning step: CLIP loss on the retain batch plus the forget loss on a forget mini-batch.

    The forget mini-batch of step s is a seeded permutation's slice, split over DDP ranks; both parts go
    through one model(...) call so that DDP sees a single forward. `setup_passes` are the (forward, backward)
    passes of θ₀ that made `inputs` in this worker (forget_setup_passes); a training loop adds them to the
    passes it counts with `sample_passes`.
    """

    def __init__(self, preprocess_cfg: dict, forget: ForgetSet, inputs: torch.Tensor, kind: str,
                 forget_weight: float, margin: float, forget_batch_size: int, seed: int,
                 whole_image_weight: float | None = None, reference: torch.nn.Module | None = None,
                 anchor_weight: float = 0.0, setup_passes: tuple[int, int] = (0, 0), push_text: bool = False):
        if kind not in FORGET_LOSSES:
            raise ValueError(f"unknown forget loss {kind!r}: use one of {', '.join(FORGET_LOSSES)}")
        if anchor_weight > 0 and reference is None:
            raise ValueError("an anchor weight needs the reference model θ₀")
        self.reference, self.anchor_weight = reference, float(anchor_weight)
        self.preprocess_cfg, self.forget, self.inputs, self.kind = preprocess_cfg, forget, inputs, kind
        self.margin, self.push_text = margin, push_text
        # Per row: trained towards its target (invariance), pushed away from its caption (push), with a weight.
        k = len(forget.pixels)
        if kind == "auto":
            local = torch.tensor([t == LOCAL_TRANSFORM for t in forget.transforms])
            whole = forget_weight if whole_image_weight is None else whole_image_weight
            self.invariance, self.push = local, ~local
            self.weight = torch.where(local, torch.tensor(float(forget_weight)), torch.tensor(float(whole)))
        else:
            self.invariance = torch.full((k,), kind in INVARIANCE)
            self.push = torch.full((k,), kind in PUSH)
            self.weight = torch.full((k,), float(forget_weight))
        self.forget_batch_size = min(forget_batch_size, len(forget.pixels))
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.setup_passes = setup_passes

    def sample_passes(self, rows_per_worker: int, world: int) -> tuple[int, int]:
        """(forward, backward) image-tower passes of one step over `world` workers of `rows_per_worker` retain
        rows each: the retain batch and each worker's share of the forget mini-batch (`worker_share`: at least
        one row each) forward and backward in one call, and with an anchor θ₀'s forward of the retain batch."""
        retain = rows_per_worker * world
        forget = sum(len(worker_share(list(range(self.forget_batch_size)), rank, world)) for rank in range(world))
        return retain + forget + (retain if self.anchor_weight > 0 else 0), retain + forget

    def _next_indices(self) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        while len(self.order) < self.forget_batch_size:
            self.order += torch.randperm(len(self.forget.pixels), generator=self.generator).tolist()
        chosen, self.order = self.order[:self.forget_batch_size], self.order[self.forget_batch_size:]
        return torch.tensor(worker_share(chosen, rank, world), dtype=torch.long)

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        idx = self._next_indices()
        device = batch.pixels.device
        retain_x = normalize(batch.pixels, self.preprocess_cfg)
        invariance, push = self.invariance[idx].to(device), self.push[idx].to(device)
        if self.kind in ("push_away", "local_push"):
            forget_x = self.inputs[idx].to(device)
        else:
            forget_x = normalize(self.forget.pixels[idx].to(device), self.preprocess_cfg)
        unique, inverse = torch.unique(batch.tokens, dim=0, return_inverse=True)
        texts = torch.cat([unique, self.forget.tokens[idx].to(device)]) if bool(push.any()) else unique
        image_f, text_f, logit_scale = model(torch.cat([retain_x, forget_x]), texts)[:3]
        n, u = len(retain_x), len(unique)
        retain = clip_loss(image_f[:n], text_f[:u][inverse], logit_scale)
        per_row = torch.zeros(len(idx), device=device)
        if bool(invariance.any()):
            per_row = per_row + invariance * (1 - (image_f[n:] * self.inputs[idx].to(device)).sum(-1))
        if bool(push.any()):
            caption_f = text_f[u:] if self.push_text else text_f[u:].detach()
            per_row = per_row + push * F.relu((image_f[n:] * caption_f).sum(-1) - self.margin)
        loss = retain + (self.weight[idx].to(device) * per_row).mean()
        metrics = {"retain_loss": float(retain.detach()), "forget_loss": float(per_row.mean().detach()),
                   "logit_scale": float(logit_scale.detach())}
        if self.anchor_weight > 0:
            anchor = self._anchor(retain_x, unique, image_f[:n], text_f[:u])
            loss = loss + self.anchor_weight * anchor
            metrics["anchor_loss"] = float(anchor.detach())
        return loss, {"loss": float(loss.detach()), **metrics}

    def _anchor(self, x: torch.Tensor, tokens: torch.Tensor, image_f: torch.Tensor,
                text_f: torch.Tensor) -> torch.Tensor:
        """Mean (1 - cosine) between the retain batch's image and caption features and θ₀'s."""
        if next(self.reference.parameters()).device != x.device:
            self.reference.to(x.device)
        with torch.no_grad():
            ref_image, ref_text = self.reference(x, tokens)[:2]
        return ((1 - F.cosine_similarity(image_f, ref_image.to(image_f.dtype), dim=-1)).mean()
                + (1 - F.cosine_similarity(text_f, ref_text.to(text_f.dtype), dim=-1)).mean())


def set_trainable(model: torch.nn.Module, which: str) -> int:
    """Freeze every parameter outside `which` (all, visual, visual.early = patch embedding and the first half
    of the vision blocks, text); returns how many parameters stay trainable."""
    if which not in TRAINABLE:
        raise ValueError(f"unknown trainable set {which!r}: use one of {', '.join(TRAINABLE)}")
    blocks = getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", None)
    early = len(blocks) // 2 if blocks is not None else 0

    def moves(name: str) -> bool:
        if which == "all":
            return True
        if which == "text":
            return not name.startswith("visual.") and name != "logit_scale"
        if not name.startswith("visual."):
            return False
        if which == "visual":
            return True
        if name.startswith("visual.transformer.resblocks."):
            return int(name.split(".")[3]) < early
        return not name.startswith(("visual.ln_post", "visual.proj", "visual.attn_pool"))

    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(moves(name))
        count += p.numel() if p.requires_grad else 0
    return count
