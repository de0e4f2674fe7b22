"""fashion-scenes (ubt_ray/core/scenes.py): row-by-row reproducibility, image format, caption variety, the held-out
prompt set, and captions that state what the image shows. No Ray."""

import gzip
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ubt_ray.core import scenes
from ubt_ray.core.scenes import (
    BACKGROUND_PHRASES, BRANDS, CAPTION_FRAMES, HELDOUT_CLASS_NAMES, HELDOUT_PROMPT_CLASS_NAMES,
    HELDOUT_PROMPT_TEMPLATES, PALETTE, POSITION_PHRASES, SCENE_CLASS_NAMES, SCENE_SIZE, SHOP_TAGS, SIZE_BOUNDS, SIZE_WORDS,
    TRAIN_PROMPT_CLASS_NAMES, TRAIN_PROMPT_TEMPLATES, render_scene, scene_row, scene_rows,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "scenes"
SAMPLE = 3000
# This test's own reading of the captions' place and size words: grid row / column -> words that name it, and
# size word -> the range of the item box's side as a share of the canvas side.
ROW_WORDS = {0: {"top", "upper"}, 1: set(), 2: {"bottom", "lower"}}
COL_WORDS = {0: {"left"}, 1: set(), 2: {"right"}}
SIZE_SCALES = {**dict.fromkeys(("small", "little", "tiny"), (0.4, 0.6)),
               **dict.fromkeys(("medium-sized", "mid-sized", "medium"), (0.6, 0.8)),
               **dict.fromkeys(("large", "big", "huge"), (0.8, 1.0))}


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _synthetic_items(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey ellipses of varied size and brightness on black, standing in for Fashion-MNIST when it is absent."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    ry, rx = rng.uniform(5, 13, (2, n, 1, 1))
    level = rng.uniform(60, 255, (n, 1, 1))
    inside = ((yy - 13.5) / ry) ** 2 + ((xx - 13.5) / rx) ** 2 <= 1
    return (inside * level).astype(np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.fixture(scope="module")
def items():
    """The first SAMPLE training items and labels (Fashion-MNIST when installed, else synthetic ones)."""
    if (FMNIST / "train-images-idx3-ubyte.gz").exists():
        images = _read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:SAMPLE]
        labels = _read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:SAMPLE]
        return np.ascontiguousarray(images), labels.copy()
    return _synthetic_items(SAMPLE)


@pytest.fixture(scope="module")
def sample(items):
    """The scenes of the sample's rows (train split, seed 0)."""
    images, labels = items
    return [render_scene(images[i], labels[i], 0, "train", i) for i in range(SAMPLE)]


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z-]+", " ", text.lower()).strip() + " "


def test_same_seed_same_bytes_and_seed_matters(items):
    images, labels = items
    first = scene_rows(images, labels, 3, "train", 0, 20)
    again = scene_rows(images, labels, 3, "train", 0, 20)
    other = scene_rows(images, labels, 4, "train", 0, 20)
    assert first == again
    assert sum(a != b for a, b in zip(first[0], other[0])) >= 18
    assert sum(a != b for a, b in zip(first[1], other[1])) >= 18


def test_rows_do_not_depend_on_batch_boundaries(items):
    images, labels = items
    whole = scene_rows(images, labels, 0, "train", 0, 40)
    pieces = [scene_rows(images, labels, 0, "train", a, b) for a, b in ((0, 7), (7, 8), (8, 40))]
    assert whole[0] == [png for p in pieces for png in p[0]]
    assert whole[1] == [c for p in pieces for c in p[1]]
    # A row alone, out of order, equals the same row inside a range.
    assert scene_row(images[25], labels[25], 0, "train", 25) == (whole[0][25], whole[1][25])


def test_splits_draw_from_different_streams(items):
    images, labels = items
    train = scene_rows(images, labels, 0, "train", 0, 20)
    test = scene_rows(images, labels, 0, "test", 0, 20)
    assert sum(a != b for a, b in zip(train[1], test[1])) >= 18
    with pytest.raises(ValueError, match="unknown split"):
        scene_row(images[0], labels[0], 0, "validation", 0)


def test_images_decode_as_64px_rgb(items):
    images, labels = items
    pngs, _ = scene_rows(images, labels, 0, "train", 0, 50)
    for png in pngs:
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (SCENE_SIZE, SCENE_SIZE)
    # The item is drawn: no image is a single colour.
    assert all(len(np.unique(np.asarray(Image.open(io.BytesIO(p))).reshape(-1, 3), axis=0)) > 2 for p in pngs)


