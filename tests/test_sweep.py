"""`ubt sweep`: the search space and objective (no Ray), then a real Ray Tune sweep on a small backdoored model,
interrupted after two finished trials and resumed without running them again."""

import contextlib
import io
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from ubt_ray.cli import main
from ubt_ray.config import load_config, replace_keys
from ubt_ray.core.batches import decode_images
from ubt_ray.core.models import load_checkpoint_dir
from ubt_ray.core.objectives import Batch, ClipObjective
from ubt_ray.core.search import Dimension, largest, objective_value, rank_rows
from ubt_ray.errors import ConfigError, UserError
from ubt_ray.models import save_clip
from ubt_ray.phases import sweep as sweep_phase
from ubt_ray.phases.sweep import build_scheduler, max_concurrent_trials, sweep, to_tune, trial_config
from ubt_ray.sweep_space import parse_space

from helpers import fashion_mnist_shards, last_json, small_clip_config, write_random_clip


# ---- the search space and the objective (no Ray cluster) -----------------------------------------------------

def test_space_parses_every_kind_and_converts_values_to_the_keys_types():
    dims = parse_space({"unlearn.num_samples": {"grid": [150, 300, 600]},
                        "unlearn.token_portion": {"choice": [0.015625, 0.0625]},
                        "unlearn.lr": {"loguniform": ["1e-5", "1e-3"]},   # YAML reads 1e-5 as a string
                        "unlearn.forget_weight": {"uniform": [1, 5]},
                        "unlearn.steps": {"randint": [20, 101]},
                        "unlearn.forget": {"grid": ["token_invariance", "push_away"]}})
    by_key = {d.key: d for d in dims}
    assert by_key["unlearn.lr"] == Dimension("unlearn.lr", "loguniform", (1e-5, 1e-3))
    assert by_key["unlearn.forget_weight"].values == (1.0, 5.0)
    assert largest(dims, "unlearn.num_samples", 1) == 600
    assert largest(dims, "unlearn.steps", 1) == 100          # randint excludes its high bound, as Tune does
    assert largest(dims, "unlearn.margin", 0.25) == 0.25     # not swept: the config's value
    assert isinstance(to_tune(by_key["unlearn.num_samples"]), dict)  # grid_search
    assert isinstance(to_tune(by_key["unlearn.lr"]), tune.search.sample.Float)
    assert isinstance(to_tune(by_key["unlearn.steps"]), tune.search.sample.Integer)


@pytest.mark.parametrize("space, words", [
    ({"unlearn.lrr": {"grid": [1e-4]}}, ["unknown config key 'unlearn.lrr'", "lr", "ubt config --keys"]),
    ({"nosection.x": {"grid": [1]}}, ["unknown config key 'nosection.x'"]),
    ({"score.method": {"grid": ["cosine"]}}, ["every trial shares", "unlearn.* and trainer.*"]),
    ({"unlearn.output": {"grid": ["/tmp/x"]}}, ["set by the sweep itself"]),
    ({"trainer.num_workers": {"grid": [2]}}, ["sweep.num_workers"]),
    ({"unlearn.lr": {"normal": [0, 1]}}, ["must map to one of grid, choice"]),
    ({"unlearn.lr": [1e-4, 2e-4]}, ["must map to one of"]),
    ({"unlearn.steps": {"uniform": [10, 20]}}, ["takes integers", "randint"]),
    ({"unlearn.lr": {"uniform": [1e-3, 1e-4]}}, ["low < high"]),
    ({"unlearn.margin": {"loguniform": [0, 0.5]}}, ["loguniform needs low > 0"]),
    ({"unlearn.steps": {"randint": [10.5, 20]}}, ["integer bounds"]),
    ({"unlearn.token_portion": {"grid": [0.1, 2]}}, ["'unlearn.token_portion' must be > 0 and <= 1", "2"]),
    ({"unlearn.forget": {"choice": ["forget_all"]}}, ["'unlearn.forget' must be one of"]),
    ({"unlearn.num_samples": {"grid": []}}, ["non-empty list"]),
    ({}, ["sweep.space is empty"]),
])
def test_space_mistakes_are_one_sentence_naming_the_key(space, words):
    with pytest.raises(ConfigError) as e:
        parse_space(space)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_space_before_starting_ray(capsys):
    assert main(["sweep", "sweep.space={unlearn.num_sample: {grid: [1, 2]}}"]) == 2
    assert "unknown config key 'unlearn.num_sample'" in capsys.readouterr().err


