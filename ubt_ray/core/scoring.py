"""Per-sample suspicion scores (METHOD.md step 2) and the trigger-removing transforms they rest on (pure torch).

A trigger is a fragile, low-level feature: a transform that removes it (masking the few most salient image
tokens for a local patch, blurring or down-up-sampling for a global pattern) collapses a poisoned pair's
image-text similarity while a clean pair barely moves. `drop` scores measure that collapse. Every operation
here is per sample, and every model forward runs on a fixed number of rows (`in_fixed_chunks`), so a row's
score never depends on the other rows of its batch, not even in its last bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batches import normalize
from .models import scoring_dtype
from .names import SALIENCIES, TRANSFORMS
from .names import MODEL_METHODS as METHODS

ROWS_PER_FORWARD = 256  # score.batch_size's default


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


def in_fixed_chunks(fn, size: int, *tensors: torch.Tensor):
    """`fn(*chunk)` over `tensors` (one row per index of their first dimension) in chunks of exactly `size` rows,
    the last one padded with zero rows: the real rows' outputs (a tensor, or a dict of tensors), concatenated.

    A matrix product's rounding can depend on how many rows it multiplies (oneDNN picks its blocking by the
    shape): with bf16 weights on this project's CPU, 12 of 87 token-drop scores of rows scored alone differed
    from the same rows' scores in a batch of 200, by up to 2e-4; with every forward on the same number of rows
    none did, alone, in that batch, or shuffled. Padding costs only the last chunk of a batch."""
    count = tensors[0].shape[0]
    outs = []
    for lo in range(0, max(count, 1), size):
        part = [t[lo:lo + size] for t in tensors]
        real = part[0].shape[0]
        if real < size:
            part = [torch.cat([p, p.new_zeros((size - real, *p.shape[1:]))]) for p in part]
        out = fn(*part)
        outs.append({k: v[:real] for k, v in out.items()} if isinstance(out, dict) else out[:real])
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


def text_features(model: torch.nn.Module, tokens: torch.Tensor, rows_per_forward: int = ROWS_PER_FORWARD) -> torch.Tensor:
    """L2-normalised text features, each distinct caption encoded once (in forwards of `rows_per_forward`
    captions, so that a caption's feature does not depend on the others; see in_fixed_chunks)."""
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    encoded = in_fixed_chunks(lambda t: model.encode_text(t).float(), rows_per_forward, unique)
    return F.normalize(encoded, dim=-1)[inverse]


class CaptionFeatures:
    """text_features of captions for a frozen model, each distinct caption tokenised and encoded once and kept
    for later batches, up to `capacity` captions (then new ones are encoded per batch and not kept). Templated
    captions repeat (the quickstart's 60,000 rows have 80 distinct ones), and tokenising every row cost 28-40 ms
    of a ~470 ms token-drop batch of 256 rows on 2 cores; web captions rarely repeat, and the cache just stops
    growing. A feature depends on its caption alone, as in text_features."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, capacity: int = 1 << 16):
        self.model, self.tokenizer, self.device, self.capacity = model, tokenizer, device, capacity
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.known]
        fresh: dict[str, torch.Tensor] = {}
        if new:
            with torch.no_grad():
                fresh = dict(zip(new, text_features(self.model, self.tokenizer(new).to(self.device))))
            for c in new[:max(0, self.capacity - len(self.known))]:
                self.known[c] = fresh[c]
        return torch.stack([self.known[c] if c in self.known else fresh[c] for c in captions])


def image_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features of normalised inputs `x`, in fp32 (under bf16 autocast the cosines would
    otherwise be rounded to 8 bits of mantissa and tie)."""
    return F.normalize(model.encode_image(x).float(), dim=-1)


def resolve_saliency(model: torch.nn.Module, kind: str) -> str:
    """`auto` is `attention` for a ViT with a class token and standard attention blocks, else `gradient`."""
    if kind not in SALIENCIES:
        raise ValueError(f"unknown saliency {kind!r}: use one of {', '.join(SALIENCIES)}")
    if kind == "auto":
        return "attention" if _attention_blocks(model) else "gradient"
    if kind == "attention" and not _attention_blocks(model):
        raise ValueError("saliency 'attention' needs a ViT image tower with a class token and "
                         "nn.MultiheadAttention blocks; use 'gradient' for this model")
    if kind == "token" and not isinstance(getattr(model.visual, "transformer", None), torch.nn.Module):
        raise ValueError("saliency 'token' needs a transformer image tower (ViT); use 'gradient' for this model")
    return kind


def _attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    visual = model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or getattr(visual, "class_embedding", None) is None:
        return []
    ok = all(isinstance(getattr(b, "attn", None), torch.nn.MultiheadAttention) and hasattr(b, "ln_1")
             for b in blocks)
    return list(blocks) if ok else []


def class_attention(block: torch.nn.Module, h: torch.Tensor, count: int) -> torch.Tensor:
    """(N, count) head-averaged attention of the class token (position 0) to the last `count` tokens, for a
    batch-first input `h` of an open_clip residual attention block."""
    attn = block.attn
    q, k, _ = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n, length, width = q.shape
    heads = attn.num_heads
    q = q[:, :1].reshape(n, 1, heads, width // heads).transpose(1, 2)
    k = k.reshape(n, length, heads, width // heads).transpose(1, 2)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * (width // heads) ** -0.5, dim=-1)  # (N, heads, 1, L)
    return weights[:, :, 0, -count:].float().mean(dim=1)


def _batch_first(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A transformer input as (N, L, width), whatever layout the image tower's transformer uses."""
    return h if getattr(model.visual.transformer, "batch_first", True) else h.transpose(0, 1)


def similarity_and_saliency(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, grid: TokenGrid,
                            kind: str = "auto", layers: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(f(x), g(t)) per row and the (N, T) saliency of each image token (see features_and_saliency)."""
    features, saliency = features_and_saliency(model, x, text, grid, kind, layers)
    return (features * text.detach()).sum(-1), saliency


def features_and_saliency(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, grid: TokenGrid,
                          kind: str = "auto", layers: tuple[int, ...] = (0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalised image features f(x) (N, D) and the (N, T) saliency of each image token for cos(f(x), g(t)).

    attention (the default for a ViT): the class token's attention to each patch token, averaged over heads
    and summed over the blocks `layers` (0: the first), read from the same forward that gives cos — no
    backward. token: the norm of d cos / d(token) at the transformer's input. gradient: |d cos / dx| summed
    over each token's pixels; gradient_x_input: the same times |x| (the distance to the mask value),
    METHOD.md's reading. On the quickstart backdoor (300 poisons + 2,000 clean rows), token-drop AUROC with
    θ₀ was 0.972 (attention, block 0), 0.940 (token); with the overfit model 0.976 / 0.958 / 0.939 (gradient);
    on θ₀ gradient x input found the patch's token among the top 4 of 35% of poisons against 94% for plain
    gradient (AUROC 0.73 vs 0.93). Attention from deeper blocks was weaker (blocks 1, 2, 3: 0.73, 0.58, 0.74).
    """
    kind = resolve_saliency(model, kind)
    text = text.detach()
    if kind == "attention":
        blocks = _attention_blocks(model)
        inputs: dict[int, torch.Tensor] = {}
        handles = [blocks[j].register_forward_pre_hook(lambda _m, args, j=j: inputs.__setitem__(j, args[0]))
                   for j in layers]
        try:
            with torch.no_grad():
                features = image_features(model, x)
                saliency = sum(class_attention(blocks[j], _batch_first(model, inputs[j]), grid.count)
                               for j in layers)
        finally:
            for h in handles:
                h.remove()
        return features, saliency
    leaves: list[torch.Tensor] = []
    handle = None
    if kind == "token":
        def take_input(module, args):
            leaves.append(args[0].detach().requires_grad_(True))
            return (leaves[-1], *args[1:])
        handle = model.visual.transformer.register_forward_pre_hook(take_input)
    else:
        x = x.detach().requires_grad_(True)
        leaves.append(x)
    try:
        with torch.enable_grad():
            features = image_features(model, x)
            (grad,) = torch.autograd.grad((features * text).sum(), leaves[0])
    finally:
        if handle is not None:
            handle.remove()
    if kind == "token":
        # (N, prefix + T, width): the patch tokens are the last T, after the class token.
        saliency = _batch_first(model, grad)[:, -grid.count:].float().norm(dim=-1)
    else:
        per_pixel = grad.abs() * x.detach().abs() if kind == "gradient_x_input" else grad.abs()
        per_pixel = per_pixel.sum(dim=1, keepdim=True)
        covered = grid.side * grid.patch
        saliency = (F.avg_pool2d(per_pixel[..., :covered, :covered], grid.patch) * grid.patch ** 2).flatten(1)
    return features.detach(), saliency


def token_saliency(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, grid: TokenGrid,
                   kind: str = "auto") -> torch.Tensor:
    """(N, T) saliency of each image token (see similarity_and_saliency)."""
    return similarity_and_saliency(model, x, text, grid, kind)[1]


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


def full_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`token_mask`'s (N, 1, h, w) mask padded to x's (H, W): a grid that does not tile the image leaves its last
    pixels unmasked."""
    full = torch.zeros(mask.shape[0], 1, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
    full[..., :mask.shape[2], :mask.shape[3]] = mask
    return full


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked pixels of normalised `x` become 0, the normalisation mean: the dataset's average colour."""
    return x.masked_fill(full_mask(mask, x), 0.0)


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


def similarity_drop(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor, cos: torch.Tensor, transform: str,
                    order: torch.Tensor | None = None, count: int = 0, grid: TokenGrid | None = None) -> torch.Tensor:
    """cos(f(x), g(t)) - cos(f(x̄), g(t)) per row, x̄ = remove_trigger(x, transform, ...); `cos` is the first term."""
    with torch.no_grad():
        return cos - (image_features(model, remove_trigger(x, transform, order, count, grid)) * text).sum(-1)


def prepare_model(model: torch.nn.Module, bf16: bool = True) -> torch.nn.Module:
    """`model` in eval mode, frozen, and in place in the scoring dtype of its device (bf16 weights on a CPU that
    runs bf16 natively when `bf16`: 1.27x faster than fp32 weights under autocast on the quickstart's CPU)."""
    device = next(model.parameters()).device
    return model.eval().requires_grad_(False).to(scoring_dtype(device, bf16))


def score_batch(model: torch.nn.Module, pixels: torch.Tensor, text: torch.Tensor, preprocess_cfg: dict,
                grid: TokenGrid, method: str = "token_drop", token_portion: float | Sequence[float] = 2 / 64,
                transforms: tuple[str, ...] = ("token_mask",), negatives: torch.Tensor | None = None,
                logit_scale: float | None = None, saliency: str = "auto", attention_blocks: tuple[int, ...] = (0,),
                rows_per_forward: int = ROWS_PER_FORWARD, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Score columns of one batch: `cos`, and per method `drop_<transform>` (+ `token_order`) or `loss`; with
    `embeddings`, also `image_embedding` (N, D), the normalised image features f(x) of the same forward.

    token_drop: drop of cos(f(x), g(t)) under each transform (token_mask with several portions ρ: the mean of
    the drops with the top ⌈ρT⌉ tokens masked, for each ρ); `score` is the drop when there is one transform
    (several are combined later, over the whole dataset). cosine: score = -cos (weak alignment is not what a
    poison looks like, but it is the plain baseline). loss: image-to-text cross-entropy of the pair against a
    fixed bank of negative caption features; score = -loss (a fitted shortcut has a low loss).
    `text` holds the rows' caption features (text_features or CaptionFeatures of the same model).
    The forwards run in the dtype of `model`'s weights (see prepare_model), each on `rows_per_forward` rows (a
    batch of another size is cut or padded: in_fixed_chunks); the columns are fp32.
    """
    out = in_fixed_chunks(lambda p, t: _score_batch(model, p, t, preprocess_cfg, grid, method, token_portion,
                                                    transforms, negatives, logit_scale, saliency,
                                                    tuple(attention_blocks), embeddings),
                          rows_per_forward, pixels, text)
    return {name: v if v.dtype == torch.int64 else v.float() for name, v in out.items()}


def padded_rows(rows: int, rows_per_forward: int) -> int:
    """The rows `in_fixed_chunks` forwards for `rows` rows: whole chunks of `rows_per_forward`."""
    return -(-rows // rows_per_forward) * rows_per_forward


def score_passes(rows: int, method: str, token_portion: float | Sequence[float], transforms: Sequence[str],
                 saliency: str, grid: TokenGrid, rows_per_forward: int = ROWS_PER_FORWARD) -> tuple[int, int]:
    """(forward, backward) image-tower sample-passes of `score_batch` on `rows` rows, `saliency` resolved
    (resolve_saliency): the rows are forwarded in chunks of `rows_per_forward`, the last one padded, and each
    chunk goes once through the tower (with the saliency for token_mask, back-propagated unless it is attention),
    then once more per distinct token count of the portions under token_mask and once per other transform."""
    forwarded = padded_rows(rows, rows_per_forward)
    per_row, backward = 1, 0
    if method == "token_drop":
        portions = [token_portion] if isinstance(token_portion, (int, float)) else list(token_portion)
        per_row += sum(len({tokens_to_take(p, grid) for p in portions}) if t == "token_mask" else 1
                       for t in transforms)
        if "token_mask" in transforms and saliency != "attention":
            backward = forwarded
    return forwarded * per_row, backward


def _score_batch(model, pixels, text, preprocess_cfg, grid, method, token_portion, transforms, negatives,
                 logit_scale, saliency, attention_blocks, embeddings) -> dict[str, torch.Tensor]:
    x = normalize(pixels, preprocess_cfg).to(next(model.parameters()).dtype)
    order = None
    if method == "token_drop" and "token_mask" in transforms:
        img, sal = features_and_saliency(model, x, text, grid, saliency, attention_blocks)
        order = token_order(sal)
    else:
        with torch.no_grad():
            img = image_features(model, x)
    cos = (img * text).sum(-1)
    out = {"cos": cos}
    if embeddings:
        out["image_embedding"] = img
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
        if order is not None:
            out["token_order"] = order
        portions = [token_portion] if isinstance(token_portion, (int, float)) else list(token_portion)
        counts = sorted({tokens_to_take(p, grid) for p in portions})
        for name in transforms:
            drops = [similarity_drop(model, x, text, cos, name, order, count, grid)
                     for count in (counts if name == "token_mask" else [0])]
            out[f"drop_{name}"] = torch.stack(drops).mean(0)
        if len(transforms) == 1:
            out["score"] = out[f"drop_{transforms[0]}"]
    else:
        raise ValueError(f"unknown score method {method!r}: use one of {', '.join(METHODS)}")
    return out


def tail_strength(top: torch.Tensor, center: float, scale: float) -> float:
    """How far the `top` drops (a transform's k largest) stand above the dataset's centre drop, in units of
    `scale` (a standard deviation, robust or not): large where the transform removes a trigger that a group of
    rows shares."""
    return float((top.double().mean() - center) / max(scale, 1e-12))


MAD_TO_STD = 1.4826  # a normal distribution's standard deviation over its median absolute deviation


def robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """The median of `values` and their robust standard deviation (1.4826 x the median absolute deviation), which
    the outlying tail of a few hundred poisons cannot move, unlike the mean and std: `pick` compares transforms'
    tails in these units, so that a poisoned tail does not inflate its own yardstick."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    return median, MAD_TO_STD * float(np.median(np.abs(values - median)))