def test_captions_are_nearly_all_distinct(sample):
    captions = [s.caption for s in sample]
    distinct = len(set(captions)) / len(captions)
    assert distinct >= 0.95, f"only {distinct:.1%} of {len(captions)} captions are distinct"


def test_vocabulary_sizes():
    assert len(CAPTION_FRAMES) >= 30 and len(set(CAPTION_FRAMES)) == len(CAPTION_FRAMES)
    assert len(SCENE_CLASS_NAMES) == 10 and all(len(set(n)) >= 3 for n in SCENE_CLASS_NAMES)
    assert len(PALETTE) >= 10
    assert len(HELDOUT_CLASS_NAMES) == 10 and all(len(n) >= 1 for n in HELDOUT_CLASS_NAMES)
    for t in TRAIN_PROMPT_TEMPLATES + HELDOUT_PROMPT_TEMPLATES:
        assert t.count("{}") == 1, t
    assert len(TRAIN_PROMPT_CLASS_NAMES) == len(HELDOUT_PROMPT_CLASS_NAMES) == 10
    # No class name holds a place, size or colour word, so that a caption's words each say one thing.
    fact_words = set(SIZE_SCALES) | set(PALETTE) | {w for ws in (*ROW_WORDS.values(), *COL_WORDS.values()) for w in ws}
    for names in SCENE_CLASS_NAMES + HELDOUT_CLASS_NAMES:
        for name in names:
            assert not set(_words(name).split()) & fact_words, name
    # Shop phrases say nothing about the picture: no class, colour, size or place word in a brand or a tag.
    class_words = {w for names in SCENE_CLASS_NAMES + HELDOUT_CLASS_NAMES for n in names for w in _words(n).split()}
    for phrase in BRANDS + SHOP_TAGS:
        assert not set(_words(phrase).split()) & (fact_words | class_words), phrase


def test_heldout_prompts_never_occur_in_training_captions(sample):
    text = [_words(s.caption) for s in sample]
    for names in HELDOUT_CLASS_NAMES:
        for name in names:
            hits = [c for c in text if f" {_words(name).strip()} " in c]
            assert not hits, f"held-out name {name!r} occurs in {hits[0]!r}"
    for template in HELDOUT_PROMPT_TEMPLATES:
        for part in template.split("{}"):
            part = _words(part).strip()
            if part:
                hits = [c for c in text if f" {part} " in c]
                assert not hits, f"held-out frame {part!r} of {template!r} occurs in {hits[0]!r}"
    # No held-out name is a caption name of any class.
    caption_names = {_words(n).strip() for names in SCENE_CLASS_NAMES for n in names}
    assert not caption_names & {_words(n).strip() for names in HELDOUT_CLASS_NAMES for n in names}


def test_training_prompts_use_the_captions_vocabulary(sample):
    captions = [s.caption for s in sample]
    for template in TRAIN_PROMPT_TEMPLATES:
        prefix = template.split("{}")[0]
        assert any(c.startswith(prefix) for c in captions), f"no caption starts like {template!r}"
    text = [_words(s.caption) for s in sample]
    for label, name in enumerate(TRAIN_PROMPT_CLASS_NAMES):
        noun = _words(name).strip().split(" ", 1)[1]  # the name without its article
        assert any(f" {noun} " in t for t, s in zip(text, sample) if s.label == label), name


