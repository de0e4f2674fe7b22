"""`ray job submit` for real: a local cluster started with `ray start --head` (its own ports, temp dir and auth
token), `jobs/pipeline.py` submitted with the repository as working dir, waited on until SUCCEEDED, its outputs
checked, and the cluster stopped whatever happens."""

import json
import os
import secrets
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


@pytest.fixture
def local_cluster(monkeypatch):
    """`ray start --head` on free ports with token auth; yields the dashboard address."""
    ports = {flag: free_port() for flag in PORT_FLAGS}
    temp_dir = tempfile.mkdtemp(prefix="ubt-rs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    worker_port = free_port()
    cmd = [RAY, "start", "--head", f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--min-worker-port={worker_port}",
           f"--max-worker-port={worker_port + 200}"] + [f"--{flag}={port}" for flag, port in ports.items()]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        kill_cluster(temp_dir, ports["port"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pipeline_job_submitted_to_a_local_cluster(local_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    out = tmp_path / "run"
    config = {"run": {"name": "job-submit", "output_dir": str(out)},
              "data": {"train": fashion_mnist_shards(tmp_path / "train", rows=512),
                       "test": fashion_mnist_shards(tmp_path / "test", split="test", rows=200)},
              "train": {"steps": 4, "batch_size": 64, "warmup_steps": 1, "threads_per_worker": 1},
              "evaluate": {"trigger": None},
              "pipeline": {"phases": ["train", "evaluate"]}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))

    deadline = time.time() + 60
    while True:  # the dashboard's job agent comes up a little after `ray start` returns
        try:
            client = JobSubmissionClient(local_cluster)
            # This machine's Python has the packages, as a cluster image's `python` would.
            job_id = client.submit_job(entrypoint=f"{sys.executable} jobs/pipeline.py --config {config_path}",
                                       runtime_env={"working_dir": str(REPO),
                                                    "excludes": [".venv", "outputs", ".git", "benchmarks/results"]})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + 480
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    metrics = json.loads((out / "attack" / "eval" / "metrics.json").read_text())
    assert metrics["test_rows"] == 200 and 0 <= metrics["clean_accuracy"] <= 1
    open_clip.create_model_and_transforms(f"local-dir:{out / 'attack' / 'model'}")
    assert "CA" in logs  # the pipeline's summary table was printed by the job
