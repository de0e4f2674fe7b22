"""prepare: a source (Fashion-MNIST idx files, a CleanCLIP-style CSV, webdataset tars) -> validated Parquet shards."""

from __future__ import annotations

import csv
import gzip
import io
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import ray

from ..cluster import ensure_ray
from ..config import Config
from ..core.captions import template_captions
from ..core.images import encode_png
from ..errors import UserError
from ..manifest import RowCounts, write_manifest
from ..shards import validate_and_write
from .. import storage

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BLOCK_ROWS = 5000
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


@dataclass
class PrepareResult:
    output: str
    rows: RowCounts
    splits: dict[str, RowCounts] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def prepare(cfg: Config) -> PrepareResult:
    """Run the configured source into shards under `prepare.output`, with a manifest of every row."""
    started = time.time()
    # Fail on a wrong path or an unreachable endpoint before paying for Ray's start-up.
    if not storage.exists(cfg.prepare.input, cfg.storage):
        raise UserError(f"{cfg.prepare.input} does not exist: set prepare.input to the {cfg.prepare.source} input.")
    ensure_ray(cfg.ray)
    source = cfg.prepare.source
    if source == "fashion-mnist":
        splits = {name: _write(cfg, _fashion_mnist_dataset(cfg, name), storage.join(cfg.prepare.output, name))
                  for name in FASHION_MNIST_FILES}
    elif source == "csv":
        splits = {"all": _write(cfg, _csv_dataset(cfg), cfg.prepare.output)}
    else:
        splits = {"all": _write(cfg, _webdataset_dataset(cfg), cfg.prepare.output)}
    total = RowCounts()
    for counts in splits.values():
        total.merge(counts)
    total.check(cfg.prepare.output)
    manifest = write_manifest(cfg.prepare.output, "prepare", cfg, inputs={"source": source, "input": cfg.prepare.input},
                              rows=total, started=started,
                              extra={"splits": {k: v.to_dict() for k, v in splits.items()}})
    if total.rows_out == 0:
        raise UserError(f"every one of the {total.rows_in} rows of {cfg.prepare.input} was rejected "
                        f"({', '.join(total.rejected)}): see {storage.join(cfg.prepare.output, 'manifest.json')}.")
    return PrepareResult(cfg.prepare.output, total, splits, manifest)


def _write(cfg: Config, ds: ray.data.Dataset, out: str) -> RowCounts:
    return validate_and_write(ds, out, cfg, cfg.prepare.rows_per_file)


# --- Fashion-MNIST -------------------------------------------------------------------------------------------

def read_idx(uri: str, cfg: Config) -> np.ndarray:
    """An idx file (optionally .gz) as a numpy array."""
    data = storage.read_bytes(uri, cfg.storage)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{uri} is not an unsigned-byte idx file: point prepare.input at the Fashion-MNIST "
                        f"directory (`dpkg -L dataset-fashion-mnist`).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(cfg: Config, stem: str) -> str:
    for name in (stem + ".gz", stem):
        uri = storage.join(cfg.prepare.input, name)
        if storage.exists(uri, cfg.storage):
            return uri
    raise UserError(f"{stem}(.gz) not found in {cfg.prepare.input}: install the Debian package "
                    f"dataset-fashion-mnist or set prepare.input to the directory holding the idx files.")


def _fashion_mnist_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(cfg, images_file), cfg)
    labels = read_idx(_find_idx(cfg, labels_file), cfg)
    if len(images) != len(labels):
        raise UserError(f"{cfg.prepare.input}: {split} images ({len(images)}) and labels ({len(labels)}) differ "
                        f"in count: reinstall dataset-fashion-mnist.")
    # The test split draws its templates from a different stream than train, both fixed by run.seed.
    if len(cfg.data.class_names) < 10:
        raise UserError(f"data.class_names has {len(cfg.data.class_names)} names but Fashion-MNIST has 10 classes: "
                        f"give all 10 (or leave the default).")
    captions = template_captions(labels, tuple(cfg.data.class_names), seed=cfg.run.seed * 2 + (split == "test"),
                                 templates=tuple(cfg.data.templates))
    blocks = []
    for start in range(0, len(images), BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, len(images))
        blocks.append(pa.table({
            "key": [f"fmnist-{split}-{i:05d}" for i in range(start, end)],
            "pixels": pa.array([images[i].tobytes() for i in range(start, end)], pa.binary()),
            "caption": captions[start:end],
            "label": pa.array(labels[start:end].astype(np.int32)),
        }))
    h, w = images.shape[1:]
    return ray.data.from_arrow(blocks).map_batches(_encode_pixels, batch_format="pyarrow",
                                                   fn_kwargs={"height": h, "width": w})


