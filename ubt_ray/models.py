"""The configured model: `model.*` and `storage.*` of the config to the core's open_clip loaders, with
checkpoints read from and written to local paths or s3:// (ubt_ray.storage)."""

from __future__ import annotations

import torch

from . import storage
from .config import ModelConfig, StorageConfig
from .core.models import Clip, create_clip, load_checkpoint_dir, write_checkpoint_dir


def load_clip(cfg: ModelConfig, storage_cfg: StorageConfig | None = None, device: str | torch.device = "cpu",
              seed: int | None = None) -> Clip:
    """Build the configured model: from `cfg.checkpoint` when set, else `cfg.name` randomly initialised."""
    if cfg.checkpoint:
        storage.require_finished(cfg.checkpoint, storage_cfg)
        with storage.local_copy(cfg.checkpoint, storage_cfg) as local:
            return load_checkpoint_dir(local, device, source=cfg.checkpoint)
    return create_clip(cfg.name, device, seed)


def save_clip(clip: Clip, uri: str, storage_cfg: StorageConfig | None = None, extra: dict | None = None) -> None:
    """Write `clip` to `uri` (local or s3://) in open_clip's local-dir layout."""
    model = clip.model.module if hasattr(clip.model, "module") else clip.model
    with storage.local_staging(uri, storage_cfg) as out:
        write_checkpoint_dir(model, clip.model_cfg, clip.preprocess_cfg, out, extra)