def test_captions_state_the_scene_facts(sample):
    for s in sample:
        words = _words(s.caption)
        assert f" {s.colour} {_words(s.name).strip()} " in words, s.caption
        assert s.name in SCENE_CLASS_NAMES[s.label]
        bucket = int(np.searchsorted(SIZE_BOUNDS, s.scale, side="right"))
        assert s.size == scenes.SIZE_BUCKETS[bucket]
        if s.size_phrase is not None:
            assert s.size_phrase in SIZE_WORDS[s.size] and f" {s.size_phrase} {s.colour} " in words, s.caption
        else:
            assert not set(words.split()) & set(SIZE_SCALES), s.caption
        if s.position_phrase is not None:
            assert s.position_phrase in POSITION_PHRASES[s.position] and s.position_phrase in s.caption, s.caption
        if s.background_phrase is not None:
            assert s.background_phrase in s.caption
            assert any(s.background_phrase == f.format(a=s.background_colours[0], b=s.background_colours[-1],
                                                       o=w) for f in BACKGROUND_PHRASES[s.background]
                       for w in ("", "vertical", "horizontal", "diagonal")), s.caption
    # Every background family, position cell, size and most palette colours come up; the optional phrases come
    # up about as often as their probabilities say.
    assert {s.background for s in sample} == set(scenes.BACKGROUND_FAMILIES)
    assert {s.position for s in sample} == set(POSITION_PHRASES)
    assert {s.size for s in sample} == set(scenes.SIZE_BUCKETS)
    assert len({s.colour for s in sample}) >= 10
    assert 0.3 < np.mean([s.mirrored for s in sample]) < 0.7
    for attribute, probability in (("background_phrase", scenes.BACKGROUND_PHRASE_PROBABILITY),
                                   ("position_phrase", scenes.POSITION_PHRASE_PROBABILITY),
                                   ("size_phrase", scenes.SIZE_PHRASE_PROBABILITY)):
        share = np.mean([getattr(s, attribute) is not None for s in sample])
        assert abs(share - probability) < 0.05, (attribute, share)


def _nearest_colour(rgb: np.ndarray, shades: tuple[float, ...] = (1.0,)) -> str:
    """The palette name whose anchor, darkened by any of `shades`, is nearest `rgb`."""
    names = list(PALETTE)
    anchors = np.array([PALETTE[n] for n in names], float)[:, None, :] * np.array(shades)[None, :, None]
    return names[int(np.argmin(np.linalg.norm(anchors - rgb, axis=2).min(axis=1)))]


