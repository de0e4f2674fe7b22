"""Local-density scores (core/density.py): hand-checked toys, a brute-force numpy twin, batching invariance,
self-exclusion, and a planted poison cluster in both reference regimes. Fast, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ubt_ray.core.density import (FLOOR_EPS, LID_MAX, SCORES, Reference, density_scores, key_rank,
                                  reference_keys)
from ubt_ray.core.zeroshot import auroc

S3 = math.sqrt(3) / 2
A, B, C = [1.0, 0.0], [0.5, S3], [-1.0, 0.0]  # unit vectors at 0, 60 and 180 degrees


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- hand-checkable toys --------------------------------------------------------------------------------------

def test_three_points_on_a_circle_by_hand():
    # Cosine distances: a-b 1 - cos 60 = 0.5, a-c 2, b-c 1 - cos 120 = 1.5. With k = 2 each point's two
    # neighbours are the other two: kd(a) = 2, kd(b) = 1.5, kd(c) = 2, and LID = 2 / sum ln(kd / d_i):
    # LID(a) = 2 / ln 4, LID(b) = 2 / ln 3, LID(c) = 2 / ln(4/3).
    ref = Reference(t64([C, A, B]), ["c", "a", "b"], k=2)
    assert ref.keys == ["a", "b", "c"]
    assert torch.allclose(ref.knn, t64([[0.5, 2.0], [0.5, 1.5], [1.5, 2.0]]), atol=1e-12)

    # q at 90 degrees: d(q, a) = d(q, c) = 1 (a tie), d(q, b) = 1 - cos 30. kd(q) = 1; neighbours b and the
    # tied point of lowest key, a. SLOF = (1/1.5 + 1/2) / 2 = 7/12.
    # DAO = ((1/1.5)^(2/ln 3) + (1/2)^(2/ln 4)) / 2 = ((2/3)^(2/ln 3) + e^-1) / 2.
    # Row a queried under its own key: its neighbours are b and c, kd = 2, SLOF = (2/1.5 + 2/2) / 2 = 7/6.
    s = density_scores(t64([[0.0, 1.0], A]), ["q", "a"], ref)
    assert torch.allclose(s["kdist"], t64([1.0, 2.0]), atol=1e-12)
    assert torch.allclose(s["slof"], t64([7 / 12, 7 / 6]), atol=1e-12)
    dao_q = math.log(((2 / 3) ** (2 / math.log(3)) + math.exp(-1)) / 2)
    dao_a = math.log(((2 / 1.5) ** (2 / math.log(3)) + 1.0) / 2)
    assert torch.allclose(s["dao"], t64([dao_q, dao_a]), atol=1e-12)


def test_tie_at_the_kth_distance_goes_to_the_lowest_key_whatever_the_input_order():
    # Had the tie gone to c (LID 2 / ln(4/3) ~ 6.95), DAO(q) would be ln(((2/3)^(2/ln 3) + 2^-6.95) / 2).
    q = t64([[0.0, 1.0]])
    with_a = math.log(((2 / 3) ** (2 / math.log(3)) + math.exp(-1)) / 2)
    with_c = math.log(((2 / 3) ** (2 / math.log(3)) + 0.5 ** (2 / math.log(4 / 3))) / 2)
    for rows, keys in [([A, B, C], ["a", "b", "c"]), ([C, B, A], ["c", "b", "a"]), ([B, C, A], ["b", "c", "a"])]:
        dao = density_scores(q, ["q"], Reference(t64(rows), keys, k=2))["dao"]
        assert abs(dao.item() - with_a) < 1e-12 and abs(dao.item() - with_c) > 0.1


def test_captions_in_the_reference_by_hand():
    # Rows a (image 0 deg, caption 90 deg) and b (image 180 deg, caption 270 deg); points a_img, b_img, a_cap,
    # b_cap. Each point's other-row points are at distances 1 and 2, so kd = 2 and LID = 2 / ln 2 everywhere.
    ref = Reference(t64([A, C]), ["a", "b"], k=2, captions=t64([[0.0, 1.0], [0.0, -1.0]]))
    assert torch.allclose(ref.knn, t64([[1.0, 2.0]] * 4), atol=1e-12)
    # a's image under key a: a's image and caption left out, neighbours b_cap (1) and b_img (2): kd = 2,
    # SLOF = 1, DAO = ln 1 = 0. The same image under a new key: a_img (at the floor), then a_cap and b_cap tied
    # at 1, a_cap (column 2) taken before b_cap (column 3): kd = 1, SLOF = 1/2, DAO = (2 / ln 2) ln(1/2) = -2.
    s = density_scores(t64([A, A]), ["a", "new"], ref)
    assert torch.allclose(s["kdist"], t64([2.0, 1.0]), atol=1e-12)
    assert torch.allclose(s["slof"], t64([1.0, 0.5]), atol=1e-12)
    assert torch.allclose(s["dao"], t64([0.0, -2.0]), atol=1e-12)


def test_lid_of_equidistant_neighbours_is_capped_and_duplicates_stay_finite():
    # Four copies of one vector and one other: a copy's k = 2 nearest are copies at the distance floor, so its
    # LID estimate is infinite (capped at LID_MAX) and its kd the floor; every score stays finite.
    rows = t64([A, A, A, A, C])
    ref = Reference(rows, list("abcde"), k=2)
    floor = FLOOR_EPS * torch.finfo(torch.float64).eps
    assert torch.allclose(ref.knn[:4], torch.full((4, 2), floor, dtype=torch.float64))
    s = density_scores(t64([C, B]), ["e", "new"], ref)
    for v in s.values():
        assert torch.isfinite(v).all()
    # c queried under its key: neighbours two copies (kd = floor, LID = LID_MAX), DAO = LID_MAX ln(2 / floor).
    assert math.isclose(s["dao"][0].item(), LID_MAX * math.log(2 / floor), rel_tol=1e-9)


# --- a brute-force twin ---------------------------------------------------------------------------------------

def brute_force(queries, query_keys, images, keys, k, captions=None):
    """The definitions of core/density.py, written out point by point in float64 numpy."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    order = np.argsort(np.asarray(keys), kind="stable")
    pts = unit(images)[order]
    pkeys = list(np.asarray(keys)[order])
    if captions is not None:
        pts = np.concatenate([pts, unit(captions)[order]])
        pkeys = pkeys * 2
    pkeys = np.asarray(pkeys)
    floor = FLOOR_EPS * np.finfo(np.float64).eps

    def sorted_distances(x, key):
        d = np.maximum(1.0 - pts @ x, floor)
        d[pkeys == key] = np.inf
        nearest = np.argsort(d, kind="stable")  # ties: lowest column first
        return d, nearest

    kd_ref, lid_ref = np.empty(len(pts)), np.empty(len(pts))
    for j in range(len(pts)):
        d, nearest = sorted_distances(pts[j], pkeys[j])
        dk = d[nearest[:k]]
        kd_ref[j] = dk[-1]
        spread = np.sum(np.log(dk[-1] / dk))
        lid_ref[j] = min(k / spread, LID_MAX) if spread > 0 else LID_MAX
    out = {name: [] for name in SCORES}
    for x, key in zip(unit(queries), query_keys):
        d, nearest = sorted_distances(x, key)
        nn = nearest[:k]
        kd = d[nn[-1]]
        out["kdist"].append(kd)
        out["slof"].append(np.mean(kd / kd_ref[nn]))
        out["dao"].append(np.log(np.mean((kd / kd_ref[nn]) ** lid_ref[nn])))
    return {name: np.asarray(v) for name, v in out.items()}