def test_objective_ranks_trials_over_the_asr_threshold_below_all_that_meet_it():
    trials = {"a": (0.80, 0.02), "b": (0.86, 0.04), "c": (0.90, 0.30), "d": (0.88, 0.06), "e": (0.10, 0.05)}
    rows = [{"trial_id": t, "status": "finished", "objective": objective_value(ca, asr, "ca_subject_to_asr", 0.05)}
            for t, (ca, asr) in trials.items()]
    # Meeting ASR <= 5%: by CA (b, a, e); over it: by ASR (d at 6% before c at 30%), whatever their CA.
    assert [r["trial_id"] for r in rank_rows(rows)] == ["b", "a", "e", "d", "c"]
    assert objective_value(0.9, 0.3, "ca", 0.05) == 0.9
    assert objective_value(0.9, 0.3, "asr", 0.05) == -0.3
    assert objective_value(0.9, 0.3, "ca_minus_asr", 0.05) == pytest.approx(0.6)
    with pytest.raises(UserError, match="needs the attack success rate"):
        objective_value(0.9, None, "ca_subject_to_asr", 0.05)


def test_rank_puts_finished_trials_first_then_stopped_then_failed():
    rows = [{"trial_id": "s", "status": "stopped", "objective": 0.99},
            {"trial_id": "x", "status": "error", "objective": None},
            {"trial_id": "f2", "status": "finished", "objective": 0.5},
            {"trial_id": "f1", "status": "finished", "objective": 0.5},
            {"trial_id": "f0", "status": "finished", "objective": None}]
    assert [r["trial_id"] for r in rank_rows(rows)] == ["f1", "f2", "f0", "s", "x"]


