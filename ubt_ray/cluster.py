"""Joining Ray: the cluster a job was submitted to, an address from the config, or a local Ray on this machine."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import ray

from . import console
from .config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to Ray once per process: a submitted job joins its cluster (RAY_ADDRESS), else cfg.address, else local."""
    if ray.is_initialized():
        return
    # Ray's own console lines at ERROR unless `ubt -v` (console.quiet_ray); the workers' output still reaches
    # this terminal (a worker's traceback, a multi-worker training's progress lines).
    kwargs: dict = {"logging_level": console.ray_level(), "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:  # a laptop run: a private local Ray (with its dashboard: Ray Train's controller queries the State API).
        # address="local", since a bare ray.init() would join the machine's last `ray start` cluster instead
        # (and fail there, being given num_cpus).
        start_local_ray(num_cpus=cfg.num_cpus, **kwargs)
    console.quiet_ray()


def start_local_ray(**kwargs) -> None:
    """`ray.init(address="local", **kwargs)` whose processes know their own cluster's address. Ray's State API,
    which Ray Train's placement-group cleaner calls from a worker, otherwise looks for "the" local cluster and
    fails with a traceback in the user's terminal whenever two local Rays run on one machine (two `ubt`
    commands, two test processes). So the head's GCS port is chosen here and given to its processes as
    RAY_ADDRESS; this process's environment is left as it was."""
    with socket.socket() as s:  # a port free now; Ray's start fails if another process takes it meanwhile
        s.bind(("", 0))
        port = s.getsockname()[1]
    # With the port known, Ray connects to the GCS at once instead of waiting for its port file; on a busy
    # machine its 20 one-second tries are shorter than that 30-second wait, so give it 60 (unless set).
    wait = os.environ.get("RAY_gcs_server_port_wait_time_s", "60")
    with _environ(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}",
                  RAY_gcs_server_port_wait_time_s=wait):
        ray.init(address="local", **kwargs)


@contextmanager
def _environ(**values: str):
    """os.environ with `values` set, restored afterwards (the processes started meanwhile keep them). Only these
    keys are restored: ray.init sets others in this process (RAY_AUTH_MODE among them) that must stay."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
