"""Outputs are never someone else's files, never half-written, never read before they are finished; a training
checkpoint's state is never unpickled as code; Ctrl-C ends with one line."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ubt_ray import storage
from ubt_ray.cli import main
from ubt_ray.errors import UserError
from ubt_ray.train_loop import TRAIN_STATE_FILE, load_train_state

from helpers import caption_shards, image_bytes

REPO = Path(__file__).resolve().parent.parent


def _csv_input(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    for i in range(4):
        (folder / "img" / f"{i}.png").write_bytes(image_bytes(seed=i))
    csv = folder / "train.csv"
    csv.write_text("image,caption\n" + "".join(f"img/{i}.png,a photo of a coat number {i}.\n" for i in range(4)))
    return csv


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, *needles: str, ray_lines: bool = False) -> str:
    """The CLI's error: one line and no traceback (with `ray_lines`, the last line, after what Ray's workers
    logged to the driver's stderr)."""
    # ubt's own log lines ("HH:MM:SS [phase] started ...") may come before the error.
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if not re.match(r"\d\d:\d\d:\d\d ", line))
    if ray_lines:
        err = err.splitlines()[-1]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_an_existing_folder_is_never_emptied(ray_local, tmp_path, capsys):
    """prepare.output at a folder of the user's, or at the input's own folder: refused, nothing touched; the
    phase's own earlier output is replaced; --overwrite empties a foreign folder on request."""
    csv = _csv_input(tmp_path / "in")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before_input, before_mine = _files(tmp_path / "in"), _files(mine)
    base = ["prepare", "csv", f"prepare.input={csv}"]

    assert main(base + [f"prepare.output={mine}"]) == 2
    _one_line_error(capsys, str(mine), "ubt did not write", "--overwrite")
    assert main(base + [f"prepare.output={csv.parent}"]) == 2
    _one_line_error(capsys, "ubt did not write")
    assert _files(mine) == before_mine and _files(tmp_path / "in") == before_input

    out = tmp_path / "out"
    assert main(base + [f"prepare.output={out}"]) == 0
    first = json.loads((out / "manifest.json").read_text())
    assert first["rows"]["rows_out"] == 4 and (out / storage.MARKER).is_file()
    assert main(base + [f"prepare.output={out}"]) == 0  # its own output: replaced
    assert json.loads((out / "manifest.json").read_text())["rows"]["rows_out"] == 4
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]

    # Another phase's output is not this phase's either.
    other = tmp_path / "scores"
    storage.claim_output(str(other), "score")
    storage.release_output(str(other))
    assert main(base + [f"prepare.output={other}"]) == 2
    _one_line_error(capsys, "holds the output of `ubt score`")

    assert main(base + [f"prepare.output={mine}", "--overwrite"]) == 0
    assert not (mine / "thesis.tex").exists() and (mine / "manifest.json").is_file()
    capsys.readouterr()