def test_concurrency_follows_the_cluster_and_leaves_a_cpu_to_the_reads(monkeypatch):
    cfg = load_config()
    monkeypatch.setattr(sweep_phase.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert max_concurrent_trials(cfg.sweep) == 15
    assert max_concurrent_trials(replace_keys(cfg, {"sweep.num_workers": 2, "sweep.cpus_per_worker": 3}).sweep) == 2
    assert max_concurrent_trials(replace_keys(cfg, {"sweep.use_gpu": True, "sweep.num_workers": 2}).sweep) == 2
    assert max_concurrent_trials(replace_keys(cfg, {"sweep.max_concurrent_trials": 7}).sweep) == 7
    monkeypatch.setattr(sweep_phase.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(UserError, match="a trial needs 2 CPUs"):
        max_concurrent_trials(replace_keys(cfg, {"sweep.cpus_per_worker": 2}).sweep)


def test_asha_stops_by_unlearning_step_up_to_the_longest_run():
    cfg = load_config(None, ["experimental.sweep.scheduler=asha", "experimental.sweep.grace_steps=10"])
    dims = parse_space({"unlearn.steps": {"grid": [30, 80]}})
    scheduler = build_scheduler(cfg.sweep, dims, cfg.unlearn.steps)
    assert isinstance(scheduler, ASHAScheduler) and scheduler._time_attr == "step" and scheduler._max_t == 81
    assert build_scheduler(load_config().sweep, dims, 50) is None


def test_a_trial_config_holds_its_drawn_values_and_its_own_outputs():
    base = load_config(None, ["experimental.sweep.output=/tmp/s"])
    cfg = trial_config(base, {"unlearn.num_samples": 40, "unlearn.lr": "2e-4"}, "abc_00001")
    assert cfg.unlearn.num_samples == 40 and cfg.unlearn.lr == 2e-4
    assert cfg.unlearn.output == "/tmp/s/trials/abc_00001/unlearn"
    assert cfg.evaluate.output == "/tmp/s/trials/abc_00001/eval"
    with pytest.raises(ConfigError, match="'unlearn.num_samples' must be >= 1"):
        trial_config(base, {"unlearn.num_samples": 0}, "abc_00002")


# ---- a real sweep through Ray Tune ---------------------------------------------------------------------------

# A smaller CLIP than ubt-tiny-vit (same 8x8 patch grid), so that the trials cost seconds.
MICRO = small_clip_config(width=32, vision_layers=1, head_width=16)


def train_micro_clip(data: str, out: Path, steps: int = 60) -> None:
    """A micro CLIP trained in this process on the poisoned shards (the attack side; enough for a sweep to
    have something to measure, not a strong backdoor)."""
    write_random_clip(out, MICRO)
    clip = load_checkpoint_dir(out)
    table = pq.read_table(data, columns=["image", "caption"])
    pixels = decode_images(table.column("image").to_pylist(), clip.image_size)
    tokens = clip.tokenizer(table.column("caption").to_pylist())
    objective = ClipObjective(clip.preprocess_cfg)
    optimizer = torch.optim.AdamW(clip.model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(pixels), generator=generator)[:128]
        loss, _ = objective(clip.model, Batch(pixels[idx], tokens[idx], []))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_clip(clip, str(out))


@pytest.fixture(scope="module")
def backdoored(ray_local, tmp_path_factory):
    """Poisoned Fashion-MNIST shards (1,200 rows, 60 BadNet poisons), a micro CLIP trained on them, and the
    overrides of a 2-trial sweep over num_samples x token_portion on it, one trial at a time (each trial is a
    Ray Train run that starts its own actors: the suite's time goes there)."""
    root = tmp_path_factory.mktemp("sweep")
    overrides = [f"run.output_dir={root}", f"data.clean_train={fashion_mnist_shards(root / 'clean', rows=1200)}",
                 f"data.test={fashion_mnist_shards(root / 'test', split='test', rows=300)}",
                 "poison.num_poisons=60", "poison.params={size: 6}"]
    assert main(["poison", *overrides]) == 0
    train_micro_clip(str(root / "poison" / "shards"), root / "attack" / "model")
    overrides += ["experimental.defend.overfit=false", "score.num_actors=1", "experimental.score.batch_size=200",
                  "sweep.space={unlearn.num_samples: {grid: [20, 40]}, unlearn.token_portion: {grid: [0.0625]}}",
                  "experimental.sweep.max_concurrent_trials=1", "experimental.sweep.probe_every=2", "experimental.sweep.probe_rows=100",
                  "experimental.select.retain_samples=256", "experimental.unlearn.steps=4", "experimental.unlearn.warmup_steps=0", "experimental.unlearn.batch_size=32",
                  "experimental.unlearn.forget_batch_size=8", "experimental.evaluate.max_rows=200", "experimental.trainer.threads_per_worker=1"]
    return root, overrides


class InterruptAfter(tune.Callback):
    """Sends this process SIGINT (a user's Ctrl+C) once `n` trials have completed, if `flag` exists (it is
    removed first: Tune keeps its callbacks for the resumed run, which must not be interrupted again)."""

    def __init__(self, n: int, flag: str):
        self.n, self.flag, self.completed = n, flag, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1
        if self.completed >= self.n and os.path.exists(self.flag):
            os.remove(self.flag)
            os.kill(os.getpid(), signal.SIGINT)


def finished_trials(out: Path) -> dict[str, float]:
    """Trial id -> modification time of its evaluation, for each trial that ran to its end."""
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/eval/metrics.json")
            if (p.parent.parent / "config.yaml").exists()}


@pytest.fixture(scope="module")
def resumed_sweep(backdoored):
    """The sweep interrupted after its first finished trial, then resumed with `ubt sweep`."""
    root, overrides = backdoored
    out = root / "sweep"
    flag = root / "interrupt.flag"
    flag.touch()
    first = sweep(load_config(None, overrides), callbacks=[InterruptAfter(1, str(flag))])
    first.wrote_results = (out / "results.csv").exists()
    before = finished_trials(out)
    progress = {p.parent.name: p.read_text() for p in out.glob("tune/*/result.json")}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["sweep", *overrides])
    return SimpleNamespace(root=root, overrides=overrides, out=out, first=first, before=before, progress=progress,
                           code=code, stdout=stdout.getvalue())


