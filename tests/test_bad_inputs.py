"""Bad input stops with one sentence (UserError, `ubt <cmd>: error: ...`, exit 2, no traceback) or is rejected row by
row with its reason, never lost: rows in = rows out + rows rejected."""

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ubt_ray.cli import main
from ubt_ray.config import load_config
from ubt_ray.errors import ConfigError, UserError

from helpers import caption_shards, image_bytes


def read_all(path) -> list[dict]:
    return pq.read_table([str(p) for p in sorted(Path(path).glob("*.parquet"))]).to_pylist()


def cli_error(capsys, argv: list[str], command: str) -> str:
    """Run the CLI expecting a user error; return its one-line message (the last line of stderr: log lines may
    come before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines[-1].startswith(f"ubt {command}: error: ") and sum("error:" in line for line in lines) == 1, err
    return lines[-1]


# --- config: non-finite numbers, bytes that are not UTF-8, a directory ----------------------------------------

@pytest.mark.parametrize("override, shown", [
    ("train.epochs=.inf", "inf"), ("train.epochs=-.inf", "-inf"), ("train.lr=.nan", "nan"), ("train.lr=nan", "nan"),
    ("experimental.storage.connect_timeout_s=Infinity", "inf"), ("train.epochs=1" + "0" * 400, "inf"),  # beyond float range
    ("experimental.poison.fraction=.NaN", "nan"), ("experimental.score.token_portions=[0.03, .inf]", "inf"),
])
def test_non_finite_numbers_are_refused_in_overrides(capsys, override, shown):
    key = override.split("=")[0]
    err = cli_error(capsys, ["config", override], "config")
    assert f"config key '{key}' must be a finite number, got {shown}" in err


def test_non_finite_numbers_are_refused_in_yaml(capsys, tmp_path):
    for text in ("train:\n  epochs: .inf\n", "experimental:\n  sweep.reduction_factor: .nan\n",
                 "experimental:\n  train.weight_decay: -.inf\n"):
        f = tmp_path / "c.yaml"
        f.write_text(text)
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_config(f)
    f.write_text("train:\n  epochs: 2.5\n  lr: 5e-4\n")
    cfg = load_config(f, ["experimental.poison.fraction=0.5"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.poison.fraction) == (2.5, 5e-4, 0.5)
    assert cfg.run.name == "quickstart" and load_config(None, ["run.name=.inf"]).run.name == "inf"  # a string key


def test_config_file_not_utf8_or_a_directory(capsys, tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  name: caf\xe9\n")
    err = cli_error(capsys, ["config", "-c", str(latin)], "config")
    assert f"config file {latin} is not UTF-8 text" in err and "save it as UTF-8" in err
    err = cli_error(capsys, ["config", "-c", str(tmp_path)], "config")
    assert f"config file {tmp_path} is a directory: pass a YAML file" in err and "does not exist" not in err
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffrun:\n  name: café\n".encode("utf-8"))
    assert load_config(bom).run.name == "café"


# --- checkpoints: corrupt JSON, truncated safetensors, pickled weights -----------------------------------------

def _model_cfg() -> dict:
    import open_clip
    from ubt_ray.core.models import register_packaged_configs
    register_packaged_configs()
    return open_clip.get_model_config("ubt-tiny-vit")


class _Payload:
    """A pickle that, once unpickled, creates the file at `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything torch.loads (unpickles) while it runs."""
    import torch
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail(f"torch.load{a} was called"))
    return calls


def test_bad_checkpoints_are_one_sentence(capsys, tmp_path, no_torch_load):
    from safetensors.torch import save_file
    import torch
    from ubt_ray.config import ModelConfig
    from ubt_ray.core.models import CONFIG_FILE, WEIGHTS_FILE
    from ubt_ray.models import load_clip

    def load(path):
        with pytest.raises(UserError) as e:
            load_clip(ModelConfig(checkpoint=str(path)))
        assert "\n" not in str(e.value)
        return str(e.value)

    corrupt = tmp_path / "json"
    corrupt.mkdir()
    (corrupt / CONFIG_FILE).write_text('{"model_cfg": {"embed_dim": 64,')
    save_file({"w": torch.zeros(2)}, str(corrupt / WEIGHTS_FILE))
    msg = load(corrupt)
    assert f"checkpoint {corrupt}: {CONFIG_FILE} is not valid JSON" in msg and "re-save the checkpoint" in msg

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / CONFIG_FILE).write_text(json.dumps({"model_cfg": _model_cfg(), "preprocess_cfg": {}}))
    save_file({"w": torch.zeros(1000)}, str(truncated / WEIGHTS_FILE))
    whole = (truncated / WEIGHTS_FILE).read_bytes()
    for cut in (len(whole) - 100, 50, 3):
        (truncated / WEIGHTS_FILE).write_bytes(whole[:cut])
        msg = load(truncated)
        assert f"checkpoint {truncated}: {WEIGHTS_FILE} is truncated or not a safetensors file" in msg
        assert "re-copy it" in msg

    # open_clip 3.3's local-dir loading takes open_clip_pytorch_model.bin when no safetensors is there, through
    # torch.load: a pickle can run code. It must be refused without ever being unpickled.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG_FILE).write_text(json.dumps({"model_cfg": _model_cfg(), "preprocess_cfg": {}}))
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": _Payload(marker)}, pickled / "open_clip_pytorch_model.bin")
    import pickle
    pickle.loads(pickle.dumps(_Payload(tmp_path / "probe")))  # the payload works: unpickling creates its file
    assert (tmp_path / "probe").exists()
    msg = load(pickled)
    assert "pickled weights (open_clip_pytorch_model.bin)" in msg and "convert the weights to safetensors" in msg
    assert not marker.exists() and no_torch_load == []

    # Also through the CLI.
    err = cli_error(capsys, ["evaluate", "--model", str(pickled), f"run.output_dir={tmp_path / 'run'}",
                             f"data.test={caption_shards(tmp_path / 'test', rows=4, files=1)}", "evaluate.trigger=null"],
                     "evaluate")
    assert "pickled weights" in err and not marker.exists() and no_torch_load == []


def test_good_checkpoint_still_loads_and_ignores_a_pickle_beside_it(tmp_path, no_torch_load):
    from ubt_ray.config import ModelConfig
    from ubt_ray.core.models import load_checkpoint_dir
    from ubt_ray.models import load_clip, save_clip
    clip = load_clip(ModelConfig(name="ubt-tiny-vit"), seed=0)
    save_clip(clip, str(tmp_path / "ckpt"))
    marker = tmp_path / "PWNED"
    import torch
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "ckpt" / "open_clip_pytorch_model.bin")
    loaded = load_checkpoint_dir(tmp_path / "ckpt")
    assert loaded.image_size == clip.image_size and not marker.exists() and no_torch_load == []


# --- shards: one good and one corrupt Parquet file --------------------------------------------------------------

def test_corrupt_parquet_file_is_named(tmp_path):
    from ubt_ray.shards import count_rows, read_columns, read_shards, shard_schema
    shards = Path(caption_shards(tmp_path / "shards", rows=8, files=2))
    bad = shards / "part-1.parquet"
    good = bad.read_bytes()
    cfg = load_config(None)
    for damaged in (b"not parquet at all" * 10, b"", good[: len(good) // 2]):
        bad.write_bytes(damaged)
        for call in (lambda: shard_schema(str(shards)), lambda: count_rows(str(shards)),
                     lambda: read_columns(str(shards), None, ["key"]), lambda: read_shards(str(shards), cfg)):
            with pytest.raises(UserError) as e:
                call()
            assert str(e.value) == (f"{bad} is not a readable Parquet file: remove it, or re-create it with the "
                                    f"phase that wrote it.")
    # Footer intact, a data page damaged: found when the data is read.
    bad.write_bytes(good[:100] + b"\0" * 200 + good[300:])
    with pytest.raises(UserError, match=f"{bad} is not a readable Parquet file"):
        read_columns(str(shards), None, ["key", "image", "caption"])
    bad.unlink()
    assert count_rows(str(shards)) == 4


def test_describe_io_error_does_not_call_a_damaged_file_missing():
    from ubt_ray.storage import describe_io_error
    e = pa.ArrowInvalid("Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
                        "parquet file.")
    assert describe_io_error("/x/a.parquet", e, None, "read").startswith("/x/a.parquet is not a readable Parquet")
    assert describe_io_error("/x/a.parquet", FileNotFoundError("no such file"), None, "read") == \
        "/x/a.parquet does not exist: check the path (read)."


# --- prepare: webdataset tars -------------------------------------------------------------------------------------

def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(n: int, start: int = 0) -> dict[str, bytes]:
    out = {}
    for i in range(start, start + n):
        out[f"{i:03d}.png"] = image_bytes(seed=i)
        out[f"{i:03d}.txt"] = f"a photo of thing {i}".encode()
    return out


def test_tar_cut_anywhere_loses_no_whole_sample():
    """A 3-sample tar cut at every point: the samples whose next sample's header was read are whole and kept, the
    one being read at the cut is rejected "truncated tar" (it may lack members), a cut inside the first header is
    one "unreadable tar" row, and the intact tar gives its 3 samples."""
    from ubt_ray.phases.prepare import _expand_tars
    members = _samples(3)
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    first_header = {}
    for m in infos:
        first_header.setdefault(m.name.split(".")[0], m.offset)
    last = infos[-1]
    complete = last.offset_data + -(-last.size // 512) * 512 + 512  # through one end-of-archive block
    starts = [first_header["001"] + 512, first_header["002"] + 512, complete]  # when 000, 001, 002 are known whole
    for cut in list(range(0, len(data), 7)) + [complete, len(data)]:
        rows = _expand_tars(pa.table({"path": ["/in/x.tar"], "bytes": [data[:cut]]}), root="/in").to_pylist()
        ok = [r["key"] for r in rows if r["reject_reason"] is None]
        bad = [(r["key"], r["reject_reason"]) for r in rows if r["reject_reason"] is not None]
        assert ok == [f"x/{i:03d}" for i in range(3) if cut >= starts[i]], (cut, rows)
        if cut >= complete:
            assert bad == []
        elif cut < 512:
            assert bad == [("x/<unreadable tar>", "unreadable tar")]
        else:
            assert len(bad) == 1 and bad[0][1] == "truncated tar", (cut, rows)
        for r in rows:
            if r["reject_reason"] is None:
                name = r["key"].split("/")[1]
                assert r["image"] == members[f"{name}.png"] and r["caption"] == members[f"{name}.txt"].decode()
    noise = _expand_tars(pa.table({"path": ["/in/n.tar"], "bytes": [os.urandom(3000)]}), root="/in").to_pylist()
    assert [(r["key"], r["reject_reason"]) for r in noise] == [("n/<unreadable tar>", "unreadable tar")]


def test_webdataset_damage_duplicates_labels_and_encodings(ray_local, tmp_path):
    wds = tmp_path / "wds"
    (wds / "a").mkdir(parents=True)
    (wds / "b").mkdir()
    (wds / "a" / "shard.tar").write_bytes(_tar_bytes(_samples(1)))
    (wds / "b" / "shard.tar").write_bytes(_tar_bytes(_samples(1)))  # the same member names: keys shard/000 before
    full = _tar_bytes(_samples(4, start=10))
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "012.png")
    (wds / "cut.tar").write_bytes(full[: cut.offset_data + cut.size // 2])  # in the middle of 012.png
    (wds / "noise.tar").write_bytes(os.urandom(4096))
    odd = _samples(4, start=20)
    odd.update({"020.cls": b"notanint", "021.cls": b"-7", "022.txt": b"caf\xe9 cr\xe8me", "023.cls": b"3"})
    (wds / "odd.tar").write_bytes(_tar_bytes(odd))
    out = tmp_path / "out"
    # main returns 0, 2 (a UserError) or raises: 0 means no traceback and no user error.
    assert main(["prepare", "webdataset", f"prepare.input={wds}", f"prepare.output={out}"]) == 0
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert rows["rejected_by_reason"] == {"truncated tar": 1, "unreadable tar": 1, "label not an integer": 1,
                                          "label negative": 1, "caption not UTF-8": 1}
    assert rows["rows_in"] == 10 and rows["rows_out"] == 5 and rows["rows_in"] == rows["rows_out"] + rows["rows_rejected"]
    assert rows["rejected_examples"]["truncated tar"] == ["cut/012"]
    assert rows["rejected_examples"]["unreadable tar"] == ["noise/<unreadable tar>"]
    written = read_all(out)
    assert sorted(r["key"] for r in written) == ["a/shard/000", "b/shard/000", "cut/010", "cut/011", "odd/023"]
    assert {r["key"]: r["label"] for r in written}["odd/023"] == 3
    assert "reject_reason" not in pq.read_schema(next(out.glob("*.parquet"))).names


# --- prepare: CSV -----------------------------------------------------------------------------------------------

def test_csv_paths_labels_and_encodings(ray_local, tmp_path):
    folder = tmp_path / "csvdir"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "good.png").write_bytes(image_bytes())
    secret = tmp_path / "secret.png"  # a valid image outside the CSV's folder: accepted only if it were read
    secret.write_bytes(image_bytes(seed=5))
    lines = [b"image,caption,label",
             b"img/good.png,a coat,4",
             b"img/good.png,caf\xe9 au lait,1",
             b"img/good.png,a bag,notanint",
             b"img/good.png,a bag,-7",
             b"/etc/passwd,a passwd,1",
             b"../../../../etc/hostname,a hostname,1",
             str(secret).encode() + b",a secret,1",
             b"../secret.png,a secret,1",
             str(folder / "img" / "good.png").encode() + b",absolute inside,2",
             b"img/./../img/good.png,dotted inside,3",
             b"img/good.png,no label,"]
    csv = folder / "train.csv"
    csv.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert main(["prepare", "csv", f"prepare.input={csv}", f"prepare.output={out}", "prepare.label_column=label"]) == 0
    rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert rows["rejected_by_reason"] == {"caption not UTF-8": 1, "label not an integer": 1, "label negative": 1,
                                          "image path outside the CSV's folder": 4}
    assert rows["rows_in"] == 11 and rows["rows_out"] == 4 and rows["rows_in"] == rows["rows_out"] + rows["rows_rejected"]
    written = {r["caption"]: r["label"] for r in read_all(out)}
    assert written == {"a coat": 4, "absolute inside": 2, "dotted inside": 3, "no label": None}

    # prepare.allow_absolute_paths lets absolute paths out of the folder, never relative ones.
    (folder / "abs.csv").write_text(f"image,caption\n{secret},a secret\n../secret.png,a secret\n")
    out2 = tmp_path / "out2"
    assert main(["prepare", "csv", f"prepare.input={folder / 'abs.csv'}", f"prepare.output={out2}",
                 "experimental.prepare.allow_absolute_paths=true"]) == 0
    rows = json.loads((out2 / "manifest.json").read_text())["rows"]
    assert rows["rows_out"] == 1 and rows["rejected_by_reason"] == {"image path outside the CSV's folder": 1}


def test_csv_path_rule():
    from ubt_ray.phases.prepare import _join_relative
    outside = (None, "image path outside the CSV's folder")
    assert _join_relative("/d", "img/a.png") == ("/d/img/a.png", None)
    assert _join_relative("/d", "/etc/passwd") == outside
    assert _join_relative("/d", "/etc/passwd", allow_absolute=True) == ("/etc/passwd", None)
    assert _join_relative("/d", "../x.png", allow_absolute=True) == outside
    assert _join_relative("/d", "/d/../e/x.png") == outside and _join_relative("/dd", "/d/x.png") == outside
    assert _join_relative("s3://b/p", "s3://b/p/img/a.png") == ("s3://b/p/img/a.png", None)
    assert _join_relative("s3://b/p", "img/a.png") == ("s3://b/p/img/a.png", None)
    assert _join_relative("s3://b/p", "s3://b/q/a.png") == outside
    assert _join_relative("s3://b/p", "s3://other/p/a.png") == outside
    assert _join_relative("s3://b/p", "../q/a.png", allow_absolute=True) == outside
    assert _join_relative("s3://b/p", "s3://other/a.png", allow_absolute=True) == ("s3://other/a.png", None)
    assert _join_relative("/d", "s3://b/a.png") == outside  # a local CSV's folder holds no S3 object
    assert _join_relative("/d", "") == (None, None)


def test_allow_absolute_paths_key():
    assert load_config(None).prepare.allow_absolute_paths is False
    with pytest.raises(ConfigError, match="'experimental.prepare.allow_absolute_paths' must be true/false"):
        load_config(None, ["experimental.prepare.allow_absolute_paths=maybe"])
