"""`ubt prepare` through real Ray Data: Fashion-MNIST, CSV and webdataset sources, with every rejection counted."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ubt_ray.config import load_config
from ubt_ray.core.captions import TEMPLATES
from ubt_ray.errors import UserError
from ubt_ray.phases.prepare import prepare
from ubt_ray.shards import read_shards

from helpers import image_bytes

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_all(path) -> list[dict]:
    return pq.read_table([str(p) for p in sorted(Path(path).glob("*.parquet"))]).to_pylist()


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_writes_70000_rows(ray_local, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "experimental.prepare.rows_per_file=20000"])
    result = prepare(cfg)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["rows"]["rows_in"] == 70000 and manifest["rows"]["rows_out"] == 70000
    assert manifest["rows"]["rows_rejected"] == 0
    assert manifest["splits"]["train"]["rows_out"] == 60000 and manifest["splits"]["test"]["rows_out"] == 10000
    assert manifest["config"]["prepare"]["rows_per_file"] == 20000 and manifest["versions"]["ray"] == "2.60.0"
    test = pq.read_table(str(tmp_path / "data" / "test")).to_pydict()  # a directory of shards only
    assert len(set(test["key"])) == 10000 and set(test["label"]) == set(range(10))
    # Captions come from at least 6 templates and name the row's true class.
    used = {next(t for t in TEMPLATES if c.startswith(t.split("{}")[0])) for c in test["caption"][:500]}
    assert len(used) >= 6
    names = cfg.data.class_names
    assert all(names[y] in c for y, c in zip(test["label"][:500], test["caption"][:500]))
    assert result.rows.rows_out == 70000


def _csv_fixture(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    (img / "good.png").write_bytes(image_bytes())
    (img / "good.jpg").write_bytes(image_bytes(mode="RGB", fmt="JPEG"))
    (img / "broken.png").write_bytes(b"\x89PNG not really")
    (img / "cmyk.jpg").write_bytes(image_bytes(mode="CMYK", fmt="JPEG"))
    (img / "tiny.png").write_bytes(image_bytes(size=(4, 4)))
    rows = ["image,caption,label",
            "img/good.png,a photo of a coat.,4",
            "img/good.jpg,\"a photo of a bag, on a table.\",8",
            "img/broken.png,a photo of a dress.,3",
            "img/cmyk.jpg,a photo of a shirt.,6",
            "img/tiny.png,a photo of a sandal.,5",
            "img/missing.png,a photo of a sneaker.,7",
            "img/good.png,,1",
            "img/good.png,   ,1"]
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_csv_rejections_are_counted(ray_local, tmp_path):
    csv = _csv_fixture(tmp_path)
    out = tmp_path / "shards"
    cfg = load_config(None, ["prepare.source=csv", f"prepare.input={csv}", f"prepare.output={out}",
                             "prepare.label_column=label"])
    result = prepare(cfg)
    rows = result.manifest["rows"]
    assert rows["rows_in"] == 8 and rows["rows_out"] == 2 and rows["rows_rejected"] == 6
    assert rows["rejected_by_reason"] == {"caption empty": 2, "image missing": 1, "image mode CMYK not allowed": 1,
                                          "image too small": 1, "image undecodable": 1}
    written = read_all(out)
    assert sorted(r["caption"] for r in written) == ["a photo of a bag, on a table.", "a photo of a coat."]
    assert sorted(r["label"] for r in written) == [4, 8]
    assert (out / "manifest.json").exists()


def test_csv_whole_input_errors(ray_local, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("filepath,title\nimg/a.png,a coat\n")
    cfg = load_config(None, ["prepare.source=csv", f"prepare.input={csv}", f"prepare.output={tmp_path / 'o'}"])
    with pytest.raises(UserError, match=r"has no column\(s\) image, caption .*prepare.image_column"):
        prepare(cfg)
    csv.write_text("image,caption\n")
    with pytest.raises(UserError, match="has a header but no rows"):
        prepare(cfg)
    cfg = load_config(None, ["prepare.source=csv", f"prepare.input={tmp_path / 'nope.csv'}"])
    with pytest.raises(UserError, match="nope.csv does not exist: set prepare.input"):
        prepare(cfg)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_rejections_are_counted(ray_local, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    _tar(shards / "00000.tar", {"000.jpg": image_bytes(mode="RGB", fmt="JPEG"), "000.txt": b"a red coat",
                                "000.cls": b"4",
                                "001.png": image_bytes(seed=1), "001.txt": b"a bag",
                                "002.jpg": image_bytes(mode="RGB", fmt="JPEG")})
    _tar(shards / "00001.tar", {"100.txt": b"no image here", "101.jpg": b"garbage", "101.txt": b"broken"})
    (shards / "00002.tar").write_bytes(b"this is not a tar file at all" * 20)
    out = tmp_path / "out"
    cfg = load_config(None, ["prepare.source=webdataset", f"prepare.input={shards}", f"prepare.output={out}"])
    result = prepare(cfg)
    rows = result.manifest["rows"]
    assert rows["rows_in"] == 6 and rows["rows_out"] == 2
    assert rows["rejected_by_reason"] == {"caption missing": 1, "image missing": 1, "image undecodable": 1,
                                          "unreadable tar": 1}
    written = {r["key"]: r for r in read_all(out)}
    assert set(written) == {"00000/000", "00000/001"}
    assert written["00000/000"]["label"] == 4 and written["00000/001"]["label"] is None


def test_read_shards_checks_columns_and_emptiness(ray_local, tmp_path):
    import pyarrow as pa
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"key": ["a"], "image": [b"x"]}), str(tmp_path / "bad" / "part.parquet"))
    cfg = load_config(None)
    with pytest.raises(UserError, match=r"lack column\(s\) caption"):
        read_shards(str(tmp_path / "bad"), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no Parquet shards under"):
        read_shards(str(tmp_path / "empty"), cfg)