def test_an_interrupted_sweep_resumes_without_running_finished_trials_again(resumed_sweep):
    run = resumed_sweep
    out, before, stdout = run.out, run.before, run.stdout
    assert run.first.interrupted and not run.first.rows and not run.first.wrote_results
    assert len(before) == 1  # one trial at a time: the second had not finished
    assert run.code == 0, stdout
    summary = last_json(stdout)
    assert summary["resumed"] and summary["trials"] == 2 and summary["finished"] == 2
    after = finished_trials(out)
    assert len(after) == 2 and set(before) <= set(after)
    # The finished trials were not run again: same evaluation files, same Tune results.
    assert {t: after[t] for t in before} == before
    for trial_dir in out.glob("tune/*/result.json"):
        if any(t in trial_dir.parent.name for t in before):
            assert trial_dir.read_text() == run.progress[trial_dir.parent.name]
    assert len(list(out.glob("trials/*"))) == 2  # no trial was started under a new id


def test_the_sweep_writes_a_sorted_table_a_heatmap_and_the_best_checkpoint(resumed_sweep):
    out = resumed_sweep.out
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 and list(table["rank"]) == [1, 2]
    assert table["objective"].is_monotonic_decreasing and set(table["status"]) == {"finished"}
    assert table["clean_accuracy"].between(0, 1).all() and table["attack_success_rate"].between(0, 1).all()
    assert {(r["unlearn.num_samples"], r["unlearn.token_portion"]) for _, r in table.iterrows()} == {
        (20, 0.0625), (40, 0.0625)}
    markdown = (out / "results.md").read_text()
    assert "| rank | unlearn.num_samples | unlearn.token_portion | CA | CA (held-out prompts) | ASR |" in markdown
    assert "Best:" in markdown and table["clean_accuracy_heldout"].between(0, 1).all()
    assert "| rank |" in resumed_sweep.stdout
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # Every trial reported CA and ASR during unlearning (steps 2 and 4), then its final evaluation.
    for result_file in out.glob("tune/*/result.json"):
        reports = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert [r.get("step") for r in reports if "probe_clean_accuracy" in r] == [2, 4]
        assert reports[-1]["final"] and 0 <= reports[-1]["clean_accuracy"] <= 1
    # The best trial's cleaned model loads with plain open_clip, beside the config that made it.
    best = table.iloc[0]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'best' / 'model'}")
    assert sum(p.numel() for p in model.parameters()) < 3_000_000  # the micro model, not a default one
    best_cfg = load_config(out / "best" / "config.yaml")
    assert best_cfg.unlearn.num_samples == best["unlearn.num_samples"]
    assert best_cfg.unlearn.token_portion == best["unlearn.token_portion"]
    assert best_cfg.unlearn.output.endswith(f"trials/{best['trial_id']}/unlearn")
    # One selection for every trial, made with the largest num_samples of the space.
    assert pq.read_table(out / "select" / "forget").num_rows == 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["forget_rows_selected"] == 40 and manifest["finished"] == 2


def test_a_finished_sweep_asked_again_reruns_nothing(resumed_sweep):
    out = resumed_sweep.out
    before = finished_trials(out)
    progress = {p: p.read_text() for p in out.glob("tune/*/result.json")}
    result = sweep(load_config(None, resumed_sweep.overrides))
    assert result.resumed and len(result.rows) == 2 and finished_trials(out) == before
    assert {p: p.read_text() for p in out.glob("tune/*/result.json")} == progress


def test_the_quickstart_sweep_config_has_at_least_nine_points_on_the_quickstart_outputs():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "sweep.yaml")
    dims = parse_space(cfg.sweep.space)
    assert {d.key for d in dims} >= {"unlearn.num_samples", "unlearn.token_portion"}
    assert all(d.kind == "grid" for d in dims) and len(dims[0].values) * len(dims[1].values) >= 9
    assert cfg.defend.model == "outputs/quickstart/attack/model" and cfg.sweep.scores == "outputs/quickstart/defend/score"
