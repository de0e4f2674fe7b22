"""Every path may be s3://: prepare, checkpoints and the whole pipeline round-trip through a real S3 server (moto)
over HTTP."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ubt_ray import storage
from ubt_ray.cli import main
from ubt_ray.config import ModelConfig, load_config
from ubt_ray.errors import UserError
from ubt_ray.models import load_clip, save_clip
from ubt_ray.phases.prepare import prepare
from ubt_ray.shards import read_columns

from helpers import fashion_mnist_shards, last_json

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_prepare_to_s3_gives_same_rows_as_local(ray_local, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    local = load_config(None, [f"run.output_dir={tmp_path}"])
    remote = load_config(None, [f"run.output_dir=s3://{bucket}/run", f"storage.endpoint_url={endpoint}"])
    prepare(local)
    result = prepare(remote)
    assert result.rows.rows_out == 70000
    manifest = storage.read_json(f"s3://{bucket}/run/data/manifest.json", remote.storage)
    assert manifest["rows"]["rows_out"] == 70000 and manifest["rows"]["rows_in"] == 70000
    for split in ("test", "train"):
        want = pq.read_table(str(tmp_path / "data" / split)).sort_by("key")
        got = read_columns(f"s3://{bucket}/run/data/{split}", remote.storage, want.column_names).sort_by("key")
        assert got.to_pylist() == want.to_pylist()


def test_csv_with_images_on_s3(ray_local, s3_bucket):
    from helpers import image_bytes
    endpoint, bucket = s3_bucket
    cfg = load_config(None, [f"storage.endpoint_url={endpoint}", "prepare.source=csv",
                             f"prepare.input=s3://{bucket}/in/pairs.csv", f"prepare.output=s3://{bucket}/out"])
    storage.write_bytes(f"s3://{bucket}/in/a.png", image_bytes(), cfg.storage)
    storage.write_bytes(f"s3://{bucket}/in/pairs.csv", b"image,caption\na.png,a coat\nb.png,a bag\n", cfg.storage)
    result = prepare(cfg)
    assert result.rows.rows_out == 1 and result.rows.rejected == {"image missing": 1}
    assert read_columns(f"s3://{bucket}/out", cfg.storage, ["caption"]).column("caption").to_pylist() == ["a coat"]


@pytest.mark.slow
def test_checkpoint_round_trip_through_s3(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = load_config(None, [f"storage.endpoint_url={endpoint}"])
    clip = load_clip(ModelConfig(), seed=1)
    save_clip(clip, f"s3://{bucket}/ckpt/model", cfg.storage)
    again = load_clip(ModelConfig(checkpoint=f"s3://{bucket}/ckpt/model"), cfg.storage)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clip.model.encode_image(x), again.model.encode_image(x))


def test_unreachable_endpoint_is_one_sentence(ray_local):
    from conftest import free_port
    cfg = load_config(None, [f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "experimental.storage.connect_timeout_s=1",
                             "prepare.source=csv", "prepare.input=s3://bucket/pairs.csv"])
    with pytest.raises(UserError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert msg.startswith("cannot reach S3 endpoint http://127.0.0.1:") and "storage.endpoint_url" in msg
    assert "\n" not in msg


def test_missing_bucket_and_bad_endpoint(s3_server):
    cfg = load_config(None, [f"storage.endpoint_url={s3_server}"])
    with pytest.raises(UserError, match="does not exist"):
        storage.read_bytes("s3://no-such-bucket-here/x.csv", cfg.storage)
    with pytest.raises(UserError, match="is not a URL"):
        storage.exists("s3://b/x", load_config(None, ["storage.endpoint_url=localhost9000"]).storage)


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
