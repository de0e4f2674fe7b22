"""Small builders shared by tests: images as bytes, shard tables."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(size=(28, 28), mode="L", fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=None if mode != "CMYK" else "CMYK")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()