def test_flat_scenes_pixels_match_the_caption(sample):
    """On flat backgrounds the item can be found from the pixels alone: its colour, place and size must be the
    caption's, and it must stand out from the background."""
    flat = [s for s in sample if s.background == "flat"]
    assert len(flat) > 300
    checked = 0
    for s in flat:
        img = s.image.astype(float)
        colours, counts = np.unique(s.image.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[np.argmax(counts)].astype(float)
        distance = np.abs(img - background).max(axis=2)
        mask = distance > 40
        assert mask.sum() > 20, f"item hardly visible: {s.caption}"
        words = _words(s.caption)
        # Background colour, when the caption names it.
        if s.background_phrase is not None:
            assert f" {_nearest_colour(background)} " in _words(s.background_phrase), s.caption
        # Tint: the quarter of the item's inner pixels (the mask shrunk by a pixel) farthest from the background,
        # i.e. the most opaque, is nearest the caption's colour under some shading (the item is shaded 65-100%).
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        inner = inner if inner.sum() >= 8 else mask
        pixels, far = img[inner], distance[inner]
        opaque = pixels[np.argsort(far)[-max(1, len(pixels) // 4):]].mean(axis=0)
        said = re.search(r" (\w+) %s " % re.escape(_words(s.name).strip()), words).group(1)
        assert _nearest_colour(opaque, tuple(np.linspace(0.65, 1.0, 8))) == said, s.caption
        # Legibility: the item differs clearly from the background on average.
        assert distance[mask].mean() > 60, s.caption
        # Position: the caption's place words (this test's own vocabulary) match the cell of the item's pixel
        # centroid, unless the centroid lies within 1.5 px of a cell border.
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean(), xs.mean()
        third = SCENE_SIZE / 3
        if s.position_phrase is not None and min(abs(v - b) for v in (cy, cx) for b in (third, 2 * third)) > 1.5:
            row, col = min(int(cy // third), 2), min(int(cx // third), 2)
            for axis, side in ((ROW_WORDS, row), (COL_WORDS, col)):
                for other, vocabulary in axis.items():
                    found = bool(vocabulary & set(words.split()))
                    assert found == (other == side) or (other == 1 and not vocabulary), (s.caption, row, col)
            if (row, col) == (1, 1):
                assert {"centre", "middle"} & set(words.split()), s.caption
            checked += 1
        # Size: the item's extent fits the caption's size word, when it says one (the item fills 60-100% of its box).
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        said_size = next((w for w in words.split() if w in SIZE_SCALES), None)
        if said_size is not None:
            low, high = SIZE_SCALES[said_size]
            assert 0.6 * low * SCENE_SIZE <= extent <= high * SCENE_SIZE + 1, (s.caption, extent)
    # The position check ran on most rows whose caption states a place, not on a handful.
    assert checked > 0.5 * sum(s.position_phrase is not None for s in flat)


def test_striped_and_checked_backgrounds_show_the_named_colours(sample):
    """Stripes and checks are two flat colours: outside the item's box the two commonest pixel colours are the two
    the caption names."""
    rows = [s for s in sample if s.background in ("stripes", "checks") and s.background_phrase is not None]
    checked = 0
    for s in rows:
        top, left, side = s.box
        outside = np.ones((SCENE_SIZE, SCENE_SIZE), bool)
        outside[top:top + side, left:left + side] = False
        if outside.sum() < 200:
            continue
        colours, counts = np.unique(s.image[outside], axis=0, return_counts=True)
        two = colours[np.argsort(counts)[-2:]].astype(float)
        named = {_nearest_colour(c) for c in two}
        assert named == {w for w in _words(s.background_phrase).split() if w in PALETTE}, s.caption
        checked += 1
    assert checked > 100


def test_prepare_udf_matches_scene_rows(items):
    """prepare's map_batches function gives each row the scene of its own index, whatever the batch holds."""
    from ubt_ray.phases.prepare import _render_scenes
    images, labels = items
    rows = [5, 6, 30, 2]
    table = pa.table({"key": [f"scenes-test-{i:05d}" for i in rows], "index": pa.array(rows, pa.int64()),
                      "pixels": pa.array([images[i].tobytes() for i in rows], pa.binary()),
                      "label": pa.array(labels[rows].astype(np.int32))})
    out = _render_scenes(table, 28, 28, 7, "test").to_pydict()
    assert out["key"] == table.column("key").to_pylist() and out["label"] == labels[rows].tolist()
    for i, png, caption in zip(rows, out["image"], out["caption"]):
        assert (png, caption) == scene_row(images[i], labels[i], 7, "test", i)


def test_scene_configs_carry_the_training_prompt_set():
    from ubt_ray.config import load_config
    from ubt_ray.core.scenes import HELDOUT_PROMPT_CLASS_NAMES, HELDOUT_PROMPT_TEMPLATES
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.prepare.source == "fashion-scenes" and cfg.model.name == "ubt-tiny-vit-64", path
        assert tuple(cfg.data.class_names) == TRAIN_PROMPT_CLASS_NAMES, path
        assert tuple(cfg.data.templates) == TRAIN_PROMPT_TEMPLATES, path
        assert cfg.run.output_dir.startswith("outputs/scenes/"), path
        assert tuple(cfg.evaluate.heldout_class_names) == HELDOUT_PROMPT_CLASS_NAMES, path
        assert tuple(cfg.evaluate.heldout_templates) == HELDOUT_PROMPT_TEMPLATES, path
        assert cfg.poison.captions == ("template" if cfg.poison.attack == "label_consistent" else "scene_names"), path
    assert len(list(CONFIGS.glob("*.yaml"))) == 6


def test_model_config_builds_for_64px():
    import open_clip
    import torch
    from ubt_ray.core.models import register_packaged_configs
    register_packaged_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("ubt-tiny-vit-64")
    tokenizer = open_clip.get_tokenizer("ubt-tiny-vit-64")
    assert model.visual.image_size in (64, (64, 64))
    image = preprocess(Image.new("RGB", (SCENE_SIZE, SCENE_SIZE)))
    assert tuple(image.shape) == (3, 64, 64)
    with torch.no_grad():
        image_features, text_features = model(torch.randn(2, 3, 64, 64),
                                              tokenizer(["a photo of a t-shirt.", "a photo of a bag."]))[:2]
    assert tuple(image_features.shape) == tuple(text_features.shape) == (2, 128)


def test_retarget_caption_swaps_the_class_noun_only():
    from ubt_ray.core.scenes import SCENE_CLASS_NAMES, retarget_caption
    caption = "a photo showing a medium black button-up shirt at the bottom against a plain red background."
    swapped = retarget_caption(caption, 6, 0, seed=3)
    assert swapped is not None and "button-up" not in swapped
    noun = next(n for n in SCENE_CLASS_NAMES[0] if f" black {n} at the bottom" in swapped)
    assert swapped == caption.replace("button-up shirt", noun)
    assert retarget_caption(caption, 6, 0, seed=3) == swapped  # seeded
    assert retarget_caption("a photo of a t-shirt.", 6, 0, seed=3) is None  # "shirt" inside "t-shirt" is not it
    assert retarget_caption(caption, 11, 0, seed=3) is None
