"""Image bytes in and out: validation with a reason for every rejection, PNG encoding, decoding to arrays."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Size is checked from the header before any pixel is decoded, so PIL's own bomb guard is not needed.
Image.MAX_IMAGE_PIXELS = None


def image_rejection(data: bytes | None, modes: list[str] | tuple[str, ...], min_side: int,
                    max_pixels: int) -> str | None:
    """The reason these image bytes are unusable, or None when they decode to an acceptable image."""
    if data is None or len(data) == 0:
        return "image missing"
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                return "image too large"
            if min(w, h) < min_side:
                return "image too small"
            if img.mode not in modes:
                return f"image mode {img.mode} not allowed"
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "image undecodable"
    return None


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W) or (H, W, C) array, with fixed settings so equal arrays give equal bytes."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (the form open_clip's preprocessing expects)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
