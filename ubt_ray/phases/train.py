"""train: CLIP training or fine-tuning on shards (the attack side's backdoored model), on Ray Train."""

from __future__ import annotations

from ..config import Config
from ..train_loop import FitResult, FitSpec, fit


def train(cfg: Config) -> FitResult:
    """Train `model` (random init or `model.checkpoint`) on `data.train` with the CLIP loss."""
    return fit(cfg, FitSpec(phase="train", data=cfg.data.train, output=cfg.train.output, init=cfg.model,
                            schedule=cfg.train))
