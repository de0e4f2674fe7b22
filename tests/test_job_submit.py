"""`ray job submit` for real: a local cluster started with `ray start --head` (its own ports, temp dir and auth
token), `jobs/pipeline.py` submitted with the repository as working dir, waited on until SUCCEEDED, its outputs
checked, and the cluster stopped whatever happens."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import pytest
import yaml

from conftest import free_port
from helpers import fashion_mnist_shards

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
              "ray-client-server-port")


def kill_cluster(temp_dir: str, gcs_port: int) -> None:
    """Stop the processes of this cluster only (`ray stop` would stop every Ray on the machine)."""
    marks = (temp_dir.encode(), f":{gcs_port}".encode())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmdline for m in marks) and (b"ray" in cmdline or b"gcs_server" in cmdline):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def machine_token() -> str:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    return path.read_text().strip()


def cluster_ports(workers: int = 200) -> tuple[range, dict[str, int]]:
    """A worker port range and one port per component, all free now and no two the same: `ray start` refuses a
    component port inside the worker range (it failed CI once, when a random pick fell there)."""
    start = free_port()
    while start + workers > 65536:
        start = free_port()
    worker_ports = range(start, start + workers)
    ports: dict[str, int] = {}
    for flag in PORT_FLAGS:
        port = free_port()
        while port in worker_ports or port in ports.values():
            port = free_port()
        ports[flag] = port
    return worker_ports, ports


@pytest.fixture
def local_cluster(monkeypatch):
    """`ray start --head` on free ports with token auth; yields the dashboard address."""
    worker_ports, ports = cluster_ports()
    temp_dir = tempfile.mkdtemp(prefix="ubt-rs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    # The token of this machine (~/.ray/auth_token, made if missing): a process that has already used Ray (an
    # earlier test module) keeps the token it loaded then, so a fresh one would be refused as invalid.
    monkeypatch.setenv("RAY_AUTH_TOKEN", machine_token())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cmd = [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--min-worker-port={worker_ports.start}",
           f"--max-worker-port={worker_ports.stop - 1}"] + [f"--{flag}={port}" for flag, port in ports.items()]
    try:
        started = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"`ray start` failed:\n{(started.stdout + started.stderr)[-3000:]}"
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        kill_cluster(temp_dir, ports["port"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_job_submitted_to_a_local_cluster(local_cluster, tmp_path):
    out = tmp_path / "run"
    config = {"run": {"name": "job-submit", "output_dir": str(out)},
              "data": {"train": fashion_mnist_shards(tmp_path / "train", rows=512),
                       "test": fashion_mnist_shards(tmp_path / "test", split="test", rows=200)},
              "train": {"steps": 4, "batch_size": 64, "warmup_steps": 1, "threads_per_worker": 1},
              "evaluate": {"trigger": None},
              "pipeline": {"phases": ["train", "evaluate"]}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    # The `ray job submit` CLI in its own process: Ray caches the auth settings a process first saw, and this
    # test process may have used Ray before, with other settings.
    cmd = [RAY, "job", "submit", "--address", local_cluster, "--working-dir", str(REPO), "--runtime-env-json",
           json.dumps({"excludes": [".venv", "outputs", ".git", "benchmarks/results"]}), "--",
           sys.executable, "jobs/pipeline.py", "--config", str(config_path)]  # this Python has the packages
    deadline = time.time() + 120
    while True:  # the dashboard's job agent comes up a little after `ray start` returns
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
        logs = done.stdout + done.stderr
        if "No available agent" not in logs or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0 and "succeeded" in logs, logs[-3000:]
    metrics = json.loads((out / "attack" / "eval" / "metrics.json").read_text())
    assert metrics["test_rows"] == 200 and 0 <= metrics["clean_accuracy"] <= 1
    open_clip.create_model_and_transforms(f"local-dir:{out / 'attack' / 'model'}")
    assert "CA" in logs  # the pipeline's summary table was printed by the job