@pytest.mark.parametrize("with_captions", [False, True])
def test_matches_brute_force_on_random_data(with_captions):
    rng = np.random.default_rng(3)
    n, r, dim, k = 60, 40, 8, 6
    data = rng.normal(size=(n, dim))
    caps = data + 0.7 * rng.normal(size=(n, dim))  # captions near their images, as in a trained CLIP
    keys = [f"row-{i:03d}" for i in range(n)]
    ref_rows = rng.permutation(n)[:r]  # given out of key order; a third of the queries are reference rows
    ref = Reference(t64(data[ref_rows]), [keys[i] for i in ref_rows], k=k,
                    captions=t64(caps[ref_rows]) if with_captions else None, chunk=16)
    got = density_scores(t64(data), keys, ref)
    want = brute_force(data, keys, data[ref_rows], [keys[i] for i in ref_rows], k,
                       caps[ref_rows] if with_captions else None)
    for name in SCORES:
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # A smaller k from the same reference is the same as a reference built for it.
    small = density_scores(t64(data), keys, ref, k=3)
    want3 = brute_force(data, keys, data[ref_rows], [keys[i] for i in ref_rows], 3,
                        caps[ref_rows] if with_captions else None)
    for name in SCORES:
        np.testing.assert_allclose(small[name].numpy(), want3[name], rtol=1e-9, atol=1e-12, err_msg=name)


# --- batching invariance and self-exclusion ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_do_not_depend_on_batching_or_order(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(150, 12, generator=g, dtype=dtype)
    keys = [f"k{i:03d}" for i in range(150)]
    ref = Reference(x[:50], keys[:50], k=7, captions=torch.randn(50, 12, generator=g, dtype=dtype), chunk=32)
    whole = density_scores(x, keys, ref)
    perm = torch.randperm(150, generator=g)
    cuts = [0, 1, 2, 40, 41, 97, 150]  # batches of 1, 1, 38, 1, 56 and 53 rows, shuffled
    parts = [density_scores(x[perm[a:b]], [keys[i] for i in perm[a:b]], ref) for a, b in zip(cuts, cuts[1:])]
    for name in SCORES:
        split = torch.empty_like(whole[name])
        split[perm] = torch.cat([p[name] for p in parts])
        assert torch.equal(split, whole[name]), name  # bit-identical


