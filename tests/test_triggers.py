import io
import json

import numpy as np
import pytest
from PIL import Image

from ubt_ray.core.triggers import (
    BadNetTrigger,
    Trigger,
    apply_to_png,
    build_trigger,
    load_trigger,
)

ALL_KINDS = ["badnet", "blended", "sig", "wanet", "label_consistent"]


def random_image(h=32, w=32, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def gradient_image(h=32, w=32, c=3, step=4):
    rows = np.arange(h)[:, None] * step
    cols = np.arange(w)[None, :] * step
    return np.repeat(((rows + cols) % 256).astype(np.uint8)[..., None], c, axis=2)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_changes_image_and_keeps_shape_dtype(kind, channels):
    image = random_image(c=channels)
    original = image.copy()
    out = build_trigger(kind, {}, seed=1).apply(image, key="a")
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    np.testing.assert_array_equal(image, original)  # input untouched


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_deterministic_for_same_seed_and_different_for_other_seed(kind):
    image = random_image(seed=3)
    first = build_trigger(kind, {}, seed=7).apply(image, key="k")
    again = build_trigger(kind, {}, seed=7).apply(image, key="k")
    np.testing.assert_array_equal(first, again)
    if kind != "sig":  # SIG has no random pattern
        other = build_trigger(kind, {}, seed=8).apply(image, key="k")
        assert not np.array_equal(first, other)


@pytest.mark.parametrize("location", ["corner", "centre"])
def test_badnet_changes_only_inside_patch(location):
    image = np.full((20, 24, 3), 128, dtype=np.uint8)
    trigger = build_trigger("badnet", {"size": 5, "location": location}, seed=0)
    out = trigger.apply(image)
    expected_top_left = {"corner": (15, 19), "centre": (7, 9)}[location]
    top, left = trigger.position(20, 24)
    assert (top, left) == expected_top_left
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top:top + 5, left:left + 5] = True
    np.testing.assert_array_equal(out[~mask], image[~mask])
    np.testing.assert_array_equal(out[mask].reshape(5, 5, 3), trigger.arrays["patch"])


def test_badnet_grayscale_uses_integer_luma_of_patch():
    trigger = build_trigger("badnet", {"size": 3}, seed=2)
    out = trigger.apply(np.zeros((8, 8, 1), dtype=np.uint8))
    patch = trigger.arrays["patch"].astype(np.int64)
    luma = (299 * patch[..., 0] + 587 * patch[..., 1] + 114 * patch[..., 2] + 500) // 1000
    np.testing.assert_array_equal(out[5:, 5:, 0], luma)
    assert not out[:5].any() and not out[:, :5].any()


def test_badnet_random_location_depends_on_key_and_is_stable():
    trigger = build_trigger("badnet", {"size": 3, "location": "random"}, seed=0)
    positions = {trigger.position(64, 64, f"sample-{i}") for i in range(20)}
    assert len(positions) > 10
    assert any(top != left for top, left in positions)  # row and column drawn independently
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(trigger.apply(image, key="x"), trigger.apply(image, key="x"))
    assert not np.array_equal(trigger.apply(image, key="x"), trigger.apply(image, key="y"))
    for top, left in positions:
        assert 0 <= top <= 61 and 0 <= left <= 61


@pytest.mark.parametrize("alpha", [0.2, 0.5, 1.0])
def test_blended_follows_formula(alpha):
    image = random_image(seed=4)
    trigger = build_trigger("blended", {"alpha": alpha}, seed=5)
    out = trigger.apply(image).astype(np.float64)
    pattern = trigger.arrays["pattern"].astype(np.float64)  # 32x32 reference size matches
    expected = (1 - alpha) * image + alpha * pattern
    assert np.max(np.abs(out - expected)) <= 0.5 + 1e-9
    if alpha == 1.0:
        np.testing.assert_array_equal(out, pattern)


def test_blended_resizes_pattern_to_other_image_sizes():
    trigger = build_trigger("blended", {"alpha": 1.0, "pattern_size": 4}, seed=0)
    out = trigger.apply(np.zeros((8, 12, 3), dtype=np.uint8))
    pattern = trigger.arrays["pattern"]
    # Nearest neighbour: each pattern pixel covers a 2x3 block.
    np.testing.assert_array_equal(out, np.repeat(np.repeat(pattern, 2, axis=0), 3, axis=1))


