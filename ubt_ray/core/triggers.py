"""Backdoor triggers (BadNet, Blended, SIG, WaNet) on uint8 (H, W, C) images.

Every trigger is deterministic: its random pattern is drawn once from the seed,
saved verbatim as .npy next to a trigger.json, and re-applied from those files,
so a saved trigger poisons new images to the same bytes without re-running an RNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .names import ATTACKS

FORMAT_VERSION = 1
TRIGGER_FILE = "trigger.json"
KINDS = ATTACKS
BADNET_LOCATIONS = ("corner", "centre", "random")
HARDENINGS = ("none", "noise", "occlude", "mix")

PathLike = Union[str, Path]
Validator = Callable[[str, str, Any], Any]


# ---------------------------------------------------------------------------
# Parameter validation helpers (shared by every trigger class)
# ---------------------------------------------------------------------------

def _int_at_least(low: int) -> Validator:
    def check(kind: str, name: str, value: Any) -> int:
        # bool is an int subclass; True as a patch size is almost surely a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(
                f"parameter '{name}' of trigger '{kind}' must be an integer >= {low}, "
                f"got {value!r}: pass an integer of at least {low}."
            )
        return int(value)

    return check


def _float_in(low: float, high: float, low_open: bool, high_open: bool) -> Validator:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(kind: str, name: str, value: Any) -> float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = (
                math.isfinite(value)
                and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high)
            )
        if not ok:
            raise ValueError(
                f"parameter '{name}' of trigger '{kind}' must be a number in {interval}, "
                f"got {value!r}: pass a value in that range."
            )
        return value

    return check


def _choice(options: Tuple[str, ...]) -> Validator:
    def check(kind: str, name: str, value: Any) -> str:
        if value not in options:
            raise ValueError(
                f"parameter '{name}' of trigger '{kind}' got {value!r}: "
                f"use one of {', '.join(options)}."
            )
        return value

    return check


def _check_seed(seed: Any) -> int:
    # default_rng rejects negative seeds with a less helpful message.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"trigger seed must be a non-negative integer, got {seed!r}: pass e.g. seed=0.")
    return int(seed)


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"trigger input must be a numpy uint8 array, got {type(image).__name__} "
            f"{getattr(image, 'dtype', '')}: convert it with np.asarray(image, dtype=np.uint8)."
        )
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            f"trigger input must have shape (H, W, C) with C = 1 or 3, got {image.shape}: "
            "add a channel axis to grayscale images with image[..., None]."
        )
    return image


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """Return an (..., 3) uint8 pattern with `channels` channels (1 uses integer BT.601 luma)."""
    if channels == 3:
        return rgb
    # Integer arithmetic so grayscale patterns do not depend on float rounding.
    wide = rgb.astype(np.uint32)
    luma = (299 * wide[..., 0] + 587 * wide[..., 1] + 114 * wide[..., 2] + 500) // 1000
    return luma.astype(np.uint8)[..., None]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _resize_nearest(rgb: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """An (h, w, 3) uint8 array resized (nearest neighbour) to (height, width, channels)."""
    # Integer index arithmetic keeps the resize exact and platform independent.
    rows = (np.arange(height) * rgb.shape[0]) // height
    cols = (np.arange(width) * rgb.shape[1]) // width
    return _to_channels(rgb[rows[:, None], cols[None, :]], channels)


# ---------------------------------------------------------------------------
# Trigger classes
# ---------------------------------------------------------------------------

class Trigger:
    """Base class: validated params, seed, the exact pattern arrays, and save/apply plumbing."""

    base_kind: ClassVar[str] = ""
    # name -> (default, validator)
    PARAMS: ClassVar[Dict[str, Tuple[Any, Validator]]] = {}

    def __init__(self, params: Dict[str, Any], seed: int, arrays: Dict[str, np.ndarray], kind: str = ""):
        self.kind = kind or self.base_kind
        self.params = self.validate_params(params, self.kind)
        self.seed = _check_seed(seed)
        self.arrays = self._check_arrays(arrays)

    @classmethod
    def validate_params(cls, params: Dict[str, Any] | None, kind: str = "") -> Dict[str, Any]:
        """Fill defaults and validate `params`; raise ValueError naming any bad entry."""
        kind = kind or cls.base_kind
        params = dict(params or {})
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise ValueError(
                f"unknown parameter '{unknown[0]}' for trigger '{kind}': "
                f"use only {', '.join(cls.PARAMS)}."
            )
        return {
            name: check(kind, name, params.get(name, default))
            for name, (default, check) in cls.PARAMS.items()
        }

    @classmethod
    def generate(cls, params: Dict[str, Any], rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Draw the trigger's pattern arrays from `rng` (called once, at build time)."""
        raise NotImplementedError

    @classmethod
    def array_specs(cls, params: Dict[str, Any]) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """Expected shape and dtype of every pattern array, used to reject corrupt files."""
        return {}

    def _apply(self, image: np.ndarray, key: str) -> np.ndarray:
        raise NotImplementedError

    def _check_arrays(self, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        checked = {}
        for name, (shape, dtype) in self.array_specs(self.params).items():
            array = arrays.get(name)
            if array is None or array.shape != shape or array.dtype != dtype:
                got = None if array is None else f"{array.shape} {array.dtype}"
                raise ValueError(
                    f"pattern array '{name}' of trigger '{self.kind}' must be {shape} {np.dtype(dtype)}, "
                    f"got {got}: rebuild the trigger with build_trigger or re-save it."
                )
            # Private read-only copy so callers cannot alter the trigger after the fact.
            array = np.array(array, copy=True)
            array.setflags(write=False)
            checked[name] = array
        return checked

    def apply(self, image: np.ndarray, key: str = "") -> np.ndarray:
        """Return a poisoned copy of uint8 `image` (H, W, C); `key` only matters for random placement."""
        image = _check_image(image)
        if not isinstance(key, str):
            raise ValueError(f"trigger key must be a str, got {type(key).__name__}: pass e.g. the sample id as text.")
        out = self._apply(image, key)
        assert out.shape == image.shape and out.dtype == np.uint8
        return out

    def poison(self, image: np.ndarray, key: str = "") -> np.ndarray:
        """The training-time poisoned copy of `image`; the same as `apply` except for clean-label attacks."""
        return self.apply(image, key)

    def save(self, directory: PathLike) -> Path:
        """Write trigger.json and the pattern .npy files into `directory`; return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in self.arrays.items():
            np.save(directory / f"{name}.npy", array, allow_pickle=False)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "base_kind": self.base_kind,
            "params": self.params,
            "seed": self.seed,
            "arrays": sorted(self.arrays),
        }
        (directory / TRIGGER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, params={self.params!r}, seed={self.seed})"


class BadNetTrigger(Trigger):
    """Square patch of fixed uniform noise pasted over the image (Gu et al., BadNets)."""

    base_kind = "badnet"
    PARAMS = {
        "size": (4, _int_at_least(1)),
        "location": ("corner", _choice(BADNET_LOCATIONS)),
    }

    @classmethod
    def generate(cls, params, rng):
        size = params["size"]
        return {"patch": rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)}

    @classmethod
    def array_specs(cls, params):
        return {"patch": ((params["size"], params["size"], 3), np.dtype(np.uint8))}

    def position(self, height: int, width: int, key: str = "") -> Tuple[int, int]:
        """Top-left (row, col) of the patch in an image of the given size."""
        size = self.params["size"]
        if size > height or size > width:
            raise ValueError(
                f"badnet patch of size {size} does not fit a {height}x{width} image: "
                f"use a 'size' of at most {min(height, width)}."
            )
        location = self.params["location"]
        if location == "corner":
            return height - size, width - size
        if location == "centre":
            return (height - size) // 2, (width - size) // 2
        # sha256, not hash(): Python's str hash is salted per process.
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        row_seed = int.from_bytes(digest[:8], "big")
        col_seed = int.from_bytes(digest[8:16], "big")
        return row_seed % (height - size + 1), col_seed % (width - size + 1)

    def _apply(self, image, key):
        height, width, channels = image.shape
        top, left = self.position(height, width, key)
        size = self.params["size"]
        out = image.copy()
        out[top:top + size, left:left + size] = _to_channels(self.arrays["patch"], channels)
        return out


class LabelConsistentTrigger(BadNetTrigger):
    """BadNet patch for clean-label poisoning (Turner et al., 2019), with optional hardening of the poisoned images.

    The poisoned images keep their true caption, so the model has no reason to use the patch while the object
    itself names the class. Hardening makes the object a weaker cue on the poisoned images only, fixed per key:
    `noise` blends seeded noise in with weight `hardening_strength`, `occlude` blanks that share of the image from
    one side, and `mix` blends in an image of another class (Turner et al.'s interpolation, in pixel space), so
    that the object the model sees argues for another class and the patch is what explains the true caption.
    `mix` draws from `donors` images of non-target rows, stored with the trigger (`donors.npy`, each resized to
    `donor_side` square) so that a saved trigger re-poisons bit for bit. Test-time triggering (`apply`) pastes
    the patch alone.
    """

    base_kind = "label_consistent"
    PARAMS = {
        **BadNetTrigger.PARAMS,
        "hardening": ("none", _choice(HARDENINGS)),
        "hardening_strength": (0.5, _float_in(0.0, 1.0, low_open=False, high_open=False)),
        "donors": (0, _int_at_least(0)),
        "donor_side": (32, _int_at_least(1)),
    }

    @classmethod
    def validate_params(cls, params, kind=""):
        checked = super().validate_params(params, kind)
        if checked["hardening"] == "mix" and checked["donors"] < 1:
            raise ValueError(f"hardening 'mix' of trigger '{kind or cls.base_kind}' blends in other-class images "
                             f"but 'donors' is 0: set 'donors' to how many to keep, e.g. 64.")
        return checked

    @classmethod
    def array_specs(cls, params):
        specs = super().array_specs(params)
        if params["hardening"] == "mix":
            side = params["donor_side"]
            specs["donors"] = ((params["donors"], side, side, 3), np.dtype(np.uint8))
        return specs

    @classmethod
    def donor_array(cls, params: Dict[str, Any], images: list) -> np.ndarray:
        """The `donors` array of `params` from decoded RGB PIL images (resized bilinearly to `donor_side`)."""
        if len(images) != params["donors"]:
            raise ValueError(f"hardening 'mix' keeps {params['donors']} donor images, got {len(images)}: "
                             f"pass exactly 'donors' images.")
        side = params["donor_side"]
        return np.stack([np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.uint8)
                         for im in images])

    def harden(self, image: np.ndarray, key: str) -> np.ndarray:
        """`image` with its object made a weaker cue, deterministically per (seed, key)."""
        if self.params["hardening"] == "none":
            return image
        digest = hashlib.sha256(f"{self.seed}:{key}".encode("utf-8")).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        weight, hardening = self.params["hardening_strength"], self.params["hardening"]
        if hardening == "occlude":
            return self._occlude(image, weight, rng)
        if hardening == "noise":
            other = rng.integers(0, 256, size=image.shape)
        else:  # mix
            donors = self.arrays["donors"]
            other = _resize_nearest(donors[int(rng.integers(0, len(donors)))], *image.shape)
        return _to_uint8((1.0 - weight) * image.astype(np.float64) + weight * other.astype(np.float64))

    @staticmethod
    def _occlude(image: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """`image` with a `weight` share of it blanked from one side, the side drawn from `rng`."""
        out = image.copy()
        h, w = image.shape[:2]
        rows, cols = int(round(weight * h)), int(round(weight * w))
        side = int(rng.integers(0, 4))
        if side == 0:
            out[:rows] = 0
        elif side == 1:
            out[h - rows:] = 0
        elif side == 2:
            out[:, :cols] = 0
        else:
            out[:, w - cols:] = 0
        return out

    def poison(self, image, key=""):
        return self.apply(self.harden(_check_image(image), key), key)


class BlendedTrigger(Trigger):
    """Full-image noise pattern alpha-blended into the image (Chen et al., 2017)."""

    base_kind = "blended"
    PARAMS = {
        "alpha": (0.2, _float_in(0.0, 1.0, low_open=True, high_open=False)),
        "pattern_size": (32, _int_at_least(1)),
    }

    @classmethod
    def generate(cls, params, rng):
        side = params["pattern_size"]
        return {"pattern": rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)}

    @classmethod
    def array_specs(cls, params):
        side = params["pattern_size"]
        return {"pattern": ((side, side, 3), np.dtype(np.uint8))}

    def pattern_for(self, height: int, width: int, channels: int) -> np.ndarray:
        """The pattern resized (nearest neighbour, integer indices) to (height, width, channels)."""
        return _resize_nearest(self.arrays["pattern"], height, width, channels)

    def _apply(self, image, key):
        alpha = self.params["alpha"]
        pattern = self.pattern_for(*image.shape)
        return _to_uint8((1.0 - alpha) * image.astype(np.float64) + alpha * pattern.astype(np.float64))


class SigTrigger(Trigger):
    """Horizontal sinusoidal signal added to every row (Barni et al., SIG, 2019)."""

    base_kind = "sig"
    PARAMS = {
        "amplitude": (20.0, _float_in(0.0, 255.0, low_open=True, high_open=False)),
        "frequency": (6.0, _float_in(0.0, math.inf, low_open=True, high_open=True)),
    }

    @classmethod
    def generate(cls, params, rng):
        return {}

    def _apply(self, image, key):
        width = image.shape[1]
        columns = np.arange(width, dtype=np.float64)
        signal = self.params["amplitude"] * np.sin(2.0 * np.pi * columns * self.params["frequency"] / width)
        return _to_uint8(image.astype(np.float64) + signal[None, :, None])


class WaNetTrigger(Trigger):
    """Smooth seeded image warp (Nguyen & Tran, WaNet, ICLR 2021)."""

    base_kind = "wanet"
    PARAMS = {
        "grid_size": (4, _int_at_least(2)),
        "strength": (0.5, _float_in(0.0, math.inf, low_open=True, high_open=True)),
    }

    def __init__(self, params, seed, arrays, kind=""):
        super().__init__(params, seed, arrays, kind)
        # Poisoning a dataset applies the same warp to many same-sized images.
        self._grid_cache: Dict[Tuple[int, int], torch.Tensor] = {}

    @classmethod
    def generate(cls, params, rng):
        k = params["grid_size"]
        grid = rng.uniform(-1.0, 1.0, size=(k, k, 2))
        # Normalised once here and stored, so a loaded trigger skips this float step.
        return {"control_grid": grid / np.mean(np.abs(grid))}

    @classmethod
    def array_specs(cls, params):
        k = params["grid_size"]
        return {"control_grid": ((k, k, 2), np.dtype(np.float64))}

    def sampling_grid(self, height: int, width: int) -> torch.Tensor:
        """The (1, H, W, 2) grid_sample grid in [-1, 1], (x, y) order, float64."""
        cached = self._grid_cache.get((height, width))
        if cached is not None:
            return cached
        control = torch.from_numpy(np.array(self.arrays["control_grid"])).permute(2, 0, 1)[None]
        # float64 on CPU: deterministic and far from uint8 rounding boundaries.
        noise = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1)
        ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
        xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((grid_x, grid_y), dim=2)[None]
        grid = torch.clamp(identity + self.params["strength"] * noise / height, -1.0, 1.0)
        self._grid_cache[(height, width)] = grid
        return grid

    def _apply(self, image, key):
        height, width, _ = image.shape
        pixels = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
        warped = F.grid_sample(
            pixels, self.sampling_grid(height, width), mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return _to_uint8(warped[0].permute(1, 2, 0).numpy())


_CLASSES: Dict[str, type] = {
    "badnet": BadNetTrigger,
    "blended": BlendedTrigger,
    "sig": SigTrigger,
    "wanet": WaNetTrigger,
    "label_consistent": LabelConsistentTrigger,
}


def _class_for(kind: Any) -> type:
    if kind not in _CLASSES:
        raise ValueError(f"unknown trigger kind {kind!r}: use one of {', '.join(KINDS)}.")
    return _CLASSES[kind]


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------

def build_trigger(kind: str, params: Dict[str, Any] | None = None, seed: int = 0,
                  donor_images: list | None = None) -> Trigger:
    """Build a trigger of `kind` (badnet, blended, sig, wanet, label_consistent) from params and seed.

    `donor_images` (PIL images of non-target rows) are for a label_consistent trigger hardened by `mix`,
    which needs exactly `params['donors']` of them (`needs_donors` says how many).
    """
    cls = _class_for(kind)
    checked = cls.validate_params(params, kind)
    rng = np.random.default_rng(_check_seed(seed))
    arrays = cls.generate(checked, rng)
    if "donors" in cls.array_specs(checked):
        if donor_images is None:
            raise ValueError(f"trigger '{kind}' with hardening 'mix' needs {checked['donors']} donor images: "
                             f"pass donor_images (ubt poison draws them from non-target rows).")
        arrays["donors"] = cls.donor_array(checked, donor_images)
    return cls(checked, seed, arrays, kind=kind)


def needs_donors(kind: str, params: Dict[str, Any] | None) -> int:
    """How many donor images `build_trigger(kind, params)` needs (0 for every trigger but a `mix` hardening)."""
    cls = _class_for(kind)
    checked = cls.validate_params(params, kind)
    return checked["donors"] if "donors" in cls.array_specs(checked) else 0


def load_trigger(directory: PathLike) -> Trigger:
    """Rebuild a trigger from the trigger.json and .npy files written by Trigger.save."""
    directory = Path(directory)
    meta_path = directory / TRIGGER_FILE
    if not meta_path.is_file():
        raise ValueError(f"no {TRIGGER_FILE} in '{directory}': pass a directory written by Trigger.save.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{meta_path}' is not valid JSON ({err}): re-save the trigger.") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(
            f"'{meta_path}' has trigger format version {version!r}, expected {FORMAT_VERSION}: "
            "re-save the trigger with this version of ubt_ray."
        )
    kind = meta.get("kind")
    cls = _class_for(kind)
    params = cls.validate_params(meta.get("params"), kind)
    arrays = {}
    for name in cls.array_specs(params):
        array_path = directory / f"{name}.npy"
        if not array_path.is_file():
            raise ValueError(f"trigger pattern file '{array_path}' is missing: re-save the trigger into '{directory}'.")
        arrays[name] = np.load(array_path, allow_pickle=False)
    return cls(params, meta.get("seed"), arrays, kind=kind)


def apply_to_png(png_bytes: bytes, trigger: Trigger, key: str = "", poison: bool = False) -> bytes:
    """Decode PNG bytes, apply `trigger` (L stays L, other modes become RGB), re-encode deterministically.

    `poison=True` gives the training-time poisoned image (`Trigger.poison`), else the test-time triggered one.
    """
    try:
        with Image.open(io.BytesIO(png_bytes)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"could not decode image bytes ({err}): pass the bytes of a PNG file.") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    out = trigger.poison(pixels, key) if poison else trigger.apply(pixels, key)
    # Fresh image so no source metadata (text chunks, gamma) leaks into the output bytes.
    result = Image.fromarray(out[..., 0] if out.shape[2] == 1 else out)
    buffer = io.BytesIO()
    result.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
