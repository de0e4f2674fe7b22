"""From shard rows to model inputs: images decoded to uint8 pixel tensors, normalised on the fly; captions tokenised.

Pixels stay uint8 (N, 3, H, W) until the model step, so that triggers and token masks act in pixel space
and a decoded dataset costs a quarter of its float size in memory. The decode matches open_clip's eval
preprocessing (resize the shortest side with bicubic, centre crop, RGB), then `normalize` applies its mean/std.
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from .rows import RowCounts

_RESIZERS: dict[int, Callable] = {}


def decode_image(data: bytes, size: int) -> np.ndarray:
    """One image's bytes as a uint8 (3, size, size) array, preprocessed like open_clip's eval transform."""
    if size not in _RESIZERS:
        resize, crop = Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size)
        _RESIZERS[size] = lambda img: crop(resize(img))
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = _RESIZERS[size](img)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_rows(table: pa.Table, size: int) -> tuple[pa.Table, np.ndarray | None, RowCounts]:
    """The rows of `table` whose image decodes, their uint8 pixels (N, 3, size, size; None when no row
    decodes), and the counts: an undecodable image is a counted rejection, with its key, not a crash."""
    keys = table.column("key").to_pylist()
    counts, pixels, kept = RowCounts(rows_in=len(keys)), [], []
    for i, data in enumerate(table.column("image").to_pylist()):
        try:
            pixels.append(decode_image(data, size))
            kept.append(i)
        except Exception as e:  # noqa: BLE001 - any undecodable image is a counted rejection, not a crash
            counts.reject(f"image undecodable ({type(e).__name__})", keys[i])
    counts.rows_out = len(kept)
    return table.take(pa.array(kept, pa.int64())), np.stack(pixels) if pixels else None, counts


def decode_images(images: Sequence[bytes], size: int) -> torch.Tensor:
    """A batch of image bytes as a uint8 tensor (N, 3, size, size)."""
    if len(images) == 0:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack([decode_image(b, size) for b in images]))


def normalize(pixels: torch.Tensor, preprocess_cfg: dict) -> torch.Tensor:
    """uint8 or [0, 1] float pixels -> the normalised float input the model expects."""
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels
    mean = torch.tensor(preprocess_cfg["mean"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def tokenize(tokenizer: Callable, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (N, context_length) of a list of captions."""
    return tokenizer(list(captions))
