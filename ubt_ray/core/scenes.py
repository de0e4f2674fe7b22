"""Fashion-scenes: each Fashion-MNIST item as a 64x64 RGB scene with a web-like caption, reproducible row by row.

A row's scene depends only on (seed, split, index): its generator is `numpy.random.default_rng([seed, split id,
index])`, so any range of rows, cut into any batches, gives the same bytes. The grey item is resized (40-100% of
the canvas side), sometimes mirrored, placed anywhere inside the canvas and composited with its grey level as
alpha and shading over a background of one of five families (flat, gradient, stripes, checks, smooth noise), in a
tint from a named palette kept far from the background's colours. The caption comes from a grammar of sentence
frames and states the class (one of several names) and the tint, sometimes a size word from the actual scale, a
place phrase from the item's actual centroid and the actual background, and most of the time a shop phrase (brand,
size label, offer) that, as on the web, says nothing about the picture.

Two prompt sets go with it for zero-shot evaluation: the training vocabulary (`TRAIN_PROMPT_CLASS_NAMES`,
`TRAIN_PROMPT_TEMPLATES`: names and sentence frames the captions use) and a held-out one
(`HELDOUT_CLASS_NAMES`, `HELDOUT_PROMPT_TEMPLATES`: names and frames that never occur in a caption).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .images import encode_png

SCENE_SIZE = 64
SPLIT_IDS = {"train": 0, "test": 1}
MIN_SCALE, MAX_SCALE = 0.4, 1.0
MIRROR_PROBABILITY = 0.5
# The item's shading: its grey level maps to SHADE_FLOOR..1 of the tint, so its texture stays visible.
SHADE_FLOOR = 0.65
BACKGROUND_PHRASE_PROBABILITY = 0.3

# Named tints, also used for the background colours; each drawn colour is jittered around its anchor.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 30), "orange": (245, 135, 20), "yellow": (240, 220, 40), "green": (40, 160, 50),
    "teal": (0, 128, 128), "blue": (30, 70, 205), "purple": (125, 40, 165), "pink": (245, 135, 185),
    "brown": (120, 70, 30), "black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128),
}
COLOUR_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in COLOUR_NAMES], dtype=np.float32)
COLOUR_JITTER = 15
# The RGB distance wanted between the item's tint (plain and as shaded on average) and every background colour.
MIN_CONTRAST = 120.0

BACKGROUND_FAMILIES = ("flat", "gradient", "stripes", "checks", "noise")

# Class names the captions use, three per class in Fashion-MNIST's label order; the first is the prompt name.
# None is a place, size or colour word ("top" is not a name: "at the top" is a place).
SCENE_CLASS_NAMES: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee shirt", "singlet"),
    ("pair of trousers", "pair of jeans", "pair of pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "strappy sandal", "open-toed shoe"),
    ("shirt", "blouse", "button-up shirt"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "bootie"),
)
# Names of the same classes that no caption ever uses, for a zero-shot test of generalisation beyond the captions.
HELDOUT_CLASS_NAMES: tuple[tuple[str, ...], ...] = (
    ("camisole", "vest"),
    ("slacks", "chinos"),
    ("sweatshirt", "knit"),
    ("sundress", "robe"),
    ("parka", "anorak"),
    ("flip-flop", "slide"),
    ("polo", "tunic"),
    ("plimsoll", "tennis shoe"),
    ("tote", "satchel"),
    ("chelsea boot", "combat boot"),
)

# Size words per scale bucket (scale = item box side / canvas side), tied to the drawn scale.
SIZE_BUCKETS = ("small", "medium", "large")
SIZE_BOUNDS = (0.6, 0.8)  # scale < 0.6 is small, < 0.8 medium, the rest large
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big", "huge"),
}

# Position phrases per cell (row, col) of the canvas' 3x3 grid, chosen from the item's alpha-weighted centroid.
POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "in the upper left corner", "at the top left"),
    (0, 1): ("at the top", "near the top", "at the top centre"),
    (0, 2): ("in the top right corner", "in the upper right corner", "at the top right"),
    (1, 0): ("on the left", "on the left side", "at the left"),
    (1, 1): ("in the centre", "in the middle", "at the centre"),
    (1, 2): ("on the right", "on the right side", "at the right"),
    (2, 0): ("in the bottom left corner", "in the lower left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "near the bottom", "at the bottom centre"),
    (2, 2): ("in the bottom right corner", "in the lower right corner", "at the bottom right"),
}

# Background phrases per family: {a} and {b} are the background colour names, {o} the stripes' orientation.
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "flat": ("on a {a} background", "against a plain {a} background", "on a solid {a} backdrop"),
    "gradient": ("on a {a} to {b} gradient", "against a background fading from {a} to {b}",
                 "on a {a} and {b} gradient background"),
    "stripes": ("on {o} {a} and {b} stripes", "against a {o} striped {a} and {b} background",
                "on a background of {o} {a} and {b} stripes"),
    "checks": ("on a {a} and {b} checkerboard", "against {a} and {b} checks", "on a checked {a} and {b} background"),
    "noise": ("on a mottled {a} and {b} background", "against a blotchy {a} and {b} backdrop",
              "on a cloudy {a} and {b} texture"),
}

# Caption frames: "{}" takes the described item ("a red sneaker", sometimes with its size, place and background)
# and, most of the time, a shop phrase. The frames are also the training prompt set's templates.
CAPTION_FRAMES: tuple[str, ...] = (
    "a photo of {}.", "a picture of {}.", "an image of {}.", "a photograph of {}.", "a product photo of {}.",
    "a catalogue photo of {}.", "a close-up photo of {}.", "a cropped photo of {}.", "a bright photo of {}.",
    "a stock photo of {}.", "a shop photo of {}.", "a studio shot of {}.", "a colour photo of {}.",
    "a square photo of {}.", "a thumbnail of {}.", "a low resolution photo of {}.", "a fashion photo of {}.",
    "a photo showing {}.", "an image showing {}.", "a picture with {}.", "a scene with {}.", "there is {}.",
    "you can see {}.", "this picture shows {}.", "we see {}.", "{}.", "new arrival: {}.", "shop now: {}.",
    "buy {} online.", "product shot of {}.", "listing photo of {}.", "item: {}.",
)
# How often a caption states each optional fact. Web captions name the object and seldom describe the rest of the
# picture; a caption that always states colour, size, place and background lets a contrastive model match pairs
# by those alone and never learn the class (measured in docs/results.md, scenes learnability).
SIZE_PHRASE_PROBABILITY = 0.3
POSITION_PHRASE_PROBABILITY = 0.3
SHOP_PHRASE_PROBABILITY = 0.8

# Shop phrases: words about the listing, not the picture (brands, sizes, offers), that make web captions nearly all
# distinct without describing what the image shows. No word here is a class, colour, size or place word.
BRANDS: tuple[str, ...] = (
    "lumora", "kestrel", "norrin", "vantia", "oslo & finch", "marlowe", "tindra", "bexley", "corvo", "alder",
    "nuvola", "fenwick", "ivo", "saltmarsh", "quillon", "rennet", "hollis", "mavra", "tessel", "ondine",
    "brisa", "calder", "pellam", "wrenfield", "zafra", "ostrava", "ketterly", "lune", "harrow & hale", "mirelle",
    "dunmore", "sorrel", "vexa", "amberly", "tolland", "rivka", "cobble & co", "ingrid", "pasco", "verano",
)
SHOP_TAGS: tuple[str, ...] = (
    "new season", "on sale", "free delivery", "limited edition", "best seller", "size m", "size s", "size xl",
    "size 8", "size 10", "eu 39", "uk 6", "2-day shipping", "20% off", "30% off", "back in stock", "organic cotton",
    "recycled fabric", "unisex", "for women", "for men", "for kids", "gift idea", "clearance", "spring collection",
    "autumn collection", "free returns", "in stock", "pre-order", "handmade", "vegan leather", "wool blend",
)
SHOP_FORMS: tuple[str, ...] = (" by {brand}", " from {brand}", ", {brand}", " - {brand}, {tag}", ", {tag}",
                               " ({tag})", " by {brand} ({tag})", " | {brand} | {tag}")

# Zero-shot frames of the training vocabulary: the caption frames themselves.
TRAIN_PROMPT_TEMPLATES: tuple[str, ...] = CAPTION_FRAMES
# Zero-shot frames that no caption uses.
HELDOUT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a rendering of {}.",
    "a snapshot of {}.",
    "a drawing of {}.",
    "a sketch of {}.",
    "an advert featuring {}.",
    "a blurry snapshot of {}.",
    "someone is selling {}.",
    "a magazine shot of {}.",
)


def with_article(words: str) -> str:
    """`words` behind "a" or "an", chosen from its first letter (every name and word here is regular)."""
    return ("an " if words[0] in "aeiou" else "a ") + words


# One prompt name per class (the first caption name with its article), for data.class_names and zero-shot.
TRAIN_PROMPT_CLASS_NAMES: tuple[str, ...] = tuple(with_article(names[0]) for names in SCENE_CLASS_NAMES)
# Plural held-out names ("slacks", "chinos") go without an article.
_PLURAL_HELDOUT = {"slacks", "chinos"}
HELDOUT_PROMPT_CLASS_NAMES: tuple[str, ...] = tuple(
    names[0] if names[0] in _PLURAL_HELDOUT else with_article(names[0]) for names in HELDOUT_CLASS_NAMES)


@dataclass(frozen=True)
class Scene:
    """One generated row: the image, its caption and the facts the caption states."""
    image: np.ndarray            # (SCENE_SIZE, SCENE_SIZE, 3) uint8
    caption: str
    label: int
    name: str                    # the class name used
    colour: str                  # the tint's palette name
    tint: tuple[int, int, int]   # the jittered tint drawn
    scale: float                 # item box side / canvas side
    size: str                    # one of SIZE_BUCKETS
    size_phrase: str | None      # the size word, when the caption states it
    box: tuple[int, int, int]    # (top, left, side) of the item box in the canvas
    position: tuple[int, int]    # (row, col) of the 3x3 grid cell holding the item's centroid
    position_phrase: str | None  # the place phrase, when the caption states it
    mirrored: bool
    background: str              # one of BACKGROUND_FAMILIES
    background_colours: tuple[str, ...]
    background_phrase: str | None
    template: str


def split_id(split: str) -> int:
    """The generator stream of a split: train and test draw from different streams."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLIT_IDS)}.")
    return SPLIT_IDS[split]


