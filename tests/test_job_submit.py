"""`ray job submit` for real, exactly as the README's "Run on a cluster" says: its bash block, read from README.md
(`ubt cluster start`, `ray job submit` of jobs/pipeline.py with the venv's Python and an absolute
run.output_dir, `ubt cluster stop`), run by bash with only a temp dir of the test's own (the dashboard goes on
8265 or, when that is taken, a free port) and a small config put in. Then: the outputs are where run.output_dir
said, no process of that cluster is left, and another Ray on the machine (this process's `ray.init()`) still
runs tasks. Also: a job with a relative output dir refuses to start, and `ubt cluster stop` finds a job's driver
but not a mere reader of the cluster's logs."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import pytest
import yaml

from helpers import fashion_mnist_shards
from ubt_ray import local_cluster

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the venv this test runs in: .venv/bin in a checkout


def readme_local_cluster_block() -> str:
    """The bash block of README.md's "Run on a cluster" that runs a job on a local cluster."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Run on a cluster")
    section = text[start:text.index("\n## ", start)]
    block = section[section.index("**A local cluster**"):]
    block = block[block.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("```")]


def substitute(block: str, replacements: list[tuple[str, str]]) -> str:
    """`block` with each (old, new) replaced; every `old` must be there, or the README changed under the test."""
    for old, new in replacements:
        assert old in block, f"the README's local-cluster commands no longer contain {old!r}:\n{block}"
        block = block.replace(old, new)
    return block


@pytest.fixture
def cluster_temp_dir():
    """A temp dir of the test's own for the cluster (short: Ray's socket paths must fit 107 bytes); whatever runs
    in it is stopped at the end, whatever happened."""
    temp_dir = tempfile.mkdtemp(prefix="ubt-rs-", dir="/tmp")
    try:
        yield temp_dir
    finally:
        local_cluster.stop(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_readme_local_cluster_commands(ray_local, cluster_temp_dir, tmp_path):
    ray = ray_local  # another Ray on the machine, which `ubt cluster stop` must leave alone

    @ray.remote
    def ping():
        return os.getpid()

    ray.get(ping.remote())
    out = tmp_path / "run"
    config = {"run": {"name": "job-submit"},  # run.output_dir comes from the command line, as in the README
              "data": {"train": fashion_mnist_shards(tmp_path / "train", rows=512),
                       "test": fashion_mnist_shards(tmp_path / "test", split="test", rows=200)},
              "train": {"batch_size": 64},
              "evaluate": {"trigger": None},
              "pipeline": {"phases": ["train", "evaluate"]},
              "experimental": {"train.steps": 4, "train.warmup_steps": 1, "trainer.threads_per_worker": 1}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    script = substitute(readme_local_cluster_block(), [
        # This test's venv (in a checkout: the README's .venv, $PWD being REPO)
        ('"$PWD/.venv/bin/python"', '"@VENV@/python"'), (".venv/bin/", "@VENV@/"), ("@VENV@", str(VENV_BIN)),
        ("ubt cluster start --num-cpus 4", f"ubt cluster start --num-cpus 4 --temp-dir {cluster_temp_dir}"),
        ("ubt cluster address", f"ubt cluster address --temp-dir {cluster_temp_dir}"),
        ("ubt cluster stop", f"ubt cluster stop --temp-dir {cluster_temp_dir}"),
        ("configs/quickstart.yaml", str(config_path)),
        ('run.output_dir="$PWD/outputs/cluster"', f'run.output_dir="{out}"'),
    ])
    # The commands in processes of their own: Ray caches the auth settings a process first saw.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in logs, f"{script}\n{logs[-4000:]}"
    print(f"README commands: {time.time() - start:.1f} s")

    assert f"ubt pipeline: outputs go to {out}" in logs  # the job says where its outputs go ...
    metrics = json.loads((out / "attack" / "eval" / "metrics.json").read_text())  # ... and they are there
    assert metrics["test_rows"] == 200 and 0 <= metrics["clean_accuracy"] <= 1
    open_clip.create_model_and_transforms(f"local-dir:{out / 'attack' / 'model'}")
    assert "CA" in logs  # the pipeline's summary table was printed by the job
    assert not list(Path(cluster_temp_dir).glob("session_*/runtime_resources/working_dir_files/*/outputs"))

    assert local_cluster.cluster_pids(cluster_temp_dir) == []  # `ubt cluster stop` left nothing of it
    assert "stopped the Ray cluster" in logs
    assert ray.get(ping.remote()) > 0  # the other Ray still runs tasks


def load_job_module():
    spec = importlib.util.spec_from_file_location("ubt_job_common", REPO / "jobs" / "_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_job_with_a_relative_output_dir_refuses_to_start(tmp_path, monkeypatch, capsys):
    job = load_job_module()
    # What Ray sets for the driver of a job submitted with --working-dir; its cwd is Ray's copy of that dir.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "quickstart.yaml")
    assert job.job("pipeline")(["--config", config]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir=outputs/quickstart: a relative output path" in err and str(tmp_path) in err
    assert 'run.output_dir="$PWD/outputs/cluster"' in err
    assert not (tmp_path / "outputs").exists()
    assert job.job("compare")(["--config", config, f"run.output_dir={tmp_path}/o"]) == 2
    assert 'experimental.compare.output="$PWD/outputs/compare"' in capsys.readouterr().err

    assert job.check_outputs("pipeline", ["--config", config, f"run.output_dir={tmp_path}/o"]) is None
    assert f"ubt pipeline: outputs go to {tmp_path}/o" in capsys.readouterr().out
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # not a Ray job (a laptop run): relative is fine
    assert job.check_outputs("pipeline", ["--config", config]) is None


def test_cluster_stop_finds_a_jobs_driver_but_not_a_reader_of_its_logs(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="ubt-rs-", dir="/tmp")
    job_dir = Path(temp_dir) / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    log = Path(temp_dir) / "session_1" / "logs" / "raylet.out"
    log.parent.mkdir(parents=True)
    log.write_text("")
    sleep = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    driver = subprocess.Popen([sys.executable, "-c", sleep], cwd=job_dir)
    reader = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while len(found := local_cluster.cluster_pids(temp_dir)) < 2 and time.time() < deadline:
            time.sleep(0.2)  # the driver's child `sleep` (a descendant counts too)
        assert driver.pid in found and len(found) == 2 and reader.pid not in found
        assert local_cluster.stop(temp_dir, grace_s=5) == found
        assert driver.wait(timeout=10) != 0 and reader.poll() is None
        assert local_cluster.cluster_pids(temp_dir) == []
    finally:
        for p in (driver, reader):
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", temp_dir], check=False)
