"""Every path may be s3://: prepare and checkpoints round-trip through a real S3 server (moto) over HTTP."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ubt_ray import storage
from ubt_ray.config import ModelConfig, load_config
from ubt_ray.errors import UserError
from ubt_ray.models import load_clip, save_clip
from ubt_ray.phases.prepare import prepare
from ubt_ray.shards import read_columns

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
