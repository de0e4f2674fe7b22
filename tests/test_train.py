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
import pyarrow.parquet as pq
import torch

from ubt_ray import storage
from ubt_ray.cli import main
from ubt_ray.config import ModelConfig, load_config
from ubt_ray.models import load_clip
from ubt_ray.shards import read_columns
from ubt_ray.train_loop import FitSpec, run_fingerprint

from helpers import caption_shards, fashion_mnist_shards, last_json, registered_checkpoints

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
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not registered_checkpoints(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert registered_checkpoints(out), "no checkpoint was registered before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()  # it really died before finishing
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = last_json(done.stdout)
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


PIPELINE = ["pipeline.phases=[poison, train, evaluate, defend]", "poison.num_poisons=20", "train.batch_size=64",
            "train.epochs=1", "experimental.train.warmup_steps=1", "experimental.trainer.threads_per_worker=1",
            "trainer.num_workers=0",  # Ray Train in this process: the workers are the killed-resume test's subject
            # The defense's wiring, not its effect (test_defend.py measures that): a few steps of each phase, and
            # one scoring actor (on this little data another actor's start and model load cost more than it saves).
            "experimental.defend.overfit=false", "experimental.unlearn.steps=2", "experimental.unlearn.warmup_steps=0", "experimental.unlearn.batch_size=64",
            "unlearn.num_samples=10", "experimental.unlearn.forget_batch_size=8", "experimental.select.retain_samples=100",
            "experimental.score.batch_size=128", "score.num_actors=1"]


def test_pipeline_on_s3_poisons_trains_evaluates_and_defends(ray_local, tmp_path, s3_bucket, capsys):
    """The pipeline (poison, train, evaluate, defend) with every input and output on s3:// (a real S3 server on
    loopback). Local disk runs the same code paths in test_job_submit (train, evaluate), test_defend and the
    quickstart; one pipeline run here keeps the suite's time down."""
    endpoint, bucket = s3_bucket
    store = load_config(None, [f"storage.endpoint_url={endpoint}"]).storage
    clean = fashion_mnist_shards(tmp_path / "clean", rows=384)
    test = fashion_mnist_shards(tmp_path / "test", split="test", rows=100)
    remote = {}
    for name, local in (("clean", clean), ("test", test)):
        remote[name] = f"s3://{bucket}/in/{name}"
        storage.upload_dir(local, remote[name], store)
    run = f"s3://{bucket}/run"
    capsys.readouterr()
    assert main(["pipeline", f"run.output_dir={run}", f"data.clean_train={remote['clean']}",
                 f"data.test={remote['test']}", f"storage.endpoint_url={endpoint}", *PIPELINE]) == 0
    out = capsys.readouterr().out
    summary = last_json(out, store)
    assert summary["phases"]["poison"]["num_poisoned"] == 20 and summary["phases"]["train"]["steps"] == 6
    # Poisoning is deterministic: the rows on S3 are, byte for byte, those of the same poisoning on local disk.
    assert main(["poison", f"data.clean_train={clean}", f"experimental.poison.output={tmp_path / 'poison'}", *PIPELINE]) == 0
    local_rows = pq.read_table(tmp_path / "poison" / "shards").sort_by("key")
    remote_rows = read_columns(f"{run}/poison/shards", store, local_rows.column_names).sort_by("key")
    assert remote_rows.equals(local_rows)
    metrics = storage.read_json(f"{run}/attack/eval/metrics.json", store)
    assert metrics["clean_accuracy"] == summary["metrics"]["clean_accuracy"] and metrics["test_rows"] == 100
    assert 0 < metrics["asr_images"] < 100  # only non-target test images count for ASR
    assert "CA " in out and "ASR " in out and "| after UBT |" in out  # the tables a person reads
    report = storage.read_json(f"{run}/defend/report.json", store)
    assert report["selection"]["num_forget"] == 10 and report["selection"]["num_retain"] == 100
    assert report["before"]["clean_accuracy"] == metrics["clean_accuracy"]
    assert report["detection"]["poisons"] == 20 and report["detection"]["rows"] == 384
    assert report["selection"]["scored_rows"] == 384
    # The outputs are on S3, not on this machine's disk, and the cleaned checkpoint loads from there.
    assert summary["phases"]["defend"]["model"] == f"{run}/defend/unlearn/model"
    assert not Path("s3:").exists()
    load_clip(ModelConfig(checkpoint=f"{run}/defend/unlearn/model"), store)
