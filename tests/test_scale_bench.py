"""benchmarks/scale.py's synthetic shards: every copy of a row has its own key and image bytes, its image is the
source's but for a few least-significant bits, and the same arguments give the same rows however they are
split into files."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.scale import COPY_BITS, jittered_copies, largest_score_difference, load_source, parse_rows

from helpers import caption_shards


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def test_copies_have_distinct_keys_and_bytes_and_differ_from_their_source_in_a_few_low_bits(tmp_path):
    source_dir = caption_shards(tmp_path / "shards", rows=40, files=2)
    source = load_source(source_dir)
    originals = pq.read_table(source_dir).to_pylist()
    rows = jittered_copies(source, 0, 200, seed=3)  # five copies of each row
    keys, images = rows.column("key").to_pylist(), rows.column("image").to_pylist()
    assert len(set(keys)) == len(set(images)) == 200
    for i, row in enumerate(rows.to_pylist()):
        original = originals[i % 40]
        assert row["key"] == f"{original['key']}~{i // 40}"
        assert (row["caption"], row["label"]) == (original["caption"], original["label"])
        changed = _pixels(row["image"]) - _pixels(original["image"])
        assert 1 <= np.count_nonzero(changed) <= COPY_BITS and np.abs(changed).max() == 1


def test_copies_are_the_same_for_the_same_seed_however_split_and_other_for_another_seed(tmp_path):
    source = load_source(caption_shards(tmp_path / "shards", rows=30, files=1))
    whole = jittered_copies(source, 0, 100, seed=5)
    assert pa.concat_tables([jittered_copies(source, 0, 37, seed=5), jittered_copies(source, 37, 63, seed=5)]) \
        .equals(whole)
    other = jittered_copies(source, 0, 100, seed=6)
    assert other.column("key").equals(whole.column("key"))
    assert sum(a != b for a, b in zip(other.column("image").to_pylist(), whole.column("image").to_pylist())) > 90


def test_row_sizes_are_checked():
    assert parse_rows("2000,4_000") == [2000, 4000]
    for bad in ("", "12,x", "0"):
        with pytest.raises(Exception, match="--rows takes positive row counts"):
            parse_rows(bad)


def test_the_ray_and_plain_tables_are_compared_on_every_score_column(tmp_path):
    """The comparison takes cos, each signal, the combined score and the transfer lift (NaN outside the pool, which
    must be NaN in both), and refuses tables of other rows or other columns."""
    keys = ["a", "b", "c"]
    plain = pa.table({"key": keys, "cos": [0.5, 0.4, 0.3], "drop_token_mask": [0.1, 0.2, 0.3],
                      "drop_blur": [0.0, 0.1, 0.2], "transfer_lift": [0.7, float("nan"), float("nan")]})
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    # Another row order, and the combined columns the Ray run adds.
    ray = plain.take([2, 0, 1]).append_column("score", pa.array([0.3, 0.1, 0.2])).append_column(
        "transform", pa.array(["token_mask"] * 3))
    ray = ray.set_column(ray.column_names.index("drop_blur"), "drop_blur", pa.array([0.2, 0.0, 0.25]))
    pq.write_table(ray, ray_dir / "part-0.parquet")
    pq.write_table(plain, tmp_path / "plain.parquet")
    assert largest_score_difference(str(ray_dir), str(tmp_path / "plain.parquet")) == pytest.approx(0.15)
    lifted = plain.set_column(plain.column_names.index("transfer_lift"), "transfer_lift",
                              pa.array([0.7, 0.1, float("nan")]))  # b in the pool of one run only
    pq.write_table(lifted, tmp_path / "lifted.parquet")
    assert largest_score_difference(str(ray_dir), str(tmp_path / "lifted.parquet")) == float("inf")
    pq.write_table(plain.slice(0, 2), tmp_path / "fewer.parquet")
    with pytest.raises(SystemExit, match="did not score the same rows"):
        largest_score_difference(str(ray_dir), str(tmp_path / "fewer.parquet"))
    pq.write_table(ray.drop_columns(["drop_blur"]), ray_dir / "part-0.parquet")
    with pytest.raises(SystemExit, match="did not score alike"):
        largest_score_difference(str(ray_dir), str(tmp_path / "plain.parquet"))


def test_growth_compares_each_larger_size_with_the_smallest():
    from benchmarks.scale import growth
    records = [{"phase": "score", "rows": 600, "rows_per_s": 90.0, "driver_peak_rss": 1200},
               {"phase": "select", "rows": 60, "rows_per_s": 1.0, "driver_peak_rss": 1},
               {"phase": "score", "rows": 60, "rows_per_s": 100.0, "driver_peak_rss": 1000}]
    assert growth(records) == ["", "Score at 600 rows against 60: rows/s x0.90, driver peak RSS x1.20."]
    assert growth(records[1:]) == []
