"""Two Ray nodes on this machine, a head (the driver's) and a second node, each with its own CPUs: the scoring
spreads its actors over both and counts the rows each node took, and losing the second node in the middle of a
score or of a training with one worker per node costs time, not rows: every key is scored exactly once, with
the scores of an unfaulted run, and the training goes on from its last checkpoint over the rows, step for step,
of an uninterrupted run."""

import gc
import json
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import ray.train
from ray import cloudpickle
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

import ubt_ray.phases.score as score_phase
from ubt_ray.cli import main
from ubt_ray.config import ModelConfig, load_config
from ubt_ray.core.models import WEIGHTS_FILE
from ubt_ray.core.objectives import build_objective
from ubt_ray.models import load_clip, save_clip
from ubt_ray.shards import start_ledger
from ubt_ray.train_loop import FitSpec, fit

from helpers import caption_shards, free_port, registered_checkpoints, small_clip_config, write_random_clip

pytestmark = pytest.mark.ray

# Logical CPUs: the head holds a 2-CPU training worker and one CPU for Ray Data's tasks; the second node holds
# the other training worker (so a worker per node), or one of the two scoring actors.
HEAD_CPUS, NODE_CPUS = 3, 2
# The workers in Ray Train's processes call this module's recording objective: sent by value, since they
# cannot import a test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    """A head node, which this process's driver joins, and a second node, on this machine."""
    if ray.is_initialized():
        ray.shutdown()
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None

    def put_back_address_file():
        # Cluster records its head as this machine's current Ray, which a plain ray.init() of another process
        # (another test session, `ubt`) would then join instead of starting its own.
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)

    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "include_dashboard": True,  # Ray Train's controller reads the State API
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    put_back_address_file()
    try:
        nodes.add_node(num_cpus=NODE_CPUS)
        nodes.connect()
        yield nodes
    finally:
        gc.collect()
        ray.shutdown()
        nodes.shutdown()
        put_back_address_file()


def _second_node(cluster: Cluster):
    (node,) = cluster.worker_nodes
    return node


def _lose(cluster: Cluster, node) -> None:
    """`node` goes down at once, as a crashed machine would (its raylet, object store and workers SIGKILLed)."""
    cluster.remove_node(node, allow_graceful=False)


def _lose_the_second_node_once_it_scored(cluster: Cluster, ledgers: list, lost: dict) -> None:
    """Once the phase's ledger counts a batch scored on the second node, remove that node."""
    node = _second_node(cluster)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            per_node = ray.get(ledgers[0].rows_by_node.remote()) if ledgers else {}
            if per_node.get(node.node_id):
                lost.update(node_id=node.node_id, rows_counted=sum(per_node.values()))
                _lose(cluster, node)
                return
            time.sleep(0.05)
        raise TimeoutError("the second node scored no batch within 180 s")
    except BaseException as e:  # noqa: BLE001 - reported by the test
        lost["error"] = repr(e)


def test_score_spreads_over_two_nodes_and_scores_every_key_once_after_losing_one(cluster, tmp_path, monkeypatch,
                                                                                 capsys):
    """`ubt score` with two actors puts one on each node and counts each node's rows in its manifest. The second
    node is then lost after it has scored a batch: its actor is restarted on the head, the batches it held run
    again (counted once), and the table holds every key exactly once, with the unfaulted run's scores."""
    rows = 480
    data = caption_shards(tmp_path / "shards", rows=rows, files=4)
    model = tmp_path / "model"
    save_clip(load_clip(ModelConfig(), seed=3), str(model))
    keys_in = sorted(pq.read_table(data, columns=["key"]).column("key").to_pylist())
    head, second = ray.get_runtime_context().get_node_id(), _second_node(cluster).node_id

    def score(out: Path) -> tuple[dict, dict[str, float]]:
        code = main(["score", "--model", str(model), f"defend.data={data}", f"experimental.score.output={out}",
                     # Many small batches, so that the node is lost with most of them still to score.
                     "experimental.score.batch_size=8", "score.num_actors=2",
                     "experimental.score.threads_per_actor=1"])
        assert code == 0, capsys.readouterr().err[-3000:]
        table = pq.read_table(out / "table", columns=["key", "score"])
        keys = table.column("key").to_pylist()
        assert sorted(keys) == keys_in  # no key lost, none twice
        return json.loads((out / "manifest.json").read_text()), dict(zip(keys, table.column("score").to_pylist()))

    whole, whole_scores = score(tmp_path / "whole")
    assert set(whole["rows_per_node"]) == {head, second}, whole["rows_per_node"]  # an actor on each node
    assert sum(whole["rows_per_node"].values()) == rows == sum(whole["rows_per_actor"])

    ledgers: list = []

    def watched_ledger():  # the phase's own ledger, its handle kept for the thread that removes the node
        ledgers.append(start_ledger())
        return ledgers[-1]

    monkeypatch.setattr(score_phase, "start_ledger", watched_ledger)
    lost: dict = {}
    loser = threading.Thread(target=_lose_the_second_node_once_it_scored, args=(cluster, ledgers, lost), daemon=True)
    loser.start()
    try:
        faulted, faulted_scores = score(tmp_path / "faulted")
        loser.join(timeout=60)
        assert "error" not in lost, lost["error"]
        assert 0 < lost["rows_counted"] < rows * 3 // 4, lost  # mid-run: rows were scored, many were still to come
        assert second not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        if not cluster.worker_nodes:  # the next test's second node
            cluster.add_node(num_cpus=NODE_CPUS)
    assert faulted["rows"]["rows_in"] == rows == faulted["rows"]["rows_out"]
    assert sum(faulted["rows_per_node"].values()) == rows and set(faulted["rows_per_node"]) <= {head, second}
    assert faulted_scores == whole_scores


