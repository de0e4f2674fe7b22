"""CleanCLIP (Bansal et al., ICCV 2023) as a training objective (pure torch): the multimodal CLIP loss plus
in-modal self-supervised losses — each image against an augmented view of itself, each caption against an
augmented view of itself — so that no single feature (a trigger) can carry an image-text match alone.

Loss = clip_weight · CLIP(I, T) + inmodal_weight · (InfoNCE(I, Ĩ) + InfoNCE(T, T̃)) / 2, with the paper's
weights 1 and 1. Images are augmented SimCLR-style (random resized crop, horizontal flip, brightness and
contrast); captions EDA-style without synonyms (random word deletion or random word swaps). Template captions
repeat inside a batch, so the text in-modal loss contrasts the distinct captions only (a duplicate would be a
false negative). Augmentations are seeded by (seed, step, rank): a rerun sees the same views.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from torchvision.transforms.v2 import functional as TF

from .batches import normalize
from .objectives import Batch, clip_loss


def augment_images(pixels: torch.Tensor, generator: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """One SimCLR-style view of each uint8 image (N, C, H, W): a crop of 50-100% of the area at an aspect
    ratio in [3/4, 4/3] resized back, a horizontal flip half the time, brightness and contrast x [0.6, 1.4]."""
    n, _, h, w = pixels.shape
    out = torch.empty_like(pixels)
    u = torch.rand(n, 6, generator=generator)
    for i in range(n):
        area = h * w * (min_scale + (1 - min_scale) * float(u[i, 0]))
        ratio = float(torch.exp(torch.log(torch.tensor(3 / 4)) + u[i, 1] * torch.log(torch.tensor(16 / 9))))
        ch = max(1, min(h, round((area / ratio) ** 0.5)))
        cw = max(1, min(w, round((area * ratio) ** 0.5)))
        top, left = int(u[i, 2] * (h - ch + 1)), int(u[i, 3] * (w - cw + 1))
        img = TF.resized_crop(pixels[i], top, left, ch, cw, [h, w], antialias=True)
        if u[i, 4] < 0.5:
            img = TF.horizontal_flip(img)
        factor = 0.6 + 0.8 * float(u[i, 5])
        img = TF.adjust_contrast(TF.adjust_brightness(img, factor), 2.0 - factor)
        out[i] = img
    return out


def augment_caption(caption: str, rng: random.Random, p_delete: float = 0.1, swap_share: float = 0.1) -> str:
    """One EDA-style view of a caption without synonyms: either each word dropped with p_delete (one word
    always kept) or max(1, swap_share x words) random swaps of two words."""
    words = caption.split()
    if len(words) < 2:
        return caption
    if rng.random() < 0.5:
        kept = [w for w in words if rng.random() >= p_delete]
        return " ".join(kept or [rng.choice(words)])
    for _ in range(max(1, int(swap_share * len(words)))):
        i, j = rng.randrange(len(words)), rng.randrange(len(words))
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


class CleanClipObjective:
    """One CleanCLIP step on a batch of clean pairs; needs the batch's captions and the model's tokenizer."""

    def __init__(self, preprocess_cfg: dict, tokenizer, clip_weight: float = 1.0, inmodal_weight: float = 1.0,
                 seed: int = 0):
        if tokenizer is None:
            raise ValueError("CleanCLIP augments captions, so it needs the model's tokenizer")
        self.preprocess_cfg, self.tokenizer = preprocess_cfg, tokenizer
        self.clip_weight, self.inmodal_weight, self.seed = clip_weight, inmodal_weight, seed
        self.step = 0

    def sample_passes(self, rows_per_worker: int, world: int) -> tuple[int, int]:
        """(forward, backward) image-tower sample-passes of one step over all workers: each row and its augmented
        view go through the model, and the loss back through both."""
        rows = 2 * rows_per_worker * world
        return rows, rows

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.captions is None:
            raise ValueError("CleanCLIP needs the batch's captions (Batch.captions)")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        key = (self.seed * 1_000_003 + self.step) * 4099 + rank
        self.step += 1
        generator = torch.Generator().manual_seed(key)
        rng = random.Random(key)
        views = augment_images(batch.pixels.cpu(), generator).to(batch.pixels.device)
        unique = list(dict.fromkeys(batch.captions))
        index = {c: i for i, c in enumerate(unique)}
        inverse = torch.tensor([index[c] for c in batch.captions], device=batch.tokens.device)
        texts = self.tokenizer(unique + [augment_caption(c, rng) for c in unique]).to(batch.tokens.device)
        x = normalize(torch.cat([batch.pixels, views]), self.preprocess_cfg)
        image_f, text_f, logit_scale = model(x, texts)[:3]
        n, u = len(batch.pixels), len(unique)
        multimodal = clip_loss(image_f[:n], text_f[:u][inverse], logit_scale)
        image_ss = clip_loss(image_f[:n], image_f[n:], logit_scale)  # negatives from every worker
        # Distinct captions differ in number across workers, so the text loss stays local to each worker.
        text_ss = clip_loss(text_f[:u], text_f[u:], logit_scale, local=True)
        inmodal = (image_ss + text_ss) / 2
        loss = self.clip_weight * multimodal + self.inmodal_weight * inmodal
        return loss, {"loss": float(loss.detach()), "clip_loss": float(multimodal.detach()),
                      "inmodal_loss": float(inmodal.detach()), "logit_scale": float(logit_scale.detach())}

