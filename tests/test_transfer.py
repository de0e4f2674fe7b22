"""The trigger-transfer test (core/transfer.py): what it pastes, what it measures, how it re-orders a pool."""

import numpy as np
import torch
import torch.nn.functional as F

from ubt_ray.core.scoring import TokenGrid, blur
from ubt_ray.core.transfer import fuse_ranks, transfer_lift, transplants

GRID = TokenGrid(patch=4, side=4)  # 16 x 16 images


class CornerDetector(torch.nn.Module):
    """An image tower with a backdoor: the brightness of the top-left 4 x 4 token pulls the feature to the
    target direction (axis 0); the rest of the image's mean brightness gives axis 1."""

    def encode_image(self, x):
        corner = x[:, :, :4, :4].mean(dim=(1, 2, 3))
        rest = x.mean(dim=(1, 2, 3))
        return torch.stack([corner, rest + 0.5, torch.full_like(rest, 0.1)], dim=1)


def images(n, seed):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.2


def test_transplants_paste_the_ordered_tokens_or_add_what_the_transform_removes():
    x, y = images(2, 0), images(1, 1)
    order = torch.tensor([[0, 5] + [i for i in range(16) if i not in (0, 5)]] * 2)
    pasted = transplants(x, y, "token_mask", order, count=2, grid=GRID)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:4, :4] = inside[4:8, 4:8] = True  # tokens 0 and 5
    assert torch.equal(pasted[:, :, inside], x[:, :, inside])
    assert torch.equal(pasted[:, :, ~inside], y.expand(2, -1, -1, -1)[:, :, ~inside])
    added = transplants(x, y, "blur")
    assert torch.allclose(added, y + x - blur(x))


def test_a_trigger_lifts_other_images_and_an_objects_own_token_does_not():
    model = CornerDetector()
    x = images(4, 2)
    x[0, :, :4, :4] += 2.0  # rows 0 and 1 carry the trigger (a bright top-left token) and say its caption
    x[1, :, :4, :4] += 2.0
    x[2, :, 8:12, 8:12] += 2.0  # row 2: as bright a token, elsewhere (an object's detail)
    target = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    text = target.expand(4, -1)
    order = torch.stack([torch.arange(16)] * 4)
    order[2] = torch.tensor([10] + [i for i in range(16) if i != 10])  # row 2's most salient token is its detail
    refs = images(5, 3)
    lift = transfer_lift(model, x, text, refs, ["token_mask"] * 4, order, count=1, grid=GRID)
    assert lift[0] > 0.3 and lift[1] > 0.3
    assert abs(lift[2]) < 0.05 and abs(lift[3]) < 0.05
    # A row's lift does not depend on the rows tested with it, nor on the forward size.
    alone = transfer_lift(model, x[2:3], text[2:3], refs, ["token_mask"], order[2:3], count=1, grid=GRID,
                          rows_per_forward=3)
    assert torch.allclose(alone, lift[2:3])
    # A row flagged by a density score has nothing to transfer; no references, no lift.
    mixed = transfer_lift(model, x, text, refs, ["token_mask", "density_slof", "blur", "token_mask"], order,
                          count=1, grid=GRID)
    assert torch.isnan(mixed[1]) and not torch.isnan(mixed[[0, 2, 3]]).any()
    assert mixed[0] == lift[0]
    assert torch.isnan(transfer_lift(model, x, text, refs[:0], ["blur"] * 4)).all()


def test_fuse_ranks_reorders_the_pool_within_its_own_scores():
    score = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    lift = np.array([0.0, 0.1, 0.9, 0.8, np.nan])
    fused = fuse_ranks(score, lift)
    assert sorted(fused) == sorted(score)  # the same values: the pool keeps its place above every other row
    # Ranks by lift among the rows with one (2, 3, 1, 0), spread over the pool's 0..4: 0, 1, 3, 4; rank sums:
    # row0 0+4, row1 1+3, row2 2+0, row3 3+1, row4 (no lift: its score rank twice) 4+4; ties to the larger lift.
    assert list(np.argsort(-fused, kind="stable")) == [2, 3, 1, 0, 4]
    assert np.array_equal(fuse_ranks(score, np.full(5, np.nan)), score)  # nothing to fuse: unchanged
    assert np.array_equal(fuse_ranks(score, -score), score[::-1])  # every sum ties: the larger lift first
