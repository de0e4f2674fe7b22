"""CleanCLIP's objective: seeded image and caption views, and a loss that is the CLIP loss plus the in-modal terms."""

import math
import random

import pytest
import torch

from ubt_ray.config import ModelConfig
from ubt_ray.core.cleanclip import CleanClipObjective, augment_caption, augment_images
from ubt_ray.core.objectives import Batch, ClipObjective, build_objective
from ubt_ray.models import load_clip

CAPTIONS = ["a photo of a coat.", "a bag", "a photo of a coat.", "a small dark dress on a plain background"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(ModelConfig(), seed=0)


def pixels(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_image_views_are_seeded_and_differ_from_the_image():
    x = pixels()
    a = augment_images(x, torch.Generator().manual_seed(1))
    b = augment_images(x, torch.Generator().manual_seed(1))
    c = augment_images(x, torch.Generator().manual_seed(2))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_caption_views_delete_or_swap_words_only():
    caption = CAPTIONS[3]
    for seed in range(50):
        view = augment_caption(caption, random.Random(seed))
        words = view.split()
        assert 1 <= len(words) <= len(caption.split())
        assert set(words) <= set(caption.split())
        assert view == augment_caption(caption, random.Random(seed))
    assert augment_caption("bag", random.Random(0)) == "bag"
    assert len({augment_caption(caption, random.Random(s)) for s in range(50)}) > 5


@pytest.mark.slow
def test_without_in_modal_terms_cleanclip_is_the_clip_loss(clip):
    tokens = clip.tokenizer(CAPTIONS)
    batch = Batch(pixels(), tokens, [], list(CAPTIONS))
    clip_only = CleanClipObjective(clip.preprocess_cfg, clip.tokenizer, inmodal_weight=0.0)
    loss, metrics = clip_only(clip.model, batch)
    want, _ = ClipObjective(clip.preprocess_cfg)(clip.model, batch)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)

    full = build_objective("cleanclip", preprocess_cfg=clip.preprocess_cfg, tokenizer=clip.tokenizer)
    loss, metrics = full(clip.model, batch)
    assert math.isclose(metrics["loss"], metrics["clip_loss"] + metrics["inmodal_loss"], rel_tol=1e-5)
    assert metrics["inmodal_loss"] > 0
    clip.model.zero_grad()
    loss.backward()
    for tower in ("visual.", "transformer."):
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in clip.model.named_parameters() if n.startswith(tower)), tower


def test_cleanclip_needs_captions_and_a_tokenizer(clip):
    with pytest.raises(ValueError, match="tokenizer"):
        CleanClipObjective(clip.preprocess_cfg, None)
    with pytest.raises(ValueError, match="captions"):
        CleanClipObjective(clip.preprocess_cfg, clip.tokenizer)(clip.model, Batch(pixels(), clip.tokenizer(CAPTIONS), []))
