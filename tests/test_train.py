"""`ubt train` through real Ray Train: DDP over two CPU workers, open_clip checkpoints, resume after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import ray
import torch

from ubt_ray.cli import main
from ubt_ray.config import ModelConfig, load_config
from ubt_ray.models import load_clip
from ubt_ray.train_loop import FitSpec, run_fingerprint

from helpers import caption_shards, last_json, registered_checkpoints

REPO = Path(__file__).resolve().parent.parent


def test_rewritten_shards_at_the_same_path_are_another_run(tmp_path):
    data = caption_shards(tmp_path / "shards", rows=64)
    cfg = load_config(None, [f"data.train={data}"])
    spec = FitSpec("train", str(data), str(tmp_path / "out"), cfg.model, cfg.train)
    before = run_fingerprint(cfg, spec)
    assert run_fingerprint(cfg, spec) == before
    shutil.rmtree(data)
    caption_shards(data, rows=96)  # same file names, other content (e.g. poisoned again with another trigger)
    assert run_fingerprint(cfg, spec) != before


def test_a_local_rays_workers_are_told_its_address(ray_local):
    """Ray's State API, called from a worker (Ray Train's placement-group cleaner), finds its cluster through
    RAY_ADDRESS: without it, two local Rays on one machine make it fail with a traceback in the terminal."""
    @ray.remote(num_cpus=0)
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray.get(address.remote()) == ray.get_runtime_context().gcs_address
    assert "RAY_GCS_SERVER_PORT" not in os.environ  # this process's environment is as it was


def test_killed_two_worker_training_resumes_from_its_checkpoint(ray_local, tmp_path, capsys):
    """DDP over two Ray Train workers, killed after its first checkpoint, run again: it resumes there, ends at the
    schedule's step and writes an open_clip checkpoint."""
    data = caption_shards(tmp_path / "shards", rows=512)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ubt_ray.cli", "train", f"data.train={data}", f"experimental.train.output={out}",
           "train.batch_size=64", "train.epochs=2", "experimental.trainer.checkpoints_per_epoch=2", "experimental.train.warmup_steps=2",
           "trainer.num_workers=2", "experimental.trainer.threads_per_worker=1", "experimental.ray.num_cpus=4"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    # Its own session, so that killing it takes its whole local Ray down too, as a crash would.
    log = tmp_path / "first-run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 480  # its imports and Ray's start alone take minutes on 2 busy cores
    try:
        while not registered_checkpoints(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert registered_checkpoints(out), (f"no checkpoint was registered before the deadline (exit code "
                                             f"{proc.poll()}): {log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()  # it really died before finishing
    # Run again, here on this module's Ray (another process would only add its imports and Ray's start).
    capsys.readouterr()
    assert main(cmd[cmd.index("train"):]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["steps"] == 16  # the batch size is global: 512 rows / 64 per step x 2 epochs, whatever the workers
    assert 0 < summary["resumed_from_step"] < 16
    assert summary["resumed_from_step"] % 4 == 0  # a checkpoint step: every half epoch of 8 steps
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'model'}")
    init = load_clip(ModelConfig(), seed=0).model
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values())]
    assert sum(moved) > len(moved) // 2  # training changed the weights of the seeded initial model
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 16 and manifest["config"]["trainer"]["num_workers"] == 2
    # Its cost: each of the 1,024 samples once forward and once back (the steps before the checkpoint it resumed
    # from counted once, those redone after it once), on the 2 workers' reserved CPUs.
    cost = manifest["cost"]
    assert cost["forward_sample_passes"] == cost["backward_sample_passes"] == manifest["training"]["samples"] == 1024
    assert cost["reserved_cpus"] == 2 and cost["reserved_cpu_seconds"] == pytest.approx(2 * cost["wall_time_s"], abs=0.2)
    # Another schedule on the same output is another run: it starts over instead of resuming this one. (A resumed
    # run would report resumed_from_step 16 and stop there, its schedule done.) In this process, for speed.
    assert main(["train", f"data.train={data}", f"experimental.train.output={out}", "trainer.num_workers=0", "train.batch_size=64",
                 "experimental.train.steps=2", "experimental.train.warmup_steps=1", "experimental.trainer.threads_per_worker=1"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["resumed_from_step"] == 0 and again["steps"] == 2


def test_the_same_training_twice_gives_the_same_weights(ray_local, tmp_path, capsys):
    """Same shards (three files), config and seed: the same model, bit for bit (Train's ingest hands the blocks
    out in their seeded order; Ray Data's v2 Parquet reads gave another model each run)."""
    data = caption_shards(tmp_path / "shards", rows=300, files=3)
    weights = []
    for run in ("a", "b"):
        assert main(["train", f"data.train={data}", f"experimental.train.output={tmp_path / run}", "trainer.num_workers=0",
                     "train.batch_size=32", "experimental.train.steps=4", "experimental.train.warmup_steps=1", "experimental.trainer.threads_per_worker=1"]) == 0
        weights.append((tmp_path / run / "model" / "open_clip_model.safetensors").read_bytes())
    capsys.readouterr()
    assert weights[0] == weights[1]