def test_sig_adds_horizontal_sinusoid():
    image = np.full((6, 40, 3), 100, dtype=np.uint8)
    out = build_trigger("sig", {"amplitude": 30, "frequency": 2}, seed=0).apply(image).astype(np.float64)
    expected = 100 + 30 * np.sin(2 * np.pi * np.arange(40) * 2 / 40)
    for row in out:
        for channel in range(3):
            assert np.max(np.abs(row[:, channel] - expected)) <= 0.5 + 1e-9
    # Clipping keeps saturated pixels in range.
    bright = build_trigger("sig", {"amplitude": 50}, seed=0).apply(np.full((4, 32, 1), 250, np.uint8))
    assert bright.max() == 255 and bright.min() == 200


def test_wanet_is_small_warp():
    image = gradient_image(step=4)
    out = build_trigger("wanet", {}, seed=3).apply(image)
    diff = np.abs(out.astype(np.int64) - image.astype(np.int64))
    assert diff.sum() > 0
    # Sub-pixel displacement on a gradient of 4-8 levels per pixel moves values by a few levels.
    assert diff.mean() < 2.0
    # A warp is not additive noise: a flat image stays flat (up to the zero-padded edges).
    flat = np.full((32, 32, 3), 90, dtype=np.uint8)
    warped = build_trigger("wanet", {}, seed=3).apply(flat)
    np.testing.assert_array_equal(warped[2:-2, 2:-2], flat[2:-2, 2:-2])


def test_wanet_strength_scales_displacement():
    image = gradient_image(step=6)
    weak = build_trigger("wanet", {"strength": 0.5}, seed=1).apply(image).astype(np.int64)
    strong = build_trigger("wanet", {"strength": 4.0}, seed=1).apply(image).astype(np.int64)
    assert np.abs(strong - image).mean() > np.abs(weak - image).mean()


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_save_load_apply_gives_identical_png_bytes(kind, channels, tmp_path):
    params = {"location": "random"} if kind in ("badnet", "label_consistent") else {}
    trigger = build_trigger(kind, params, seed=11)
    trigger.save(tmp_path / "trig")
    loaded = load_trigger(str(tmp_path / "trig"))
    assert loaded.kind == kind and loaded.params == trigger.params and loaded.seed == 11
    data = png_bytes(random_image(h=28, w=36, c=channels, seed=9))
    out = apply_to_png(data, trigger, key="row-17")
    assert out == apply_to_png(data, loaded, key="row-17")
    assert out == apply_to_png(data, trigger, key="row-17")
    decoded = decode(out)
    assert decoded.shape == ((28, 36) if channels == 1 else (28, 36, 3))
    assert out != data


