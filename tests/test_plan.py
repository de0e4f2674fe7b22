"""`ubt plan`'s arithmetic (plan.py) and the cost accounting it rests on (cost.py, the counting functions), on a
report written by hand: no Ray."""

from __future__ import annotations

import json

import pytest
import torch

from ubt_ray import cli
from ubt_ray.core.scoring import TokenGrid, score_passes
from ubt_ray.cost import Usage, cost_block, sum_costs
from ubt_ray.errors import UserError
from ubt_ray.core.unlearning import ForgetSet, UnlearnObjective, forget_setup_passes
from ubt_ray.plan import Cluster, estimate, measured_cluster, planned_cluster


def _cost(forward, backward, wall, cpus, gpus=0.0):
    return cost_block(Usage(forward, backward, cpus=cpus, gpus=gpus, devices="test"), wall)


def report(gpus: float = 0.0) -> dict:
    """A defense of 1,000 rows on 2 scoring actors and 1 training worker (2 CPUs for select)."""
    return {"phases": {
        "overfit": {"rows": 1000, "steps": 60, "workers": 1, "wall_time_s": 30.0,
                    "cost": _cost(7680, 7680, 30.0, 1, gpus)},
        "score": {"rows": 1000, "actors": 2, "wall_time_s": 20.0, "cost": _cost(3072, 0, 20.0, 2, 2 * gpus)},
        "select": {"rows": 1000, "wall_time_s": 4.0, "cost": _cost(0, 0, 4.0, 2)},
        "unlearn": {"rows": 500, "steps": 50, "workers": 1, "wall_time_s": 25.0,
                    "cost": _cost(12900, 12900, 25.0, 1, gpus)}},
        "settings": {"overfit": {"steps": 60, "batch_size": 128, "subset_fraction": 1.0},
                     "unlearn": {"steps": 50, "batch_size": 256, "num_samples": 300},
                     "select": {"retain_samples": 500}}}


def by_phase(estimates):
    return {e.phase: e for e in estimates}


def test_scoring_time_and_passes_scale_with_rows_and_fall_with_actors():
    r = report()
    base = by_phase(estimate(r, 1000, measured_cluster(r)))
    assert base["score"].time_s == pytest.approx(20.0) and base["score"].forward == 3072
    double = by_phase(estimate(r, 2000, measured_cluster(r)))
    assert double["score"].time_s == pytest.approx(40.0) and double["score"].forward == 6144
    assert double["select"].time_s == pytest.approx(8.0)
    more_actors = by_phase(estimate(r, 2000, Cluster(actors=4, workers=1, cpus=2, gpu=False)))
    assert more_actors["score"].time_s == pytest.approx(20.0)
    # The reservation grows with the actors, so the reserved hours of the same work stay the same.
    assert more_actors["score"].cpu_hours == pytest.approx(double["score"].cpu_hours)


def test_training_steps_stay_fixed_and_time_falls_with_workers():
    r = report()
    small, large = (by_phase(estimate(r, n, measured_cluster(r))) for n in (1000, 3_000_000))
    for phase in ("overfit", "unlearn"):
        assert large[phase].time_s == pytest.approx(small[phase].time_s)
        assert large[phase].forward == small[phase].forward == r["phases"][phase]["cost"]["forward_sample_passes"]
    four = by_phase(estimate(r, 3_000_000, Cluster(actors=2, workers=4, cpus=2, gpu=False)))
    assert four["overfit"].time_s == pytest.approx(30.0 / 4) and four["unlearn"].time_s == pytest.approx(25.0 / 4)


