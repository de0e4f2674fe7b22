"""Joining Ray: the cluster a job was submitted to, an address from the config, or a local Ray on this machine."""

from __future__ import annotations

import os

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
        ray.init(address="local", num_cpus=cfg.num_cpus, **kwargs)
    console.quiet_ray()