def recording_clip_objective(preprocess_cfg, tokenizer, log_dir: str, pause_s: float):
    """The CLIP objective, which also appends the keys of each batch it is given to a file of this worker (named
    after its start time, rank and node), then pauses `pause_s` (time for a test to lose a node mid-run)."""
    objective = build_objective("clip", preprocess_cfg=preprocess_cfg, tokenizer=tokenizer)
    rank = ray.train.get_context().get_world_rank()
    log = Path(log_dir) / f"{time.time_ns()}-rank{rank}-{ray.get_runtime_context().get_node_id()}.jsonl"

    def run(model, batch):
        with log.open("a") as f:
            f.write(json.dumps(list(batch.keys)) + "\n")
        time.sleep(pause_s)
        return objective(model, batch)
    return run


def _steps_by_worker(log_dir: Path) -> dict[int, list[tuple[str, list[list[str]]]]]:
    """rank -> [(node id, the keys of each step's batch)] for each worker process of that rank, first started first."""
    out: dict[int, list] = {}
    for f in sorted(log_dir.glob("*.jsonl"), key=lambda p: int(p.name.split("-")[0])):
        _, rank, node = f.stem.split("-", 2)
        out.setdefault(int(rank[len("rank"):]), []).append(
            (node, [json.loads(line) for line in f.read_text().splitlines()]))
    return out


def test_training_with_a_worker_per_node_resumes_after_losing_a_node(cluster, tmp_path):
    """DDP over two Ray Train workers, one per node (each worker reserves a node's 2 CPUs). The second node is
    lost after the first checkpoint: Ray Train restarts both workers (trainer.max_failures) from the last
    checkpoint, and the run ends with the uninterrupted run's steps, each on the same rows on the same rank, and
    its weights. The training loop is the one of every training phase (phases/train.py is this `fit` with the
    plain CLIP objective, which the recording objective wraps)."""
    data = caption_shards(tmp_path / "shards", rows=256, files=2)
    init = write_random_clip(tmp_path / "init", small_clip_config(width=32, vision_layers=1, head_width=16))
    steps = 16  # 256 rows / 32 per step x 2 epochs; a checkpoint every 2 steps

    def train(name: str, pause_s: float):
        out, log_dir = tmp_path / name, tmp_path / f"{name}_steps"
        log_dir.mkdir()
        cfg = load_config(None, [f"data.train={data}", f"model.checkpoint={init}", f"experimental.train.output={out}",
                                 "trainer.num_workers=2", "experimental.trainer.cpus_per_worker=2",
                                 "experimental.trainer.threads_per_worker=1", "train.batch_size=32", "train.epochs=2",
                                 "experimental.trainer.checkpoints_per_epoch=4", "experimental.train.warmup_steps=2"])
        spec = FitSpec("train", cfg.data.train, cfg.train.output, cfg.model, cfg.train,
                       objective=recording_clip_objective, objective_kwargs={"log_dir": str(log_dir),
                                                                             "pause_s": pause_s})
        return fit(cfg, spec), out, _steps_by_worker(log_dir)

    whole, whole_out, whole_steps = train("whole", pause_s=0.0)
    assert whole.steps == steps and whole.resumed_from_step == 0
    assert sorted(whole_steps) == [0, 1] and all(len(workers) == 1 for workers in whole_steps.values())
    head, second = ray.get_runtime_context().get_node_id(), _second_node(cluster).node_id
    assert {whole_steps[rank][0][0] for rank in (0, 1)} == {head, second}  # a worker on each node
    assert all(len(whole_steps[rank][0][1]) == steps for rank in (0, 1))

    # The run in a thread, the node's loss and replacement in this one (Ray starts a node from the main thread
    # only). Half a second a step: the node is lost well before the run's 16 steps are done.
    out, faulted_run = tmp_path / "faulted", {}

    def run_faulted():
        try:
            faulted_run["result"] = train("faulted", pause_s=0.5)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            faulted_run["error"] = repr(e)

    runner = threading.Thread(target=run_faulted, daemon=True)
    runner.start()
    deadline = time.time() + 300
    while not registered_checkpoints(out):
        assert runner.is_alive() and time.time() < deadline, "no checkpoint was registered in time"
        time.sleep(0.2)
    _lose(cluster, _second_node(cluster))
    # The run needs two nodes' CPUs again: another node joins, as an autoscaler would provide one.
    cluster.add_node(num_cpus=NODE_CPUS)
    runner.join(timeout=600)
    assert "error" not in faulted_run, faulted_run["error"]
    assert "result" in faulted_run, "the run did not finish within 10 minutes of the node's loss"
    faulted, _, faulted_steps = faulted_run["result"]
    resumed = faulted.resumed_from_step
    assert 0 < resumed < steps and resumed % 2 == 0, resumed  # from a checkpoint, not from the start
    assert faulted.steps == steps and faulted.samples == whole.samples == steps * 32
    for rank in (0, 1):
        (_, first), (_, again) = faulted_steps[rank]  # two runs of the worker: before and after the loss
        assert len(first) < steps  # the first run of the worker did not finish
        assert first[:resumed] + again == whole_steps[rank][0][1]  # each step on the uninterrupted run's rows
    assert second in {faulted_steps[rank][0][0] for rank in (0, 1)}  # the lost node had held a worker
    weights = [(run / "model" / WEIGHTS_FILE).read_bytes() for run in (whole_out, out)]
    assert weights[0] == weights[1]
