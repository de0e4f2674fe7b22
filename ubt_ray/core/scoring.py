"""Per-sample suspicion scores (METHOD.md step 2) and the trigger-removing transforms they rest on (pure torch).

A trigger is a fragile, low-level feature: a transform that removes it (masking the few most salient image
tokens for a local patch, blurring or down-up-sampling for a global pattern) collapses a poisoned pair's
image-text similarity while a clean pair barely moves. `drop` scores measure that collapse. Every operation
here is per sample, so a row's score never depends on the other rows of its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batches import normalize

TRANSFORMS = ("token_mask", "blur", "downup")
METHODS = ("token_drop", "cosine", "loss")
SALIENCIES = ("gradient", "gradient_x_input")


@dataclass(frozen=True)
class TokenGrid:
    """The image-token layout: `patch` x `patch` pixel tokens on a `side` x `side` grid."""
    patch: int
    side: int

    @property
    def count(self) -> int:
        return self.side * self.side


def token_grid(model: torch.nn.Module, image_size: int) -> TokenGrid:
    """The ViT patch grid; for other towers (ResNet) a 7x7 grid over the input, like its last feature map."""
    patch = getattr(model.visual, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if not patch:
        patch = max(1, image_size // 7)
    return TokenGrid(patch, image_size // patch)


def tokens_to_take(portion: float, grid: TokenGrid) -> int:
    """How many tokens a portion ρ of the grid is (at least one)."""
    return min(grid.count, max(1, math.ceil(portion * grid.count - 1e-9)))


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text features, each distinct caption encoded once."""
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return F.normalize(model.encode_text(unique), dim=-1)[inverse]


def image_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features of normalised inputs `x`."""
    return F.normalize(model.encode_image(x), dim=-1)


def token_saliency(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, grid: TokenGrid,
                   kind: str = "gradient") -> torch.Tensor:
    """(N, T) saliency of each image token: |d cos(f(x), g(t)) / dx| summed over the token's pixels, times |x|
    (the distance to the mask value) with kind="gradient_x_input".

    METHOD.md names gradient x input; on the quickstart backdoor plain gradient put the patch's token among
    the top 4 of 94% of poisoned rows against 35% (token-drop AUROC 0.93 vs 0.73), so it is the default.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        cos = (image_features(model, x) * text.detach()).sum()
        (grad,) = torch.autograd.grad(cos, x)
    if kind not in SALIENCIES:
        raise ValueError(f"unknown saliency {kind!r}: use one of {', '.join(SALIENCIES)}")
    per_pixel = grad.abs() * x.detach().abs() if kind == "gradient_x_input" else grad.abs()
    per_pixel = per_pixel.sum(dim=1, keepdim=True)
    covered = grid.side * grid.patch
    per_token = F.avg_pool2d(per_pixel[..., :covered, :covered], grid.patch) * grid.patch ** 2
    return per_token.flatten(1)


def token_order(saliency: torch.Tensor) -> torch.Tensor:
    """Token indices from most to least salient; ties go to the lower index so the order is deterministic."""
    return torch.sort(saliency, dim=1, descending=True, stable=True).indices


def token_mask(order: torch.Tensor, count: int, grid: TokenGrid, keep: bool = False) -> torch.Tensor:
    """(N, 1, H, W) bool mask of the first `count` tokens of each `order` (or of all the others when keep)."""
    n = order.shape[0]
    chosen = torch.zeros(n, grid.count, dtype=torch.bool, device=order.device)
    chosen.scatter_(1, order[:, :count], True)
    if keep:
        chosen = ~chosen
    mask = chosen.view(n, 1, grid.side, grid.side)
    return mask.repeat_interleave(grid.patch, dim=2).repeat_interleave(grid.patch, dim=3)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked pixels of normalised `x` become 0, the normalisation mean: the dataset's average colour."""
    full = torch.zeros(mask.shape[0], 1, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
    full[..., :mask.shape[2], :mask.shape[3]] = mask
    return x.masked_fill(full, 0.0)


def blur(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur (edges averaged over the pixels inside the image)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def downup(x: torch.Tensor) -> torch.Tensor:
    """2x down-sample (area) then bilinear up-sample back: removes what lives at the finest scale."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // 2), max(1, w // 2)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def remove_trigger(x: torch.Tensor, transform: str, order: torch.Tensor | None = None, count: int = 0,
                   grid: TokenGrid | None = None) -> torch.Tensor:
    """x̄: normalised `x` with the trigger-removing `transform` applied (token_mask needs order, count, grid)."""
    if transform == "token_mask":
        return apply_mask(x, token_mask(order, count, grid))
    if transform == "blur":
        return blur(x)
    if transform == "downup":
        return downup(x)
    raise ValueError(f"unknown transform {transform!r}: use one of {', '.join(TRANSFORMS)}")


def score_batch(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, preprocess_cfg: dict,
                grid: TokenGrid, method: str = "token_drop", token_portion: float = 4 / 64,
                transforms: tuple[str, ...] = ("token_mask",), negatives: torch.Tensor | None = None,
                logit_scale: float | None = None, saliency: str = "gradient") -> dict[str, torch.Tensor]:
    """Score columns of one batch: `cos`, and per method `drop_<transform>` (+ `token_order`) or `loss`.

    token_drop: drop of cos(f(x), g(t)) under each transform; `score` is the drop when there is one transform
    (several are combined later, over the whole dataset). cosine: score = -cos (weak alignment is not what a
    poison looks like, but it is the plain baseline). loss: image-to-text cross-entropy of the pair against a
    fixed bank of negative caption features; score = -loss (a fitted shortcut has a low loss).
    """
    x = normalize(pixels, preprocess_cfg)
    with torch.no_grad():
        text = text_features(model, tokens)
        img = image_features(model, x)
    cos = (img * text).sum(-1)
    out = {"cos": cos}
    if method == "cosine":
        out["score"] = -cos
    elif method == "loss":
        if negatives is None or logit_scale is None:
            raise ValueError("the loss score needs a negative bank of text features and the logit scale")
        logits = logit_scale * torch.cat([cos[:, None], img @ negatives.T], dim=1)
        # A negative identical to the row's own caption is no negative.
        same = (text @ negatives.T) > 1 - 1e-6
        logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
        loss = -torch.log_softmax(logits, dim=1)[:, 0]
        out.update(loss=loss, score=-loss)
    elif method == "token_drop":
        order = None
        if "token_mask" in transforms:
            order = token_order(token_saliency(model, x, text, grid, saliency))
            out["token_order"] = order
        count = tokens_to_take(token_portion, grid)
        with torch.no_grad():
            for name in transforms:
                cleaned = image_features(model, remove_trigger(x, name, order, count, grid))
                out[f"drop_{name}"] = cos - (cleaned * text).sum(-1)
        if len(transforms) == 1:
            out["score"] = out[f"drop_{transforms[0]}"]
    else:
        raise ValueError(f"unknown score method {method!r}: use one of {', '.join(METHODS)}")
    return out


def combine_drops(drops: dict[str, torch.Tensor], stats: dict[str, tuple[float, float]]) -> tuple[torch.Tensor, list[str]]:
    """Several transforms' drops as one score: the maximum of the drops standardised over the dataset
    (stats: transform -> (mean, std)), and for each row the transform that gave it."""
    names = sorted(drops)
    z = torch.stack([(drops[n] - stats[n][0]) / max(stats[n][1], 1e-12) for n in names], dim=1)
    best, which = z.max(dim=1)
    return best, [names[i] for i in which.tolist()]