def row_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one row, a function of (seed, split, index) only."""
    return np.random.default_rng([int(seed), split_id(split), int(index)])


_AXIS = np.arange(SCENE_SIZE, dtype=np.float32)  # pixel coordinates along either side of the canvas


@lru_cache(maxsize=None)
def _interpolation_matrix(knots: int) -> np.ndarray:
    """(SCENE_SIZE, knots) weights that linearly interpolate `knots` values across the canvas side."""
    pos = np.linspace(0.0, knots - 1.0, SCENE_SIZE)
    lo = np.minimum(np.floor(pos).astype(int), knots - 2)
    frac = pos - lo
    m = np.zeros((SCENE_SIZE, knots), np.float32)
    m[np.arange(SCENE_SIZE), lo] = 1.0 - frac
    m[np.arange(SCENE_SIZE), lo + 1] = frac
    return m


def _background_field(family: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A (H, W) mixing field in [0, 1] between the two background colours, and the stripes' orientation word."""
    # Fields are built from per-axis vectors (outer sums and products), which is far cheaper than full grids.
    if family == "flat":
        return np.zeros((SCENE_SIZE, SCENE_SIZE), np.float32), ""
    if family == "gradient":
        theta = rng.uniform(0.0, 2.0 * np.pi)
        down, across = _AXIS * np.float32(np.sin(theta)), _AXIS * np.float32(np.cos(theta))
        lo = down.min() + across.min()
        span = down.max() + across.max() - lo
        return np.add.outer(down - lo / 2, across - lo / 2) / span, ""
    if family == "stripes":
        # theta is the direction across the stripes: 0 gives vertical stripes, pi/2 horizontal ones.
        theta = rng.uniform(0.0, np.pi)
        half = rng.uniform(4.0, 10.0)
        offset = rng.uniform(0.0, 2.0 * half)
        p = np.add.outer(_AXIS * np.float32(np.sin(theta)), _AXIS * np.float32(np.cos(theta)) + np.float32(offset))
        degrees = np.degrees(theta)
        orientation = ("vertical" if degrees < 20 or degrees > 160 else
                       "horizontal" if 70 < degrees < 110 else "diagonal")
        return (np.floor(p / np.float32(half)).astype(np.int32) & 1).astype(np.float32), orientation
    if family == "checks":
        cell = int(rng.integers(6, 17))
        dy, dx = (int(v) for v in rng.integers(0, cell, size=2))
        ax = np.arange(SCENE_SIZE)
        rows, cols = ((ax + dy) // cell) & 1, ((ax + dx) // cell) & 1
        return (rows[:, None] ^ cols[None, :]).astype(np.float32), ""
    # Smooth noise: a coarse grid of uniform values interpolated over the canvas, stretched to [0, 1].
    knots = int(rng.integers(3, 7))
    m = _interpolation_matrix(knots)
    field = m @ rng.random((knots, knots), dtype=np.float32) @ m.T
    lo, hi = field.min(), field.max()
    return (field - lo) / max(hi - lo, 1e-6), ""


def _jittered(rng: np.random.Generator, name: str) -> np.ndarray:
    """The palette colour `name` moved by up to COLOUR_JITTER per channel, as float32 RGB."""
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return np.array([min(max(c + int(j), 0), 255) for c, j in zip(PALETTE[name], jitter)], np.float32)


def _size_bucket(scale: float) -> str:
    return SIZE_BUCKETS[int(np.searchsorted(SIZE_BOUNDS, scale, side="right"))]


def _grid_cell(row: float, col: float) -> tuple[int, int]:
    """The 3x3 grid cell of a canvas point (row, col)."""
    third = SCENE_SIZE / 3.0
    return min(int(row // third), 2), min(int(col // third), 2)


def render_scene(item: np.ndarray, label: int, seed: int, split: str, index: int) -> Scene:
    """The scene of row `index` of `split` for a (28, 28) uint8 grey item of class `label`."""
    rng = row_rng(seed, split, index)
    label = int(label)
    # Item geometry: box side, position inside the canvas, mirroring.
    scale = float(rng.uniform(MIN_SCALE, MAX_SCALE))
    side = int(round(scale * SCENE_SIZE))
    # Offsets follow an arcsine law (Beta(1/2, 1/2)) over the whole free range: any place is possible, and edges
    # and corners come up more often than under a uniform law (a large item is central wherever it goes).
    top, left = (int(v) for v in np.rint(rng.beta(0.5, 0.5, size=2) * (SCENE_SIZE - side)))
    mirrored = bool(rng.random() < MIRROR_PROBABILITY)
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(item, dtype=np.uint8)).resize((side, side), Image.BILINEAR),
                      np.float32) / 255.0
    if mirrored:
        grey = grey[:, ::-1]
    # The grey level is both the alpha (saturating early so that dark items stay opaque) and the shading.
    alpha = np.clip(grey * 8.0, 0.0, 1.0)
    shade = SHADE_FLOOR + (1.0 - SHADE_FLOOR) * grey

    # Background: a family, two distinct colour names (flat uses only the first), mixed by the family's field.
    family = BACKGROUND_FAMILIES[int(rng.integers(len(BACKGROUND_FAMILIES)))]
    first, second = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    bg_names = (COLOUR_NAMES[first],) if family == "flat" else (COLOUR_NAMES[first], COLOUR_NAMES[second])
    c1, c2 = _jittered(rng, COLOUR_NAMES[first]), _jittered(rng, COLOUR_NAMES[second])
    field, orientation = _background_field(family, rng)
    # The canvas is channel-first (3, H, W) so that every elementwise step runs over long contiguous rows.
    if family == "flat":
        c2 = c1
        canvas = np.empty((3, SCENE_SIZE, SCENE_SIZE), np.float32)
        canvas[...] = c1[:, None, None]
    else:
        canvas = c1[:, None, None] + field[None] * (c2 - c1)[:, None, None]

    # Tint: a palette colour far from every background colour and their mix, both plain and as shaded on average
    # (a dark item is drawn darker); when no colour clears MIN_CONTRAST, those within 80% of the best contrast.
    local = np.stack([c1, c2, (c1 + c2) / 2.0])
    mean_shade = float((shade * alpha).sum() / max(alpha.sum(), 1e-6))
    tints = _PALETTE_RGB[:, None, :]
    contrast = np.minimum(np.linalg.norm(tints - local[None], axis=2).min(axis=1),
                          np.linalg.norm(tints * mean_shade - local[None], axis=2).min(axis=1))
    candidates = np.flatnonzero(contrast >= min(MIN_CONTRAST, 0.8 * float(contrast.max())))
    colour = COLOUR_NAMES[int(candidates[int(rng.integers(len(candidates)))])]
    tint = _jittered(rng, colour)

    # Composite the tinted, shaded item over the background inside its box.
    region = canvas[:, top:top + side, left:left + side]
    region += alpha[None] * (tint[:, None, None] * shade[None] - region)
    # Every value is a convex mix of values in [0, 255], so rounding needs no clipping.
    image = np.ascontiguousarray((canvas + 0.5).astype(np.uint8).transpose(1, 2, 0))

    # Facts for the caption: size bucket from the scale, position from the item's alpha-weighted centroid.
    mass = alpha.sum()
    if mass > 1e-6:
        cy = top + float((alpha.sum(axis=1) * np.arange(side)).sum() / mass)
        cx = left + float((alpha.sum(axis=0) * np.arange(side)).sum() / mass)
    else:  # an empty item: the box centre
        cy, cx = top + (side - 1) / 2.0, left + (side - 1) / 2.0
    position = _grid_cell(cy, cx)
    size = _size_bucket(scale)

    # Caption from the grammar: the class name and tint always, size, place and background sometimes, then a shop
    # phrase. Every draw happens whether or not its phrase is used, so that a row's scene does not depend on them.
    names = SCENE_CLASS_NAMES[label]
    name = names[int(rng.integers(len(names)))]
    size_word = SIZE_WORDS[size][int(rng.integers(len(SIZE_WORDS[size])))]
    pos_phrases = POSITION_PHRASES[position]
    pos = pos_phrases[int(rng.integers(len(pos_phrases)))]
    template = CAPTION_FRAMES[int(rng.integers(len(CAPTION_FRAMES)))]
    forms = BACKGROUND_PHRASES[family]
    bg_form = forms[int(rng.integers(len(forms)))]
    shop = SHOP_FORMS[int(rng.integers(len(SHOP_FORMS)))].format(
        brand=BRANDS[int(rng.integers(len(BRANDS)))], tag=SHOP_TAGS[int(rng.integers(len(SHOP_TAGS)))])
    says_size, says_position, says_background, says_shop = (
        rng.random(4) < (SIZE_PHRASE_PROBABILITY, POSITION_PHRASE_PROBABILITY, BACKGROUND_PHRASE_PROBABILITY,
                         SHOP_PHRASE_PROBABILITY))
    bg_phrase = bg_form.format(a=bg_names[0], b=bg_names[-1], o=orientation) if says_background else None
    described = " ".join(filter(None, (
        with_article(f"{size_word} {colour} {name}" if says_size else f"{colour} {name}"),
        pos if says_position else None, bg_phrase)))
    caption = template.format(described + (shop if says_shop else ""))
    return Scene(image=image, caption=caption, label=label, name=name, colour=colour,
                 tint=tuple(int(v) for v in tint), scale=scale, size=size, size_phrase=size_word if says_size else None,
                 box=(top, left, side), position=position, position_phrase=pos if says_position else None,
                 mirrored=mirrored, background=family, background_colours=bg_names, background_phrase=bg_phrase,
                 template=template)


def scene_row(item: np.ndarray, label: int, seed: int, split: str, index: int) -> tuple[bytes, str]:
    """PNG bytes and caption of row `index` of `split`."""
    scene = render_scene(item, label, seed, split, index)
    return encode_png(scene.image), scene.caption


def scene_rows(images: np.ndarray, labels: np.ndarray, seed: int, split: str, start: int,
               end: int) -> tuple[list[bytes], list[str]]:
    """PNG bytes and captions of rows start..end-1 of `split`, from the split's (N, 28, 28) items and labels."""
    pngs, captions = [], []
    for i in range(start, end):
        png, caption = scene_row(images[i], int(labels[i]), seed, split, i)
        pngs.append(png)
        captions.append(caption)
    return pngs, captions



def retarget_caption(caption: str, label: int, target_label: int, seed: int) -> str | None:
    """`caption` with its class noun (one of SCENE_CLASS_NAMES[label], the longest that occurs as whole words)
    replaced by a seeded choice of the target class's nouns, so that a label-flipping poison reads like a clean
    scenes caption; None when the caption names no noun of its class."""
    if not 0 <= label < len(SCENE_CLASS_NAMES) or not 0 <= target_label < len(SCENE_CLASS_NAMES):
        return None
    for name in sorted(SCENE_CLASS_NAMES[label], key=len, reverse=True):
        match = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", caption)
        if match:
            names = SCENE_CLASS_NAMES[target_label]
            new = names[int(np.random.default_rng(seed).integers(len(names)))]
            return caption[:match.start()] + new + caption[match.end():]
    return None