def test_an_unfinished_output_is_not_read_as_finished(ray_local, tmp_path, capsys):
    """A phase that dies after writing shards but before its manifest leaves an output that later phases refuse,
    naming it; the same phase run again finishes it."""
    csv = _csv_input(tmp_path / "in")
    out = tmp_path / "prepared"
    storage.claim_output(str(out), "prepare")
    caption_shards(out, rows=64)  # what a killed prepare could have left: shards, no manifest
    storage.release_output(str(out))  # ... in another process, which is gone
    assert main(["poison", f"data.clean_train={out}", f"experimental.poison.output={tmp_path / 'p'}",
                 "poison.num_poisons=1"]) == 2
    _one_line_error(capsys, f"{out} is part of an unfinished output of `ubt prepare`", "run it again")
    with pytest.raises(UserError, match="unfinished output"):
        storage.require_finished(str(out / "sub" / "deeper"))

    assert main(["prepare", "csv", f"prepare.input={csv}", f"prepare.output={out}"]) == 0
    storage.require_finished(str(out))  # finished now
    storage.require_finished(str(tmp_path / "in"))  # not ubt's: passes as it is
    capsys.readouterr()


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    """replacing_dir: the old folder stays whole until the new one is complete; a failure leaves the old one."""
    target = tmp_path / "shards"
    target.mkdir()
    (target / "part-0.parquet").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.replacing_dir(str(target)) as into:
            Path(into).mkdir()
            (Path(into) / "part-0.parquet").write_bytes(b"half")
            assert (target / "part-0.parquet").read_bytes() == b"old"
            raise RuntimeError("killed")
    assert _files(target) == {"part-0.parquet": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    with storage.replacing_dir(str(target)) as into:
        Path(into).mkdir()
        (Path(into) / "part-0.parquet").write_bytes(b"new")
    assert _files(target) == {"part-0.parquet": b"new"}


class _Planted:
    """A pickle that would create a file when unpickled: what an attacker plants in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    state = tmp_path / TRAIN_STATE_FILE
    with open(state, "wb") as f:
        pickle.dump({"optimizer": _Planted(str(marker)), "state": {"step": 1}}, f)
    torch.save({"optimizer": _Planted(str(marker))}, tmp_path / "planted_torch.pt")
    for path in (state, tmp_path / "planted_torch.pt"):
        with pytest.raises(UserError, match="not plain tensors and numbers"):
            load_train_state(path)
    assert not marker.exists()
    # A real training state (AdamW after a step, a GradScaler, counters) still loads.
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    real = {"optimizer": opt.state_dict(), "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict(),
            "state": {"step": 1, "samples": 64, "resumed_from_step": 0}}
    torch.save(real, tmp_path / "real.pt")
    loaded = load_train_state(tmp_path / "real.pt")
    assert loaded["state"] == real["state"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], real["optimizer"]["state"][0]["exp_avg"])


def test_resuming_from_a_planted_checkpoint_stops_with_one_sentence(ray_local, tmp_path, capsys, monkeypatch):
    """The resume path itself: a run's checkpoint gets a planted train_state.pt; the run that resumes from it
    stops with one sentence, and the planted code never runs. In process for speed: Ray Train's in-process mode
    does not hand a rerun its checkpoint, so it is handed over through ray.train.get_checkpoint, which the loop
    reads as it does under Ray Train (tests/test_faults.py resumes the same way; tests/test_train.py kills and
    resumes a two-worker run)."""
    import shutil

    import ray.train

    from ubt_ray import train_loop
    data = caption_shards(tmp_path / "shards", rows=64, files=1)
    args = ["train", f"data.train={data}", "train.batch_size=32", "experimental.train.steps=2", "experimental.trainer.checkpoints_per_epoch=1",
            "experimental.train.warmup_steps=1", "trainer.num_workers=0", "experimental.trainer.threads_per_worker=1"]
    saved, real_report = tmp_path / "checkpoint", train_loop._report

    def keep_last(*a, **k):
        real_report(*a, **k)
        if train_loop._IN_PROCESS_CHECKPOINTS:
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(train_loop._IN_PROCESS_CHECKPOINTS[-1], saved)
    monkeypatch.setattr(train_loop, "_report", keep_last)
    assert main(args + [f"experimental.train.output={tmp_path / 'first'}"]) == 0
    marker = tmp_path / "pwned"
    with open(saved / TRAIN_STATE_FILE, "wb") as f:
        pickle.dump({"optimizer": _Planted(str(marker)), "state": {"step": 1}}, f)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(saved)))
    capsys.readouterr()
    assert main(args + [f"experimental.train.output={tmp_path / 'resumed'}"]) == 2
    _one_line_error(capsys, "ubt train: error:", TRAIN_STATE_FILE, "not plain tensors and numbers", ray_lines=True)
    assert not marker.exists()


@pytest.mark.ray  # `ubt prepare` in a subprocess starts its own Ray
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="dataset-fashion-mnist missing")
def test_ctrl_c_ends_with_one_line_and_nothing_finished(tmp_path):
    """SIGINT in the middle of `ubt prepare` (its own local Ray): exit 130, our one line last, no traceback, and
    an output that later phases refuse as unfinished."""
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "ubt_ray.cli", "prepare", "fashion-mnist",
                             f"prepare.output={out}", "experimental.ray.num_cpus=2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""},
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / storage.MARKER).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(8)  # into Ray's start or the first writes: both must end the same way
    os.kill(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = err.strip().splitlines()
    assert proc.returncode == 130, err[-3000:]
    assert lines[-1].startswith("ubt prepare: interrupted;") and "Traceback" not in err, err[-3000:]
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    with pytest.raises(UserError, match="unfinished output of `ubt prepare`"):
        storage.require_finished(str(out / "train"))