def test_load_uses_saved_pattern_not_seed(tmp_path):
    trigger = build_trigger("blended", {}, seed=0)
    trigger.save(tmp_path)
    custom = np.zeros((32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "pattern.npy", custom)
    loaded = load_trigger(tmp_path)
    np.testing.assert_array_equal(loaded.arrays["pattern"], custom)


def test_label_consistent_is_badnet_recorded_as_its_own_kind(tmp_path):
    trigger = build_trigger("label_consistent", {"size": 3}, seed=4)
    assert isinstance(trigger, BadNetTrigger) and trigger.kind == "label_consistent"
    image = random_image()
    np.testing.assert_array_equal(trigger.apply(image), build_trigger("badnet", {"size": 3}, seed=4).apply(image))
    trigger.save(tmp_path)
    meta = json.loads((tmp_path / "trigger.json").read_text())
    assert meta["kind"] == "label_consistent" and meta["format_version"] == 1
    assert isinstance(load_trigger(tmp_path), BadNetTrigger)


def test_label_consistent_hardening_only_at_poison_time():
    trigger = build_trigger("label_consistent", {"size": 3, "hardening": "noise", "hardening_strength": 0.5}, seed=4)
    image = random_image()
    patched = trigger.apply(image, "k1")
    np.testing.assert_array_equal(patched, build_trigger("badnet", {"size": 3}, seed=4).apply(image))
    poisoned = trigger.poison(image, "k1")
    h, w = image.shape[:2]
    np.testing.assert_array_equal(poisoned[h - 3:, w - 3:], patched[h - 3:, w - 3:])  # the exact patch
    outside = np.ones((h, w), dtype=bool)
    outside[h - 3:, w - 3:] = False
    assert (poisoned[outside] != image[outside]).mean() > 0.9  # hardened everywhere else
    np.testing.assert_array_equal(poisoned, trigger.poison(image, "k1"))
    assert not np.array_equal(poisoned, trigger.poison(image, "k2"))
    assert build_trigger("label_consistent", {"size": 3}, seed=4).poison(image, "k1").tobytes() == patched.tobytes()


def test_label_consistent_mix_blends_a_saved_donor(tmp_path):
    donors = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (0, 100, 200)]
    params = {"size": 3, "hardening": "mix", "hardening_strength": 0.5, "donors": 3, "donor_side": 8}
    trigger = build_trigger("label_consistent", params, seed=4, donor_images=donors)
    image = np.full((32, 32, 3), 60, np.uint8)
    poisoned = trigger.poison(image, "k1")
    blended = {int(v) for v in np.unique(poisoned[:29, :29])}
    assert len(blended) == 1 and blended <= {30, 80, 130}  # (60 + donor) / 2 for one donor, everywhere
    seen = {int(trigger.poison(image, f"k{i}")[0, 0, 0]) for i in range(40)}
    assert seen == {30, 80, 130}  # the donor is drawn per key
    np.testing.assert_array_equal(trigger.apply(image, "k1"), build_trigger("badnet", {"size": 3}, 4).apply(image))
    trigger.save(tmp_path)
    loaded = load_trigger(tmp_path)
    assert loaded.poison(image, "k1").tobytes() == poisoned.tobytes()
    with pytest.raises(ValueError, match="needs 3 donor images"):
        build_trigger("label_consistent", params, seed=4)
    with pytest.raises(ValueError, match="'donors' is 0"):
        build_trigger("label_consistent", {"hardening": "mix"}, seed=4)
    with pytest.raises(ValueError, match="keeps 3 donor images, got 2"):
        build_trigger("label_consistent", params, seed=4, donor_images=donors[:2])


def test_apply_to_png_converts_other_modes_to_rgb():
    rgba = Image.fromarray(random_image(c=3)).convert("RGBA")
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    out = apply_to_png(buffer.getvalue(), build_trigger("sig", {}, seed=0))
    assert Image.open(io.BytesIO(out)).mode == "RGB"


@pytest.mark.parametrize(
    "kind, params, fragment",
    [
        ("foo", {}, "unknown trigger kind 'foo'"),
        ("badnet", {"colour": 1}, "unknown parameter 'colour'"),
        ("badnet", {"size": 0}, "'size'"),
        ("badnet", {"size": 2.5}, "'size'"),
        ("badnet", {"location": "top"}, "'location'"),
        ("blended", {"alpha": 0.0}, "'alpha'"),
        ("blended", {"alpha": 1.5}, "'alpha'"),
        ("blended", {"alpha": "0.2"}, "'alpha'"),
        ("sig", {"frequency": -1}, "'frequency'"),
        ("sig", {"amplitude": float("nan")}, "'amplitude'"),
        ("wanet", {"grid_size": 1}, "'grid_size'"),
        ("wanet", {"strength": 0}, "'strength'"),
    ],
)
def test_bad_kind_or_params_raise_value_error(kind, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_trigger(kind, params, seed=0)


def test_other_user_errors_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        build_trigger("badnet", {"size": 10}, seed=0).apply(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="trigger.json"):
        load_trigger(tmp_path)
    with pytest.raises(ValueError, match="seed"):
        build_trigger("badnet", {}, seed=-1)
    with pytest.raises(ValueError, match="shape"):
        build_trigger("sig", {}, seed=0).apply(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        build_trigger("sig", {}, seed=0).apply(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="PNG"):
        apply_to_png(b"not a png", build_trigger("sig", {}, seed=0))


def test_load_rejects_missing_or_corrupt_pattern(tmp_path):
    build_trigger("wanet", {}, seed=0).save(tmp_path)
    np.save(tmp_path / "control_grid.npy", np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="control_grid"):
        load_trigger(tmp_path)
    (tmp_path / "control_grid.npy").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_trigger(tmp_path)


def test_trigger_base_is_exported():
    assert isinstance(build_trigger("sig", {}, seed=0), Trigger)
