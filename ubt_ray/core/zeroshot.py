"""Zero-shot classification with a CLIP model and the metrics of the method: CA, ASR, detection AUROC and P/R@k.

Plain torch and numpy, no Ray: the evaluate phase and the detection phases call these on whatever they hold.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batches import normalize, tokenize

# Prompts encoded per forward pass when building a classifier (classes x templates can be large, e.g. ImageNet).
PROMPTS_PER_BATCH = 1024
_AMP_DTYPES = {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


@contextmanager
def _inference(model: torch.nn.Module, device: torch.device, precision: str) -> Iterator[None]:
    """Eval mode (restored afterwards, so a caller's training model is left as it was), no autograd, optional AMP."""
    was_training = model.training
    model.eval()
    amp = _AMP_DTYPES.get(precision) if device.type == "cuda" else None
    try:
        with torch.inference_mode(), (torch.autocast("cuda", dtype=amp) if amp else nullcontext()):
            yield
    finally:
        model.train(was_training)


def class_embeddings(model: torch.nn.Module, tokenizer: Callable, class_names: Sequence[str],
                     templates: Sequence[str], device: str | torch.device = "cpu",
                     precision: str = "fp32") -> torch.Tensor:
    """Template-ensemble classifier (C, D): per class, the re-normalised mean of its prompts' normalised text embeddings."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' for the class name: every template must contain '{{}}'.")
    device = torch.device(device)
    prompts = [t.format(name) for name in class_names for t in templates]
    chunks = []
    with _inference(model, device, precision):
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            tokens = tokenize(tokenizer, prompts[start:start + PROMPTS_PER_BATCH]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def image_embeddings(model: torch.nn.Module, pixels: torch.Tensor, preprocess_cfg: dict, batch_size: int,
                     device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """L2-normalised image embeddings (N, D), float32 on the CPU, of uint8 pixels (N, 3, H, W)."""
    device = torch.device(device)
    out = []
    with _inference(model, device, precision):
        for start in range(0, len(pixels), batch_size):
            x = normalize(pixels[start:start + batch_size].to(device), preprocess_cfg)
            out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    if not out:
        raise ValueError("image_embeddings got no images: pass at least one.")
    return torch.cat(out)


def zero_shot_predict(model: torch.nn.Module, pixels: torch.Tensor, classifier: torch.Tensor, preprocess_cfg: dict,
                      batch_size: int, device: str | torch.device = "cpu", precision: str = "fp32") -> torch.Tensor:
    """Predicted class (N,) of each uint8 image: the class embedding of highest cosine similarity."""
    emb = image_embeddings(model, pixels, preprocess_cfg, batch_size, device, precision)
    return (emb @ classifier.float().cpu().T).argmax(dim=1)


def _as_array(values, name: str) -> np.ndarray:
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}.")
    return a


def clean_accuracy(preds, labels) -> float:
    """Top-1 accuracy: share of predictions equal to the labels."""
    p, y = _as_array(preds, "preds"), _as_array(labels, "labels")
    if len(p) != len(y) or len(p) == 0:
        raise ValueError(f"clean_accuracy needs as many predictions as labels, at least one; got {len(p)} and {len(y)}.")
    return float(np.mean(p == y))


def class_accuracies(preds, labels, num_classes: int) -> list[float | None]:
    """Per class c < num_classes, the share of rows labelled c predicted c (None where no row is labelled c):
    where a defense's cost in CA falls (a backdoor's target class and the classes like it, say)."""
    p, y = _as_array(preds, "preds"), _as_array(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"class_accuracies needs as many predictions as labels; got {len(p)} and {len(y)}.")
    return [float(np.mean(p[y == c] == c)) if np.any(y == c) else None for c in range(num_classes)]


def attack_success_rate(preds_on_triggered, true_labels, target: int) -> tuple[float, int]:
    """(ASR, images counted): share of triggered images of true class != target that are predicted as the target."""
    p, y = _as_array(preds_on_triggered, "preds_on_triggered"), _as_array(true_labels, "true_labels")
    if len(p) != len(y):
        raise ValueError(f"attack_success_rate got {len(p)} predictions for {len(y)} labels.")
    # Images of the target class say nothing about the backdoor (METHOD.md 5; CleanCLIP issue #14).
    counted = y != target
    n = int(counted.sum())
    if n == 0:
        raise ValueError(f"attack_success_rate has no image outside the target class {target} to count.")
    return float(np.mean(p[counted] == target)), n


def _detection_inputs(scores, is_poison) -> tuple[np.ndarray, np.ndarray]:
    s = _as_array(scores, "scores").astype(np.float64)
    t = _as_array(is_poison, "is_poison").astype(bool)
    if len(s) != len(t):
        raise ValueError(f"got {len(s)} scores for {len(t)} is_poison flags.")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: fix the scoring before computing detection metrics.")
    return s, t


def auroc(scores, is_poison) -> float:
    """Area under the ROC curve of `scores` (higher = more suspicious) against `is_poison`; ties count one half."""
    s, t = _detection_inputs(scores, is_poison)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both poisoned and clean rows, got {n_pos} and {n_neg}.")
    # Mann-Whitney U with average ranks of tied scores.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][t].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall_at_k(scores, is_poison, ks: Sequence[int]) -> dict[str, float]:
    """{'precision@k', 'recall@k'} of the k highest scores for each k; ties at the cut-off count pro rata."""
    s, t = _detection_inputs(scores, is_poison)
    n_pos = int(t.sum())
    if n_pos == 0:
        raise ValueError("precision_recall_at_k needs at least one poisoned row for recall.")
    order = np.argsort(-s, kind="stable")
    s_sorted, t_sorted = s[order], t[order]
    out = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        kk = min(int(k), len(s))
        cut = s_sorted[kk - 1]
        # Expected hits under random tie-breaking, so the result does not depend on row order.
        above = s_sorted > cut
        tied = s_sorted == cut
        hits = t_sorted[above].sum() + (kk - above.sum()) * t_sorted[tied].sum() / tied.sum()
        out[f"precision@{k}"] = float(hits / kk)
        out[f"recall@{k}"] = float(hits / n_pos)
    return out