def _encode_pixels(table: pa.Table, height: int, width: int) -> pa.Table:
    pngs = [encode_png(np.frombuffer(b, np.uint8).reshape(height, width)) for b in table.column("pixels").to_pylist()]
    return table.drop_columns(["pixels"]).append_column("image", pa.array(pngs, pa.binary()))


# --- CleanCLIP-style CSV -------------------------------------------------------------------------------------

def _csv_dataset(cfg: Config) -> ray.data.Dataset:
    p = cfg.prepare
    text = storage.read_bytes(p.input, cfg.storage).decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text), delimiter=p.csv_delimiter)
    header = reader.fieldnames or []
    needed = [c for c in (p.image_column, p.caption_column, p.label_column) if c]
    missing = [c for c in needed if c not in header]
    if missing:
        raise UserError(f"{p.input} has no column(s) {', '.join(missing)} (it has {', '.join(header) or 'none'}): "
                        f"set prepare.image_column / prepare.caption_column / prepare.label_column.")
    rows = list(reader)
    if not rows:
        raise UserError(f"{p.input} has a header but no rows: give it at least one image,caption row.")
    stem = PurePosixPath(p.input).stem
    base = p.input.rsplit("/", 1)[0] if "/" in p.input else "."
    labels = [r.get(p.label_column) for r in rows] if p.label_column else None
    table = pa.table({
        "key": [f"{stem}-{i:08d}" for i in range(len(rows))],
        "path": [_join_relative(base, r.get(p.image_column)) for r in rows],
        "caption": [r.get(p.caption_column) for r in rows],
        **({"label_text": labels} if labels is not None else {}),
    })
    blocks = [table.slice(s, BLOCK_ROWS) for s in range(0, len(rows), BLOCK_ROWS)]
    return ray.data.from_arrow(blocks).map_batches(_load_images, batch_format="pyarrow",
                                                   fn_kwargs={"storage_cfg": cfg.storage})


def _join_relative(base: str, path: str | None) -> str | None:
    if not path:
        return None
    if storage.is_s3(path) or path.startswith("/"):
        return path
    return storage.join(base, path)


def _load_images(table: pa.Table, storage_cfg) -> pa.Table:
    """Read each row's image file; a missing or unreadable file leaves the image null (rejected at validation)."""
    images = []
    for path in table.column("path").to_pylist():
        try:
            images.append(storage.read_bytes(path, storage_cfg) if path else None)
        except UserError:
            images.append(None)
    out = table.drop_columns(["path"]).append_column("image", pa.array(images, pa.binary()))
    if "label_text" in out.column_names:
        labels = [_parse_int(v) for v in out.column("label_text").to_pylist()]
        out = out.drop_columns(["label_text"]).append_column("label", pa.array(labels, pa.int32()))
    return out


def _parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


# --- webdataset tars ------------------------------------------------------------------------------------------

def _webdataset_dataset(cfg: Config) -> ray.data.Dataset:
    files = storage.list_files(cfg.prepare.input, (".tar",), cfg.storage)
    if not files:
        raise UserError(f"no .tar shards under {cfg.prepare.input}: point prepare.input at webdataset tar files.")
    loc = storage.resolve(cfg.prepare.input, cfg.storage)
    paths = [storage.resolve(f, cfg.storage).path for f in files]
    with storage.friendly_errors(cfg.prepare.input, cfg.storage, "read"):
        ds = ray.data.read_binary_files(paths, filesystem=loc.fs, include_paths=True)
    return ds.map_batches(_expand_tars, batch_format="pyarrow", batch_size=1)


def _expand_tars(table: pa.Table) -> pa.Table:
    """One row per sample of each tar: members grouped by basename, image from jpg/png/webp, caption from txt."""
    keys, images, captions, labels = [], [], [], []
    for path, data in zip(table.column("path").to_pylist(), table.column("bytes").to_pylist()):
        samples: dict[str, dict[str, bytes]] = {}
        stem = PurePosixPath(path).stem
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    name = PurePosixPath(member.name)
                    base, _, ext = name.name.partition(".")
                    samples.setdefault(str(name.parent / base), {})[ext.lower()] = tar.extractfile(member).read()
        except tarfile.TarError:
            # An unreadable tar still yields a row so that the manifest counts it.
            keys.append(f"{stem}/<unreadable tar>")
            images.append(None), captions.append(None), labels.append(None)
            continue
        for base, parts in sorted(samples.items()):
            keys.append(f"{stem}/{base}")
            images.append(next((parts[e] for e in IMAGE_SUFFIXES if e in parts), None))
            txt = parts.get("txt")
            captions.append(txt.decode("utf-8", errors="replace").strip() if txt is not None else None)
            labels.append(_parse_int(parts["cls"].decode(errors="replace").strip()) if "cls" in parts else None)
    # `label` is always present (null where a sample has no .cls) so that every block has one schema.
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                     "caption": pa.array(captions, pa.string()), "label": pa.array(labels, pa.int32())})
