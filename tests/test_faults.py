"""Faults a run must survive exactly: a scoring actor killed mid-run (Ray restarts it and retries its batch, which
must be counted once), and a training run stopped after a checkpoint and resumed (it must go on with the rows
where it stopped, not from the epoch's first batch)."""

import json
import os
import shutil
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.train
from ray.util.state import list_actors

import ubt_ray.phases.score as score_phase
from ubt_ray import train_loop
from ubt_ray.cli import main
from ubt_ray.config import load_config
from ubt_ray.core.models import WEIGHTS_FILE
from ubt_ray.manifest import RowCounts
from ubt_ray.phases.train import train
from ubt_ray.shards import batch_identity, start_ledger

from helpers import BROKEN_KEY, caption_shards, last_json, scoring_input



def test_a_batch_reported_again_is_counted_once(ray_local):
    """What a retried task or a restarted actor does to the ledger: the same batch reported twice (here by two
    sources) counts once, for the source that reported it last; other batches add up."""
    def counts(rows: int, rejected: int = 0) -> RowCounts:
        c = RowCounts(rows_in=rows, rows_out=rows - rejected)
        for i in range(rejected):
            c.reject("image undecodable", f"bad-{i}")
        return c

    first = pa.table({"key": ["a", "b", "c"]})
    second = pa.table({"key": ["d", "e"]})
    assert batch_identity(first) == batch_identity(pa.table({"key": ["a", "b", "c"], "x": [1, 2, 3]}))
    assert batch_identity(first) not in (batch_identity(second), batch_identity(first.slice(0, 2)),
                                         batch_identity(pa.table({"key": ["ab", "c", ""]})))
    ledger = start_ledger()
    ray.get([ledger.add.remote(batch_identity(first), counts(3, 1), ["a"], "actor-1", node="node-1"),
             ledger.add.remote(batch_identity(second), counts(2), ["d", "e"], "actor-2", node="node-2")])
    assert ray.get(ledger.rows_by_node.remote()) == {"node-1": 3, "node-2": 2}
    # the retry, on another node (its first node lost)
    ray.get(ledger.add.remote(batch_identity(first), counts(3, 1), ["a"], "actor-2", node="node-2"))
    total, keys = ray.get(ledger.get_with_keys.remote())
    assert (total.rows_in, total.rows_out, total.rejected) == (5, 4, {"image undecodable": 1})
    assert sorted(keys) == ["a", "d", "e"] and ray.get(ledger.rows_by_source.remote()) == [5]
    assert ray.get(ledger.rows_by_node.remote()) == {"node-2": 5}
    ray.kill(ledger)


def _gcs() -> str:
    """This test's Ray (the State API would refuse to guess among other local Rays)."""
    return ray.get_runtime_context().gcs_address


def _kill_the_scorer_after_its_first_batch(ledgers: list, killed: dict) -> None:
    """Once the scoring actor has reported a first batch to the phase's ledger (and before it has scored all
    rows), SIGKILL its process, as an out-of-memory kill or a lost node would."""
    deadline = time.time() + 180
    try:
        while not ledgers and time.time() < deadline:
            time.sleep(0.05)
        counted = 0
        while time.time() < deadline:
            counted = ray.get(ledgers[0].get.remote()).rows_in
            if counted:
                break
            time.sleep(0.05)
        actors = [a for a in list_actors(address=_gcs(), filters=[("state", "=", "ALIVE")], detail=True)
                  if "Scorer" in a.class_name]
        assert len(actors) == 1, actors
        killed.update(actor_id=actors[0].actor_id, pid=actors[0].pid, rows_counted=counted)
        os.kill(actors[0].pid, signal.SIGKILL)
    except BaseException as e:  # noqa: BLE001 - reported by the test
        killed["error"] = repr(e)


