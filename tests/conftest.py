"""Shared fixtures: one local Ray per test module, a real S3 server (moto standalone) on loopback.

Tests that start Ray carry the `ray` mark: those that use the `ray_local` fixture (directly or through another
fixture) are marked here, the others where they are defined; tests of plain code that run for more than a few
seconds carry `slow`. The fast tier is `pytest -m "not ray and not slow"`. A test without the `ray` mark that
starts Ray in this process fails, so that the tier stays free of Ray."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from helpers import free_port

# Tests must never reach out: no Ray usage stats, no AWS metadata probing.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Credentials for the loopback S3 server, set before any Ray worker starts so that workers inherit them
# through the standard AWS chain exactly as on a cluster.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


RAY_FIXTURES = ("ray_local",)


def pytest_collection_modifyitems(config, items):
    """Mark `ray` every test that uses a fixture which starts Ray."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in RAY_FIXTURES):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    """A test without the `ray` mark that leaves a Ray running which it did not find running fails."""
    if request.node.get_closest_marker("ray") is not None:
        yield
        return
    was_up = _ray_is_up()
    yield
    if not was_up and _ray_is_up():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked ray: add @pytest.mark.ray, so that the "
                    f"fast tier (pytest -m 'not ray and not slow') leaves it out.", pytrace=False)


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray shared by the tests of one module."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    # Logical CPUs beyond the machine's two, so that two Train workers leave room for Ray Data's tasks.
    # address="local": its own Ray, whatever `ray start` cluster another test (or test worker) has up.
    from ubt_ray.cluster import start_local_ray
    start_local_ray(num_cpus=4, logging_level="ERROR")
    yield ray
    gc.collect()  # Ray objects (datasets, refs) the module's tests left go while Ray is still up
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free loopback port, reached over HTTP like any S3 endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start within 30 s")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields (endpoint_url, bucket name)."""
    import boto3
    name = f"ubt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return s3_server, name


_finished: dict = {}


def pytest_sessionfinish(session):
    _finished["session"] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's finalization once pytest is done. CI once saw this process killed by
    SIGSEGV (exit 139) after printing "201 passed", so in the interpreter's finalization, most likely while
    native libraries (Ray's core worker, torch's and Arrow's thread pools) are torn down. The results are final
    and printed by now, so exit with pytest's status instead of running that teardown. Not in pytest-xdist
    workers, whose controller still talks to them."""
    session = _finished.get("session")
    if session is None or hasattr(config, "workerinput"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
