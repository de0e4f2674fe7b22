"""CleanCLIP through real Ray Train with DDP over two workers, for a few steps from a given checkpoint, on a
seeded sample of clean pairs, evaluated like every other phase; its checkpoint loads with plain open_clip.
(Fine-tuning is the CLIP objective of the training loop, tested in test_train.py; both baselines run again
through `ubt compare` in test_defend.py, which checks their checkpoints too.)"""

import json

import open_clip
import pytest
import torch

from ubt_ray.cli import main
from ubt_ray.config import ModelConfig
from ubt_ray.models import load_clip, save_clip

from helpers import fashion_mnist_shards, last_json


@pytest.fixture(scope="module")
def start(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    model = root / "start"
    save_clip(load_clip(ModelConfig(), seed=1), str(model))
    overrides = [f"run.output_dir={root}", f"experimental.baseline.model={model}",
                 f"data.clean_train={fashion_mnist_shards(root / 'clean', rows=600)}",
                 f"data.test={fashion_mnist_shards(root / 'test', split='test', rows=200)}",
                 "experimental.baseline.rows=300", "experimental.baseline.epochs=1", "experimental.baseline.batch_size=64", "experimental.baseline.warmup_steps=1",
                 "experimental.baseline.lr=1e-4", "trainer.num_workers=2", "experimental.trainer.threads_per_worker=1"]
    return root, model, overrides


def test_cleanclip_runs_on_ray_train_and_writes_an_open_clip_checkpoint(start, capsys):
    root, model, overrides = start
    kind = "cleanclip"
    capsys.readouterr()
    assert main(["baseline", kind, *overrides]) == 0
    out = last_json(capsys.readouterr().out)
    # About 300 of the 600 clean rows are sampled; one epoch of them at batch 64 over two workers.
    assert 200 <= out["clean_rows"] <= 400 and out["steps"] == out["clean_rows"] // 64
    assert out["clean_samples"] == out["steps"] * 64
    assert 0 <= out["clean_accuracy"] <= 1 and out["attack_success_rate"] is None
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out['model']}")
    original, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model}")
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), original.state_dict().values()))
    manifest = json.loads((root / "baseline" / kind / "manifest.json").read_text())
    assert manifest["training"]["objective"] == "cleanclip"
    assert json.loads((root / "baseline" / kind / "eval" / "metrics.json").read_text())["test_rows"] == 200
    assert out["reused"] is False


def test_a_finished_baseline_is_reused_only_with_the_same_settings(start, capsys):
    """Run first when the cleanclip test did not (e.g. run alone); then the same command reads the finished
    baseline back (same model files, metrics and samples), and another learning rate trains again (in process, to
    be quick)."""
    root, model, overrides = start
    capsys.readouterr()
    assert main(["baseline", "cleanclip", *overrides]) == 0
    first = last_json(capsys.readouterr().out)
    weights = root / "baseline" / "cleanclip" / "model" / "open_clip_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert main(["baseline", "cleanclip", *overrides]) == 0
    printed = capsys.readouterr()
    again = last_json(printed.out)
    assert again["reused"] is True and "reused the finished baseline" in printed.err
    assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in first.items() if k != "reused"}
    assert weights.stat().st_mtime_ns == written
    assert main(["baseline", "cleanclip", *overrides, "experimental.baseline.lr=2e-4", "trainer.num_workers=0"]) == 0
    assert last_json(capsys.readouterr().out)["reused"] is False and weights.stat().st_mtime_ns != written
