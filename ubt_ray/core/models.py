"""open_clip models: from a standard name, a config shipped with ubt_ray, or a local-dir checkpoint directory.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError

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
        raise UserError("model.device is 'cuda' but no GPU is visible: set experimental.model.device=auto or cpu.")
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


def create_clip(name: str, device: str | torch.device = "cpu", seed: int | None = None) -> Clip:
    """A randomly initialised model of open_clip name or packaged config `name` (seeded when `seed` is given)."""
    register_packaged_configs()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise UserError(f"model.name {name!r} is not an open_clip model or a ubt_ray config: use one of "
                        f"ubt-tiny-vit, ViT-B-32, RN50 ... (open_clip.list_models()), or set model.checkpoint.")
    if seed is not None:
        torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    return Clip(model, json.loads(json.dumps(model_cfg)), dict(open_clip.get_model_preprocess_cfg(model)),
                preprocess, open_clip.get_tokenizer(name))


def load_checkpoint_dir(path: str | Path, device: str | torch.device = "cpu", source: str | None = None) -> Clip:
    """Load a local-dir checkpoint exactly as plain open_clip would, once `check_checkpoint_dir` has passed it."""
    path = Path(path)
    name = source or str(path)
    meta = check_checkpoint_dir(path, name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    except RuntimeError as e:  # strict load_state_dict: tensors missing, unexpected or of other shapes
        if "state_dict" not in str(e):
            raise
        detail = ([line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()] or [""])[0][:200]
        raise UserError(f"checkpoint {name}: the tensors of {WEIGHTS_FILE} do not fit the model that {CONFIG_FILE} "
                        f"describes ({detail or 'load_state_dict failed'}): re-save the checkpoint so that the two "
                        f"match.") from None
    return Clip(model, meta["model_cfg"], dict(open_clip.get_model_preprocess_cfg(model)), preprocess,
                open_clip.get_tokenizer(f"local-dir:{path}"))


def check_checkpoint_dir(path: Path, name: str) -> dict:
    """The parsed config of the local-dir checkpoint at `path`, after checking what open_clip would trip on with a
    traceback: the config must be JSON with a model_cfg, the weights a complete `open_clip_model.safetensors`.
    Weights in any other form are refused, not loaded: open_clip falls back to torch.load for .bin/.pth files, and
    unpickling a user's file can run any code it holds."""
    config = path / CONFIG_FILE
    if not config.is_file():
        raise UserError(f"checkpoint {name} has no {CONFIG_FILE}: point model.checkpoint at a directory "
                        f"written by ubt_ray or in open_clip's local-dir layout.")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"checkpoint {name}: {CONFIG_FILE} is not valid JSON ({str(e).splitlines()[0]}): "
                        f"re-copy it from where the checkpoint was written, or re-save the checkpoint.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_cfg"), dict):
        raise UserError(f"checkpoint {name}: {CONFIG_FILE} has no model_cfg mapping: re-save the checkpoint in "
                        f"open_clip's local-dir layout.")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt", ".pkl"))
        other = sorted(p.name for p in path.glob("*.safetensors"))
        if pickled:
            raise UserError(f"checkpoint {name} has pickled weights ({', '.join(pickled)}), which ubt_ray never loads "
                            f"since unpickling can run code, and no {WEIGHTS_FILE}: convert the weights to "
                            f"safetensors in a trusted environment (safetensors.torch.save_file(state_dict, "
                            f"'{WEIGHTS_FILE}')).")
        raise UserError(f"checkpoint {name} has no {WEIGHTS_FILE}" + (f" (only {', '.join(other)})" if other else "")
                        + f": save or rename its weights as {WEIGHTS_FILE} (safetensors) beside {CONFIG_FILE}.")
    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
    if find is not None and Path(find(path) or "").name != WEIGHTS_FILE:  # a later open_clip preferring others
        raise UserError(f"checkpoint {name}: open_clip would load {Path(find(path) or '').name or 'no weights'} "
                        f"rather than {WEIGHTS_FILE}: leave only {WEIGHTS_FILE} beside {CONFIG_FILE}.")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {name}: {WEIGHTS_FILE} is truncated or not a safetensors file "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): re-copy it from where the "
                        f"checkpoint was written, or re-save the checkpoint.") from None
    return meta


def write_checkpoint_dir(model: torch.nn.Module, model_cfg: dict, preprocess_cfg: dict, out: Path,
                         extra: dict | None = None) -> None:
    """The local-dir files of one checkpoint: config json plus safetensors weights (tensors made contiguous)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()}
    meta = {"model_cfg": model_cfg, "preprocess_cfg": pp, **({"ubt_ray": extra} if extra else {})}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