def test_score_survives_its_scoring_actor_killed_mid_run(ray_local, tmp_path, monkeypatch, capsys):
    """`ubt score` whose scoring actor is killed after its first batch: Ray restarts the actor and retries the
    batch it held; the run ends well, every row is scored once, and the row accounting counts every row once
    (the retried batch had been counted twice: "rows scored but written; this is a bug", and no manifest)."""
    rows = 320
    data, model = scoring_input(tmp_path, rows, files=2, poison_every=50)
    ledgers: list = []

    def watched_ledger():  # the phase's own ledger, its handle kept for the killer thread
        ledgers.append(start_ledger())
        return ledgers[-1]

    monkeypatch.setattr(score_phase, "start_ledger", watched_ledger)
    killed: dict = {}
    killer = threading.Thread(target=_kill_the_scorer_after_its_first_batch, args=(ledgers, killed), daemon=True)
    out = tmp_path / "scores"
    killer.start()
    code = main(["score", "--model", str(model), f"defend.data={data}", f"experimental.score.output={out}",
                 # Many small batches, so that the kill lands with most of them still to score.
                 "experimental.score.batch_size=8", "score.num_actors=1", "experimental.score.threads_per_actor=1"])
    killer.join(timeout=60)
    printed = capsys.readouterr()
    assert "error" not in killed, killed["error"]
    assert 0 < killed["rows_counted"] < rows // 2, killed  # mid-run: rows were scored, and most were still to come
    restarts = [a.num_restarts for a in list_actors(address=_gcs(), filters=[("actor_id", "=", killed["actor_id"])],
                                                    detail=True)]
    assert restarts and restarts[0] >= 1, restarts  # Ray restarted the killed actor, which scored the rest
    assert code == 0, printed.err[-3000:]
    summary = last_json(printed.out)
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (rows, rows - 1, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["rows_in"] == rows == manifest["rows"]["rows_out"] + manifest["rows"]["rows_rejected"]
    assert manifest["rows"]["rejected_examples"] == {"image undecodable (UnidentifiedImageError)": [BROKEN_KEY]}
    assert sum(manifest["rows_per_actor"]) == rows
    assert list(manifest["rows_per_node"].values()) == [rows]  # one node, this test's
    keys = pq.read_table(out / "table", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == rows - 1 and BROKEN_KEY not in keys
    assert json.loads((out / "detection.json").read_text())["rows"] == rows - 1


class _Stopped(Exception):
    """The end of a run stopped after a checkpoint, as a killed driver would stop it."""


def test_resumed_training_goes_on_with_the_rows_where_it_stopped(ray_local, tmp_path, monkeypatch):
    """A run stopped after its checkpoint in the middle of its second epoch, then resumed from that checkpoint,
    trains on exactly the batches, step for step, of the same run left uninterrupted, and ends with the same
    weights to the last bit. The resumed run passes over the epoch's batches already trained without decoding
    them. (It had restarted the epoch's data from its first batch: half an epoch trained twice, half never.)

    In process (trainer.num_workers=0), for speed: Ray Train's in-process mode does not hand a rerun its
    checkpoint, so the stopped run's last checkpoint is handed to the resumed one through ray.train.get_checkpoint,
    which the loop reads as it does under Ray Train (tests/test_train.py kills and resumes a two-worker run)."""
    data = caption_shards(tmp_path / "shards", rows=128, files=1)
    steps_per_epoch, stop_at = 8, 12  # checkpoints every 4 steps: the third is half-way through the second epoch
    overrides = [f"data.train={data}", "trainer.num_workers=0", "train.batch_size=16", "train.epochs=2",
                 "experimental.trainer.checkpoints_per_epoch=2", "experimental.train.warmup_steps=2", "experimental.trainer.threads_per_worker=1"]
    seen: list[list[str]] = []  # the keys of each step's batch
    decoded: list[int] = []     # the rows of each decoded batch

    def recording_objective(*args, **kwargs):
        objective = real_build(*args, **kwargs)

        def run(model, batch):
            seen.append(list(batch.keys))
            return objective(model, batch)
        return run

    def counting_decode(images, size):
        decoded.append(len(images))
        return real_decode(images, size)

    real_build, real_decode, real_report = train_loop.build_objective, train_loop.decode_images, train_loop._report
    monkeypatch.setattr(train_loop, "build_objective", recording_objective)
    monkeypatch.setattr(train_loop, "decode_images", counting_decode)

    whole = train(load_config(None, [*overrides, f"experimental.train.output={tmp_path / 'whole'}"]))
    assert whole.steps == 2 * steps_per_epoch and len(seen) == whole.steps
    uninterrupted, seen[:] = list(seen), []

    saved = tmp_path / "last_checkpoint"

    def stop_after(clip, model, optimizer, scaler, state, metrics, rank, checkpoint=True, in_process=False):
        real_report(clip, model, optimizer, scaler, state, metrics, rank, checkpoint, in_process)
        if checkpoint and state["step"] == stop_at:
            shutil.copytree(train_loop._IN_PROCESS_CHECKPOINTS[-1], saved)
            raise _Stopped()

    cfg = load_config(None, [*overrides, f"experimental.train.output={tmp_path / 'resumed'}"])
    monkeypatch.setattr(train_loop, "_report", stop_after)
    with pytest.raises(_Stopped):
        train(cfg)
    assert seen == uninterrupted[:stop_at]  # the same batches in the same order, run after run
    before, seen[:], decoded[:] = list(seen), [], []
    monkeypatch.setattr(train_loop, "_report", real_report)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(saved)))
    resumed = train(cfg)
    assert resumed.resumed_from_step == stop_at and resumed.steps == whole.steps
    assert before + seen == uninterrupted  # each step on the rows it had in the uninterrupted run
    assert decoded == [16] * (whole.steps - stop_at)  # the batches passed over were not decoded
    weights = [(tmp_path / run / "model" / WEIGHTS_FILE).read_bytes() for run in ("whole", "resumed")]
    assert weights[0] == weights[1]  # Adam's state and the step (so the learning rate) come with the checkpoint
