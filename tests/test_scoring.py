"""The pure-torch core of UBT: token saliency, trigger-removing transforms, scores, forget losses, trainable sets."""

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ubt_ray.config import ModelConfig
from ubt_ray.core.batches import normalize
from ubt_ray.core.neighbours import concept_first, concept_medoid, ring_disagreement
from ubt_ray.core.objectives import Batch
from ubt_ray.core.scoring import (CaptionFeatures, TokenGrid, apply_mask, blur, class_attention, downup, image_features,
                                  prepare_model, score_batch, similarity_and_saliency, text_features, token_grid,
                                  token_mask, tokens_to_take)
from ubt_ray.core.unlearning import FORGET_LOSSES, ForgetSet, UnlearnObjective, prepare_forget_inputs, set_trainable
from ubt_ray.models import load_clip
from ubt_ray.core.score_rows import combine_drops


@pytest.fixture(scope="module")
def clip():
    c = load_clip(ModelConfig(), seed=0)
    c.model.eval()
    return c


def batch(clip, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    tokens = clip.tokenizer([f"a photo of a {w}" for w in ["shirt", "bag", "boot", "coat", "dress", "sandal"][:n]])
    return pixels, tokens


def test_grid_and_token_counts(clip):
    grid = token_grid(clip.model, clip.image_size)
    assert (grid.patch, grid.side, grid.count) == (4, 8, 64)
    assert tokens_to_take(4 / 64, grid) == 4 and tokens_to_take(1e-6, grid) == 1 and tokens_to_take(1.0, grid) == 64


def test_token_mask_covers_exactly_the_chosen_tokens():
    grid = TokenGrid(patch=4, side=8)
    order = torch.arange(64).flip(0)[None]  # token 63 (bottom-right) first
    mask = token_mask(order, 2, grid)
    assert mask.shape == (1, 1, 32, 32) and int(mask.sum()) == 2 * 16
    assert mask[0, 0, 28:, 28:].all() and mask[0, 0, 28:, 24:28].all()
    assert int(token_mask(order, 2, grid, keep=True).sum()) == 62 * 16
    x = torch.randn(1, 3, 32, 32)
    masked = apply_mask(x, mask)
    assert torch.all(masked[..., 28:, 24:] == 0) and torch.equal(masked[..., :28, :], x[..., :28, :])


def test_blur_and_downup_remove_fine_patterns_and_keep_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert torch.allclose(blur(flat), flat) and torch.allclose(downup(flat), flat)
    checker = (torch.arange(32)[None, :] + torch.arange(32)[:, None]) % 2
    x = checker.float().expand(1, 3, 32, 32)
    assert downup(x).std() < 0.05 * x.std() and blur(x).std() < 0.2 * x.std()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("method,transforms", [("token_drop", ("token_mask",)), ("token_drop", ("blur", "downup")),
                                               ("cosine", ()), ("loss", ())])
@pytest.mark.slow
def test_scores_do_not_depend_on_the_batch(clip, method, transforms, bf16):
    """Also with the bf16 weights scoring uses on a CPU that has native bf16 (elsewhere bf16=True is fp32 again)."""
    model = prepare_model(copy.deepcopy(clip.model), bf16)
    pixels, tokens = batch(clip)
    grid = token_grid(model, clip.image_size)
    negatives = torch.nn.functional.normalize(torch.randn(16, 128), dim=-1)
    kw = dict(grid=grid, method=method, transforms=transforms, negatives=negatives, logit_scale=10.0)
    whole = score_batch(model, pixels, text_features(model, tokens), clip.preprocess_cfg, **kw)
    for i in (0, 3, 5):
        alone = score_batch(model, pixels[i:i + 1], text_features(model, tokens[i:i + 1]), clip.preprocess_cfg, **kw)
        for name, values in alone.items():
            assert torch.equal(values[0], whole[name][i]), name  # to the last bit: see in_fixed_chunks
    if method == "token_drop" and len(transforms) == 1:
        assert torch.equal(whole["score"], whole["drop_token_mask"]) and whole["token_order"].shape == (6, 64)
    if method == "cosine":
        assert torch.equal(whole["score"], -whole["cos"])


def test_caption_features_are_each_captions_own_and_the_cache_stays_bounded(clip):
    """Cached or not, a row's feature is text_features of its caption alone; past the capacity new captions are
    still encoded right, just not kept."""
    model = prepare_model(copy.deepcopy(clip.model), True)
    features = CaptionFeatures(model, clip.tokenizer, torch.device("cpu"), capacity=3)
    first = [f"a photo of a {w}" for w in ["bag", "shirt", "bag", "boot", "coat"]]
    later = [f"a photo of a {w}" for w in ["dress", "bag", "sandal", "coat", "dress"]]
    for captions in (first, later, first):
        got = features(captions)
        alone = torch.cat([text_features(model, clip.tokenizer([c])) for c in captions])
        assert got.shape == (len(captions), 128) and torch.equal(got, alone)
    assert list(features.known) == [f"a photo of a {w}" for w in ["bag", "shirt", "boot"]]


@pytest.mark.slow
def test_several_token_portions_average_the_drops_of_each(clip):
    """token_portion (1/64, 4/64) gives the mean of the drops at 1/64 and at 4/64, and each masks more than the
    one before (the drops differ), so the mean is not one of them."""
    pixels, tokens = batch(clip)
    text = text_features(clip.model, tokens)
    grid = token_grid(clip.model, 32)
    drop = {p: score_batch(clip.model, pixels, text, clip.preprocess_cfg, grid, token_portion=p)["drop_token_mask"]
            for p in (1 / 64, 4 / 64, (1 / 64, 4 / 64))}
    assert not torch.allclose(drop[1 / 64], drop[4 / 64])
    assert torch.allclose(drop[(1 / 64, 4 / 64)], (drop[1 / 64] + drop[4 / 64]) / 2, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["attention", "token", "gradient", "gradient_x_input"])
def test_every_saliency_finds_the_token_that_holds_the_content(clip, kind):
    """On an image whose only content is one bright token, every saliency ranks that token first, and the
    similarity it returns is the plain forward's."""
    pixels, tokens = batch(clip, n=1)
    pixels = torch.zeros_like(pixels)
    pixels[..., 28:, 28:] = 255  # all the image's content sits in the bottom-right token
    grid = token_grid(clip.model, 32)
    out = score_batch(clip.model, pixels, text_features(clip.model, tokens), clip.preprocess_cfg, grid, saliency=kind)
    assert int(out["token_order"][0, 0]) == 63
    x = normalize(pixels, clip.preprocess_cfg)
    text = text_features(clip.model, tokens)
    cos, saliency = similarity_and_saliency(clip.model, x, text, grid, kind)
    assert saliency.shape == (1, 64) and torch.allclose(cos, (image_features(clip.model, x) * text).sum(-1), atol=1e-5)


def test_class_attention_is_the_blocks_own_attention(clip):
    """The attention saliency reads the same weights nn.MultiheadAttention computes (head-averaged)."""
    block = clip.model.visual.transformer.resblocks[0]
    h = torch.randn(3, 65, 128)
    q = block.ln_1(h)
    _, weights = block.attn(q, q, q, need_weights=True, average_attn_weights=True)
    assert torch.allclose(class_attention(block, h, 64), weights[:, 0, 1:], atol=1e-6)


def test_combine_drops_standardises_then_takes_the_max():
    drops = {"blur": np.array([1.0, 0.0, 5.0], np.float32), "token_mask": np.array([0.0, 10.0, 0.0], np.float32)}
    stats = {"blur": (1.0, 2.0), "token_mask": (0.0, 10.0)}
    best, which = combine_drops(drops, stats)
    assert best.dtype == np.float32 and best.tolist() == [0.0, 1.0, 2.0] and which == ["blur", "token_mask", "blur"]


def test_the_score_tables_row_functions_import_no_torch():
    """Ray workers import the module of each function they run: score_rows must stay free of torch (~7 s)."""
    code = "import sys, ubt_ray.core.score_rows; print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def forget_setup(transforms: list[str], kind: str):
    """A fresh default CLIP, a forget set of the first 4 rows of `batch` flagged by `transforms`, θ₀'s forget
    inputs for `kind`, and a retain batch of the other 2 rows."""
    clip = load_clip(ModelConfig(), seed=0)
    reference = load_clip(ModelConfig(), seed=0).model.eval().requires_grad_(False)
    pixels, tokens = batch(clip)
    forget = ForgetSet(pixels[:4], tokens[:4], transforms, None)
    inputs = prepare_forget_inputs(reference, forget, clip.preprocess_cfg, token_grid(clip.model, 32), 4 / 64, kind)
    return clip, reference, forget, inputs, Batch(pixels[4:], tokens[4:], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", FORGET_LOSSES)
def test_forget_loss_falls_with_training(kind):
    clip, _, forget, inputs, retain = forget_setup(["token_mask", "blur", "downup", "token_mask"], kind)
    objective = UnlearnObjective(clip.preprocess_cfg, forget, inputs, kind, forget_weight=100.0, margin=-1.0,
                                 forget_batch_size=4, seed=0)
    model = clip.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    first = None
    for _ in range(8):
        loss, metrics = objective(model, retain)
        first = metrics["forget_loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.isfinite(metrics["loss"]) and metrics["forget_loss"] < first


@pytest.mark.parametrize("transform, same_as, weight", [("token_mask", "token_invariance", 2.0),
                                                        ("blur", "push_away", 5.0)])
def test_auto_forget_loss_is_invariance_on_token_mask_rows_and_push_away_on_whole_image_rows(transform, same_as,
                                                                                              weight):
    """forget: auto gives a row the token mask flagged token_invariance at forget_weight (2), and a row blur
    flagged push_away at whole_image_weight (5): the same loss as those kinds with that weight."""
    clip, reference, forget, _, retain = forget_setup([transform] * 4, "auto")
    grid = token_grid(clip.model, 32)
    losses = []
    for kind, forget_weight in (("auto", 2.0), (same_as, weight)):
        inputs = prepare_forget_inputs(reference, forget, clip.preprocess_cfg, grid, 4 / 64, kind)
        objective = UnlearnObjective(clip.preprocess_cfg, forget, inputs, kind, forget_weight=forget_weight,
                                     margin=-1.0, forget_batch_size=4, seed=0, whole_image_weight=5.0)
        losses.append(objective(clip.model.eval(), retain)[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_push_without_text_moves_the_image_tower_alone():
    """experimental.unlearn.push_text=false: the same loss, the same image-tower gradient, and the text tower
    gets only the retain loss's gradient (the caption's features are not pushed)."""
    clip, _, forget, inputs, retain = forget_setup(["blur"] * 4, "push_away")
    model = clip.model.eval()

    def grads(forget_weight: float, push_text: bool):
        objective = UnlearnObjective(clip.preprocess_cfg, forget, inputs, "push_away", forget_weight=forget_weight,
                                     margin=-1.0, forget_batch_size=4, seed=0, push_text=push_text)
        model.zero_grad()
        loss = objective(model, retain)[0]
        loss.backward()
        text = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                          if not n.startswith("visual.") and n != "logit_scale" and p.grad is not None])
        image = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("visual.")])
        return loss.item(), text.clone(), image.clone()

    pushed, image_only, retain_only = grads(5.0, True), grads(5.0, False), grads(0.0, False)
    assert pushed[0] == pytest.approx(image_only[0], rel=1e-6)
    assert torch.allclose(pushed[2], image_only[2], atol=1e-7)
    assert torch.allclose(image_only[1], retain_only[1], atol=1e-7)
    assert not torch.allclose(pushed[1], image_only[1], atol=1e-6)


def test_anchor_term_is_zero_at_the_reference_and_pulls_a_moved_model_back():
    """With unlearn.anchor_weight the loss adds λ_a (1 - cos) between the retain batch's features and θ₀'s: zero
    for a model equal to θ₀, positive once the model moved, and a step on it brings the features back."""
    clip, reference, forget, inputs, retain = forget_setup(["token_mask"] * 4, "token_invariance")

    def objective(weight):
        return UnlearnObjective(clip.preprocess_cfg, forget, inputs, "token_invariance", forget_weight=1.0,
                                margin=0.0, forget_batch_size=4, seed=0, reference=reference, anchor_weight=weight)
    model = clip.model.eval()
    plain, anchored = objective(0.0)(model, retain), objective(3.0)(model, retain)
    assert anchored[1]["anchor_loss"] == pytest.approx(0.0, abs=1e-6)
    assert anchored[0].item() == pytest.approx(plain[0].item(), rel=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    start = objective(3.0)(model, retain)[1]["anchor_loss"]
    assert start > 1e-3
    # The same few steps from the moved model, with and without the term: with it the features end nearer θ₀'s.
    ends = []
    for weight in (0.0, 3.0):
        trained = copy.deepcopy(model)
        opt = torch.optim.SGD(trained.parameters(), lr=0.2)
        step = objective(weight)
        for _ in range(3):
            loss, _ = step(trained, retain)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ends.append(objective(3.0)(trained, retain)[1]["anchor_loss"])
    assert ends[1] < ends[0] and ends[1] < start
    with pytest.raises(ValueError, match="reference"):
        UnlearnObjective(clip.preprocess_cfg, forget, inputs, "token_invariance", 1.0, 0.0, 4, 0, anchor_weight=1.0)


def test_token_invariance_starts_from_what_the_reference_sees_without_the_tokens(clip):
    pixels, tokens = batch(clip, n=2)
    forget = ForgetSet(pixels, tokens, ["token_mask", "token_mask"], None)
    grid = token_grid(clip.model, 32)
    targets = prepare_forget_inputs(clip.model, forget, clip.preprocess_cfg, grid, 1.0, "token_invariance")
    # With every token masked, x̄ is the all-mean image for both rows: the same target.
    assert torch.allclose(targets[0], targets[1], atol=1e-6)


def test_set_trainable_moves_only_the_named_part(clip):
    model = load_clip(ModelConfig(), seed=0).model
    total = sum(p.numel() for p in model.parameters())
    assert set_trainable(model, "all") == total
    visual = set_trainable(model, "visual")
    assert all(p.requires_grad == n.startswith("visual.") for n, p in model.named_parameters())
    early = set_trainable(model, "visual.early")
    assert 0 < early < visual
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert not model.visual.transformer.resblocks[-1].attn.in_proj_weight.requires_grad
    text = set_trainable(model, "text")
    assert text + visual == total - 1  # all but the logit scale
    with pytest.raises(ValueError, match="unknown trainable"):
        set_trainable(model, "heads")


def test_ring_disagreement_averages_over_the_ranked_neighbours_without_the_row_itself():
    """Points on a circle, neighbours by angle: row 0's neighbours ranked 0-1 are rows 1 and 7 (both captions
    agree), ranked 2-3 are rows 2 and 6 (one caption disagrees: cosine 0)."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    space = torch.stack([angles.cos(), angles.sin()], dim=1)
    text = F.one_hot(torch.tensor([0, 0, 1, 0, 0, 0, 0, 0]), 2).float()
    rows = torch.tensor([0])
    assert ring_disagreement(rows, space, text, 0, 2).item() == pytest.approx(0.0)
    assert ring_disagreement(rows, space, text, 2, 4).item() == pytest.approx(0.5)
    # Row 2, the odd caption out: every neighbour disagrees, whichever ring.
    assert ring_disagreement(torch.tensor([2]), space, text, 0, 4).item() == pytest.approx(1.0)


def test_concept_first_ranks_the_majority_concept_of_the_top_rows_first():
    text = F.one_hot(torch.tensor([0, 0, 1, 0, 2, 1]), 3).float()
    disagreement = torch.tensor([0.2, 0.9, 0.95, 0.8, 0.3, 0.1])
    top = disagreement.topk(3).indices  # rows 2, 1, 3: concepts 1, 0, 0
    target = text[top[concept_medoid(text[top])]]
    score, cos = concept_first(disagreement, text, target, 0.9)
    assert score.argsort(descending=True).tolist()[:3] == [1, 3, 0]  # concept 0's rows, by disagreement
    assert cos.tolist() == [1, 1, 0, 1, 0, 0]


def test_selection_cutoff_and_histogram_show_the_forget_sets_make_up():
    """The cut-off is the k-th largest score (what select can still take); the histogram is a PNG that draws it."""
    from ubt_ray.report import histogram_png, selection_cutoff
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8])
    assert selection_cutoff(scores, 3) == 0.7
    assert selection_cutoff(scores, 10) == 0.1 and selection_cutoff(scores[:0], 3) is None
    truth = np.array([True, False, False, True, False, False])
    assert histogram_png(scores, truth, "token_drop", 0.7)[:4] == b"\x89PNG"