def test_a_reference_row_queried_under_its_key_leaves_itself_out():
    # Scored under its own key, a reference row has exactly the k-distance the reference computed for it
    # within the reference (its own point left out); under a new key its own copy, at the floor distance, is its
    # nearest neighbour, so its k-distance is the reference's (k-1)-th distance.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    keys = [f"r{i:02d}" for i in range(40)]
    ref = Reference(x, keys, k=5, chunk=16)
    own = density_scores(x, keys, ref, which=("kdist",))["kdist"]
    assert torch.allclose(own, ref.knn[:, 4], rtol=1e-12)
    fresh = density_scores(x, [f"new{i}" for i in range(40)], ref, which=("kdist",))["kdist"]
    assert torch.allclose(fresh, ref.knn[:, 3], rtol=1e-12)
    # Rows outside the reference: their key changes nothing.
    q = torch.randn(10, 6, generator=g, dtype=torch.float64)
    s1, s2 = density_scores(q, [f"a{i}" for i in range(10)], ref), density_scores(q, [f"b{i}" for i in range(10)], ref)
    assert all(torch.equal(s1[n], s2[n]) for n in SCORES)


# --- a planted poison cluster ---------------------------------------------------------------------------------

def planted(seed=0):
    """500 spread rows in a cone round e1 (CLIP image embeddings fill a narrow cone) and 20 poisons packed round
    e2, off the cone (where a trigger pulls them); the poisons are the last 20 rows."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.randn(500, 16, generator=g, dtype=torch.float64)
    spread[:, 0] += 5.0
    centre = torch.zeros(16, dtype=torch.float64)
    centre[1] = 1.0
    poisons = centre + 0.05 * torch.randn(20, 16, generator=g, dtype=torch.float64)
    keys = [f"row-{i:04d}" for i in range(520)]
    return torch.cat([spread, poisons]), keys, np.r_[np.zeros(500), np.ones(20)].astype(bool)


def test_planted_cluster_ranks_first_when_the_reference_holds_fewer_poisons_than_k():
    x, keys, is_poison = planted()
    chosen = reference_keys(keys, seed=0, size=100)
    rows = [keys.index(key) for key in chosen]
    assert 0 < is_poison[rows].sum() < 16  # the paper's regime: a poison's 16th neighbour is a clean row
    s = density_scores(x, keys, Reference(x[rows], chosen, k=16))
    for name in SCORES:
        assert auroc(s[name], is_poison) > 0.95, name


def test_planted_cluster_is_densest_when_the_reference_holds_more_poisons_than_k():
    # The other regime: all 20 poisons in the reference and k = 8, so a poison's neighbours are poisons and its
    # k-distance the lowest of all. The scores stay "higher = sparser": here they rank the poisons last.
    x, keys, is_poison = planted()
    s = density_scores(x, keys, Reference(x, keys, k=8))
    assert auroc(s["kdist"], is_poison) < 0.05


# --- reference choice and argument checks ----------------------------------------------------------------------

def test_reference_keys_are_a_seeded_sample_that_ignores_order():
    keys = [f"key-{i}" for i in range(300)]
    picked = reference_keys(keys, seed=1, size=30)
    assert picked == sorted(picked) and len(set(picked)) == 30
    assert reference_keys(list(reversed(keys)) + keys[:5], seed=1, size=30) == picked
    assert reference_keys(keys, seed=2, size=30) != picked
    cut = max(key_rank(1, key) for key in picked)
    assert all((key_rank(1, key) <= cut) == (key in picked) for key in keys)
    assert key_rank(1, "key-0") == key_rank(1, "key-0") != key_rank(2, "key-0")


def test_bad_arguments_are_refused():
    x = torch.randn(5, 3, dtype=torch.float64)
    keys = list("abcde")
    with pytest.raises(ValueError, match="distinct"):
        Reference(x, list("aabcd"), k=2)
    with pytest.raises(ValueError, match="fewer than k"):
        Reference(x, keys, k=5)
    with pytest.raises(ValueError, match="at least 2"):
        Reference(x, keys, k=1)
    Reference(x, keys, k=8, captions=x)  # 2 x 4 other-row points: enough
    ref = Reference(x, keys, k=3)
    with pytest.raises(ValueError, match="between 2"):
        density_scores(x, keys, ref, k=4)
    with pytest.raises(ValueError, match="unknown density score"):
        density_scores(x, keys, ref, which=("lof",))
    with pytest.raises(ValueError, match="N keys"):
        density_scores(x, keys[:4], ref)
    empty = density_scores(x[:0], [], ref)
    assert all(v.shape == (0,) for v in empty.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_float32_agrees_with_cpu_float64():
    x, keys, _ = planted()
    rows = [keys.index(key) for key in reference_keys(keys, seed=0, size=100)]
    cpu = density_scores(x, keys, Reference(x[rows], [keys[i] for i in rows], k=16))
    xg = x.float().cuda()
    gpu = density_scores(xg, keys, Reference(xg[rows], [keys[i] for i in rows], k=16))
    for name in SCORES:
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].double().cpu(), cpu[name], rtol=1e-4, atol=1e-5)
