"""benchmarks/scale.py's synthetic shards: every copy of a row has its own key and image bytes, its image is the
source's but for a few least-significant bits, and the same arguments give the same rows however they are
split into files."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.scale import COPY_BITS, jittered_copies, load_source, parse_rows

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
