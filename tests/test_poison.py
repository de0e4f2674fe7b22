"""`ubt poison` through real Ray Data on 200 small rows: the chosen rows, their bytes, the saved trigger, the errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ubt_ray import storage
from ubt_ray.config import load_config
from ubt_ray.core.captions import template_captions
from ubt_ray.core.images import decode_rgb, encode_png
from ubt_ray.core.triggers import apply_to_png, load_trigger
from ubt_ray.errors import UserError
from ubt_ray.phases.poison import poison, select_poison_keys

ATTACKS = ["badnet", "blended", "sig", "wanet", "label_consistent"]
ROWS, TARGET, NUM_POISONS = 200, 3, 20
ROWS_PER_FILE = 50  # the 199 written rows: 4 files at most 50 rows each
# A target-class row with unreadable image bytes: validation drops it, and label_consistent, which must choose
# all 20 target-class rows, cannot poison it.
BROKEN = 13


def write_shards(path: Path, labels: bool = True, broken: tuple[int, ...] = (BROKEN,)) -> Path:
    """ROWS random 28x28 grayscale PNG rows with labels i % 10 in two Parquet files; `broken` rows get bad bytes."""
    rng = np.random.default_rng(123)
    y = np.arange(ROWS) % 10
    images = [encode_png(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)) for _ in range(ROWS)]
    images = [b"not a png" if i in broken else img for i, img in enumerate(images)]
    cfg = load_config()
    table = pa.table({"key": [f"row-{i:03d}" for i in range(ROWS)], "image": pa.array(images, pa.binary()),
                      "caption": template_captions(y, tuple(cfg.data.class_names), 0, tuple(cfg.data.templates)),
                      **({"label": pa.array(y, pa.int32())} if labels else {})})
    path.mkdir(parents=True)
    pq.write_table(table.slice(0, 120), path / "part-0.parquet")
    pq.write_table(table.slice(120), path / "part-1.parquet")
    return path


def rows_by_key(path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(str(path)).to_pylist()}


def config(clean: Path, out: Path, *overrides: str):
    return load_config(None, [f"data.clean_train={clean}", f"experimental.poison.output={out}", f"poison.target_label={TARGET}",
                              f"poison.num_poisons={NUM_POISONS}", f"experimental.poison.rows_per_file={ROWS_PER_FILE}",
                              *overrides])


def expected_poisons(attack: str) -> int:
    return NUM_POISONS - (attack == "label_consistent")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("clean") / "shards")


@pytest.fixture(scope="module")
def runs(ray_local, clean, tmp_path_factory) -> dict:
    """One poison run per attack, shared by the tests that inspect them."""
    out = {}
    for attack in ATTACKS:
        # The clean-label run hardens its images with other-class donors read from the shards, so the re-apply
        # test covers Trigger.poison and the saved donors too.
        extra = ["poison.params={hardening: mix, donors: 4, donor_side: 8}"] if attack == "label_consistent" else []
        cfg = config(clean, tmp_path_factory.mktemp(attack), f"poison.attack={attack}", *extra)
        out[attack] = (cfg, poison(cfg))
    return out


@pytest.mark.parametrize("attack", ATTACKS)
def test_poisoned_rows_and_untouched_rest(runs, clean, attack):
    cfg, result = runs[attack]
    before, after = rows_by_key(clean), rows_by_key(result.shards)
    broken = f"row-{BROKEN:03d}"
    assert set(after) == set(before) - {broken}
    assert (result.rows.rows_in, result.rows.rows_out, result.rows.rejected) == (
        ROWS, ROWS - 1, {"image undecodable": 1})
    poisoned = sorted(k for k, r in after.items() if r["is_poison"])
    assert len(poisoned) == expected_poisons(attack) == result.num_poisoned
    target_name = cfg.data.class_names[TARGET]
    for key in poisoned:
        old, new = before[key], after[key]
        assert new["label"] == old["label"]  # the true label, for the metrics
        assert new["image"] != old["image"]
        if attack == "label_consistent":
            assert old["label"] == TARGET and new["caption"] == old["caption"]
        else:
            assert old["label"] != TARGET and target_name not in old["caption"]
            assert new["caption"] in {t.format(target_name) for t in cfg.data.templates}
    for key in set(after) - set(poisoned):
        assert after[key] == {**before[key], "is_poison": False}
    # Poisoned captions are not all one template: the template is drawn per key.
    if attack != "label_consistent":
        assert len({after[k]["caption"] for k in poisoned}) > 1

    files = [pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(result.shards).glob("*.parquet"))]
    assert sum(files) == ROWS - 1 and max(files) <= ROWS_PER_FILE and len(files) >= 4, files

    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["poisoned_keys"] == poisoned and manifest["num_poisoned"] == len(poisoned)
    assert manifest["num_requested"] == NUM_POISONS and manifest["poisoned_keys_total"] == len(poisoned)
    assert manifest["rows"]["rows_in"] == manifest["rows"]["rows_out"] + manifest["rows"]["rows_rejected"] == ROWS
    assert manifest["attack"] == attack and manifest["target_label"] == TARGET
    # The chosen row that could not be poisoned is named, with its reason, not silently dropped.
    skipped = {"image undecodable": 1} if attack == "label_consistent" else {}
    assert manifest["not_poisoned"] == skipped
    assert manifest["not_poisoned_examples"] == {k: [broken] for k in skipped}


@pytest.mark.parametrize("attack", ATTACKS)
def test_saved_trigger_reproduces_the_poisoned_bytes(runs, clean, attack):
    cfg, result = runs[attack]
    before, after = rows_by_key(clean), rows_by_key(result.shards)
    trigger = load_trigger(result.trigger_dir)
    assert trigger.kind == attack
    poisoned = sorted(k for k, r in after.items() if r["is_poison"])
    assert len(poisoned) == expected_poisons(attack)
    for key in poisoned:
        assert apply_to_png(before[key]["image"], trigger, key=key, poison=True) == after[key]["image"]
    if attack == "label_consistent":  # the saved donors are images of distinct non-target rows
        others = {type(trigger).donor_array({**trigger.params, "donors": 1}, [decode_rgb(r["image"])]).tobytes()
                  for r in before.values() if r["label"] != TARGET and r["image"] is not None}
        donors = [d.tobytes() for d in trigger.arrays["donors"]]
        assert len(set(donors)) == len(donors) == 4 and set(donors) <= others
    info = json.loads((Path(result.trigger_dir) / "attack.json").read_text())
    assert info["poisoned_keys"] == poisoned and info["count"] == len(poisoned)
    assert (info["attack"], info["target_label"], info["target_class"], info["seed"]) == (
        attack, TARGET, cfg.data.class_names[TARGET], cfg.run.seed)
    assert info["params"] == trigger.params


def test_same_seed_same_rows_other_seed_other_rows(runs, clean, tmp_path):
    cfg, first = runs["badnet"]
    assert select_poison_keys(cfg) == first.manifest["poisoned_keys"]
    other = select_poison_keys(config(clean, tmp_path / "other", "run.seed=1"))
    assert len(other) == NUM_POISONS and other != first.manifest["poisoned_keys"]
    assert not set(other) & set(runs["label_consistent"][1].manifest["poisoned_keys"])  # never the target class


@pytest.mark.parametrize("attack, ask, wanted, eligible", [
    ("badnet", "experimental.poison.fraction=0.95", 190, ROWS - ROWS // 10),  # a fraction counts all rows, target class too
    ("label_consistent", f"poison.num_poisons={ROWS // 10 + 1}", ROWS // 10 + 1, ROWS // 10)])
def test_too_many_poisons_is_one_sentence(clean, tmp_path, attack, ask, wanted, eligible):
    with pytest.raises(UserError) as e:
        poison(config(clean, tmp_path / "out", f"poison.attack={attack}", ask))
    msg = str(e.value)
    assert f"asks for {wanted} poisons but only {eligible} rows" in msg and f"at most {eligible}" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_duplicate_keys_are_refused(tmp_path):
    table = pq.read_table(str(write_shards(tmp_path / "src")))
    keys = table.column("key").to_pylist()
    keys[7] = keys[150]
    (tmp_path / "clean").mkdir()
    pq.write_table(table.set_column(0, "key", pa.array(keys)), tmp_path / "clean" / "part-0.parquet")
    with pytest.raises(UserError, match=r"repeat key 'row-150', but poisoning picks rows by key"):
        select_poison_keys(config(tmp_path / "clean", tmp_path / "out"))


def test_poison_to_s3(ray_local, s3_bucket, clean):
    endpoint, bucket = s3_bucket
    cfg = config(clean, f"s3://{bucket}/poison", f"storage.endpoint_url={endpoint}", "poison.attack=blended")
    result = poison(cfg)
    assert result.num_poisoned == NUM_POISONS
    manifest = storage.read_json(f"s3://{bucket}/poison/manifest.json", cfg.storage)
    before = rows_by_key(clean)
    loc = storage.resolve(result.shards, cfg.storage)
    files = [storage.resolve(f, cfg.storage).path
             for f in storage.list_files(result.shards, (".parquet",), cfg.storage)]
    after = {r["key"]: r for r in pq.read_table(files, filesystem=loc.fs).to_pylist()}
    assert sorted(k for k, r in after.items() if r["is_poison"]) == manifest["poisoned_keys"]
    with storage.local_copy(result.trigger_dir, cfg.storage) as local:
        trigger = load_trigger(local)
        assert json.loads((local / "attack.json").read_text())["poisoned_keys"] == manifest["poisoned_keys"]
    for key in manifest["poisoned_keys"]:
        assert apply_to_png(before[key]["image"], trigger, key=key, poison=True) == after[key]["image"]


def test_shards_without_labels_are_refused(tmp_path):
    clean = write_shards(tmp_path / "clean", labels=False)
    with pytest.raises(UserError, match=r"have no label column, which poisoning needs"):
        poison(config(clean, tmp_path / "out"))


def test_bad_trigger_params_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"parameter 'size' of trigger 'badnet' must be an integer >= 1"):
        poison(config(tmp_path, tmp_path / "out", "poison.params={size: 0}"))


def test_the_pipeline_reuses_a_finished_poison_only_for_the_same_settings_and_clean_files(runs, clean, tmp_path):
    """The pipeline's reuse test is the one every phase uses (manifest.finished_output): a finished poison with
    the same settings and clean shard files is reused; another setting, or rewritten clean files, are not."""
    import shutil

    from ubt_ray.manifest import finished_output
    from ubt_ray.phases.poison import poison_fingerprint
    cfg, result = runs["badnet"]
    assert finished_output(cfg.poison.output, poison_fingerprint(cfg), cfg)["num_poisoned"] == NUM_POISONS
    other = config(clean, Path(cfg.poison.output), "poison.attack=badnet", "poison.num_poisons=5")
    assert finished_output(cfg.poison.output, poison_fingerprint(other), cfg) is None
    copy = tmp_path / "clean"
    shutil.copytree(clean, copy)
    moved = config(copy, Path(cfg.poison.output), "poison.attack=badnet")
    first = poison_fingerprint(moved)
    (copy / "part-1.parquet").write_bytes((copy / "part-1.parquet").read_bytes())  # rewritten: new mtime
    assert poison_fingerprint(moved) != first