def test_planned_cluster_from_the_options():
    r = report()
    assert measured_cluster(r) == Cluster(actors=2, workers=1, cpus=2.0, gpu=False)
    assert planned_cluster(r, None, None, 8, None) == Cluster(8, 8, 2.0, True)
    assert planned_cluster(r, None, None, None, 17) == Cluster(16, 1, 17.0, False)  # one CPU left to the reads
    # score's default: single-threaded actors reserving less than a CPU each, one per CPU.
    shared = report()
    shared["phases"]["score"]["cost"] = _cost(3072, 0, 20.0, 1.0)
    assert planned_cluster(shared, None, None, None, 17) == Cluster(17, 1, 17.0, False)
    gpu = by_phase(estimate(r, 1000, planned_cluster(r, None, None, 8, 64)))
    assert gpu["score"].gpu_hours == pytest.approx(8 * gpu["score"].time_s / 3600)
    with pytest.raises(UserError, match="at least 1"):
        planned_cluster(r, 0, None, None, None)
    with pytest.raises(UserError, match="at least one row"):
        estimate(r, 0, measured_cluster(r))
    del r["phases"]["unlearn"]["cost"]
    with pytest.raises(UserError, match="unlearn phase has no cost"):
        estimate(r, 10, Cluster(1, 1, 1, False))


def test_costs_sum_and_reserved_seconds_are_reservation_times_wall():
    block = _cost(10, 4, 3.0, 2, 1)
    assert block["reserved_cpu_seconds"] == 6.0 and block["reserved_gpu_seconds"] == 3.0
    total = sum_costs([block, _cost(5, 0, 1.0, 4), None])
    assert (total["forward_sample_passes"], total["backward_sample_passes"], total["wall_time_s"]) == (15, 4, 4.0)
    assert total["reserved_cpu_seconds"] == 10.0 and total["reserved_gpu_seconds"] == 3.0
    assert set(total) == set(block)


def unlearning(forget_batch_size: int, anchor: bool) -> UnlearnObjective:
    """An unlearning objective over 8 forget rows of 8x8 pixels (what its pass count needs: no model runs)."""
    forget = ForgetSet(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.zeros(8, 4, dtype=torch.long),
                       ["token_mask"] * 8, None)
    return UnlearnObjective({"mean": [0.0] * 3, "std": [1.0] * 3}, forget, torch.zeros(8, 4), "token_invariance",
                            1.0, 0.0, forget_batch_size, 0, reference=torch.nn.Linear(1, 1) if anchor else None,
                            anchor_weight=1.0 if anchor else 0.0)


def test_counted_passes():
    grid = TokenGrid(patch=4, side=8)  # 64 tokens
    # 100 rows in chunks of 64: 128 forwarded; the saliency forward + two token counts + blur.
    assert score_passes(100, "token_drop", (2 / 64, 4 / 64), ("token_mask", "blur"), "attention", grid, 64) == \
        (128 * 4, 0)
    assert score_passes(100, "token_drop", (2 / 64,), ("token_mask",), "gradient", grid, 64) == (256, 128)
    assert score_passes(0, "token_drop", (2 / 64,), ("token_mask",), "attention", grid, 64) == (0, 0)
    assert score_passes(10, "cosine", (), (), "attention", grid, 64) == (64, 0)
    # 2 workers of 128 retain rows, a forget batch of 3 (2 + 1), an anchor forwarding the retain rows again.
    assert unlearning(3, anchor=True).sample_passes(128, 2) == (256 + 3 + 256, 256 + 3)
    assert unlearning(2, anchor=False).sample_passes(128, 4) == (512 + 4, 512 + 4)  # each worker takes at least one
    assert forget_setup_passes(300, "auto", has_orders=True, saliency="attention") == (300, 0)
    assert forget_setup_passes(300, "auto", has_orders=False, saliency="gradient") == (600, 300)
    assert forget_setup_passes(300, "push_away", has_orders=False, saliency="gradient") == (0, 0)


def test_ubt_plan_prints_the_table_and_assumptions(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps(report()))
    assert cli.main(["plan", "--defense", str(tmp_path), "--rows", "3000000", "--gpus", "8",
                     "--gpu-hour-price", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "| score | 3,000,000 |" in out and "| **total** |" in out and "cost |" in out
    assert "overfit.steps=60" in out and "WARNING: the defense was measured on CPUs" in out
    assert cli.main(["plan", "--defense", str(tmp_path / "nothing"), "--rows", "10"]) == 2
    assert "has no report.json" in capsys.readouterr().err
