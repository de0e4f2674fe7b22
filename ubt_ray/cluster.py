"""Joining Ray: the cluster a job was submitted to, an address from the config, or a local Ray on this machine."""

from __future__ import annotations

import logging
import os

import ray

from .config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to Ray once per process: a submitted job joins its cluster (RAY_ADDRESS), else cfg.address, else local."""
    if ray.is_initialized():
        return
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    # A laptop run: a private local Ray (with its dashboard: Ray Train's controller queries the State API).
    ray.init(num_cpus=cfg.num_cpus, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = os.isatty(2)
