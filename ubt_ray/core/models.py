"""open_clip models: from a standard name, a config shipped with ubt_ray, or a local-dir checkpoint (local or S3).

Checkpoints are written in open_clip's own `local-dir` layout (`open_clip_config.json` with `model_cfg` and
`preprocess_cfg`, weights in `open_clip_model.safetensors`), so plain
`open_clip.create_model_and_transforms("local-dir:PATH")` loads them with no code of ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from safetensors.torch import save_file

from ..config import ModelConfig, StorageConfig
from ..errors import UserError
from .. import storage

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # the files that make a checkpoint, for its signature
PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_packaged_configs() -> None:
    """Make the model configs shipped in ubt_ray/model_configs resolvable by name in open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(PACKAGED_CONFIGS)
        _registered = True


@dataclass
class Clip:
    """A CLIP model with what is needed to run and save it."""
    model: open_clip.CLIP
    model_cfg: dict
    preprocess_cfg: dict
    preprocess: Callable
    tokenizer: Callable

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is 'cuda' but no GPU is visible: set model.device=auto or cpu.")
    return torch.device(name)


def scoring_dtype(device: torch.device, bf16: bool = True) -> torch.dtype:
    """The weight dtype of the forward-only scoring passes: bf16 on a CPU that runs it natively (AVX512-BF16 or
    AMX) when asked, else fp32 (emulated bf16 is slower than fp32). Never bf16 on a GPU: on an H200, token-drop
    scoring under CUDA bf16 autocast gave AUROC 0.43 where fp32 gave 0.955 (two trainings of the quickstart model;
    fp32 scores its 60,000 rows in 25 s there, so bf16 has no time to win). bf16 weights rather than autocast:
    autocast re-casts every weight and activation at each call (1.27x slower here on the quickstart's model)."""
    if bf16 and device.type == "cpu" and torch.backends.mkldnn.is_available() \
            and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_clip(cfg: ModelConfig, storage_cfg: StorageConfig | None = None, device: str | torch.device = "cpu",
              seed: int | None = None) -> Clip:
    """Build the configured model: from `cfg.checkpoint` when set, else `cfg.name` randomly initialised."""
    if cfg.checkpoint:
        with storage.local_copy(cfg.checkpoint, storage_cfg) as local:
            return load_checkpoint_dir(local, device, source=cfg.checkpoint)
    register_packaged_configs()
    model_cfg = open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise UserError(f"model.name {cfg.name!r} is not an open_clip model or a ubt_ray config: use one of "
                        f"ubt-tiny-vit, ViT-B-32, RN50 ... (open_clip.list_models()), or set model.checkpoint.")
    if seed is not None:
        torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.name, pretrained=None, device=device)
    return Clip(model, json.loads(json.dumps(model_cfg)), dict(open_clip.get_model_preprocess_cfg(model)),
                preprocess, open_clip.get_tokenizer(cfg.name))


def load_checkpoint_dir(path: str | Path, device: str | torch.device = "cpu", source: str | None = None) -> Clip:
    """Load a local-dir checkpoint exactly as plain open_clip would."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"checkpoint {source or path} has no {CONFIG_FILE}: point model.checkpoint at a directory "
                        f"written by ubt_ray or in open_clip's local-dir layout.")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    meta = json.loads((path / CONFIG_FILE).read_text())
    return Clip(model, meta["model_cfg"], dict(open_clip.get_model_preprocess_cfg(model)), preprocess,
                open_clip.get_tokenizer(f"local-dir:{path}"))


def save_clip(clip: Clip, uri: str, storage_cfg: StorageConfig | None = None, extra: dict | None = None) -> None:
    """Write `clip` to `uri` (local or s3://) in open_clip's local-dir layout."""
    model = clip.model.module if hasattr(clip.model, "module") else clip.model
    with storage.local_staging(uri, storage_cfg) as out:
        write_checkpoint_dir(model, clip.model_cfg, clip.preprocess_cfg, out, extra)


def write_checkpoint_dir(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out: Path,
                         extra: dict | None = None) -> None:
    """The local-dir files of one checkpoint: config json plus safetensors weights (tensors made contiguous)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}
    meta = {"model_cfg": model_cfg, "preprocess_cfg": pp, **({"ubt_ray": extra} if extra else {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

