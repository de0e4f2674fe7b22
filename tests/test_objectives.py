"""Training objectives: the CLIP loss is the symmetric InfoNCE, and caption de-duplication changes nothing."""

import math

import pytest
import torch
import torch.nn.functional as F

from ubt_ray.config import ModelConfig
from ubt_ray.core.batches import normalize
from ubt_ray.core.objectives import Batch, ClipObjective, clip_loss
from ubt_ray.models import load_clip


def test_clip_loss_matches_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    logits = 10.0 * img @ txt.T
    want = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(clip_loss(img, txt, torch.tensor(10.0)), want)
    # Perfectly aligned, well-separated pairs give a loss near zero.
    eye = torch.eye(4)
    assert clip_loss(eye, eye, torch.tensor(100.0)) < 1e-6


@pytest.mark.slow
def test_deduplicated_captions_give_same_loss_and_gradients():
    clip = load_clip(ModelConfig(), seed=0)
    tokens = clip.tokenizer(["a photo of a coat.", "a bag", "a photo of a coat.", "a bag", "a dress"])
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    loss, metrics = ClipObjective(clip.preprocess_cfg)(clip.model, Batch(pixels, tokens, []))
    loss.backward()
    fast = {n: p.grad.clone() for n, p in clip.model.named_parameters() if p.grad is not None}
    clip.model.zero_grad()
    img, txt, scale = clip.model(normalize(pixels, clip.preprocess_cfg), tokens)[:3]
    slow_loss = clip_loss(img, txt, scale)
    slow_loss.backward()
    assert math.isclose(float(loss), float(slow_loss), rel_tol=1e-5)
    for n, p in clip.model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(fast[n], p.grad, atol=1e-6), n
    assert metrics["loss"] == float(loss)
