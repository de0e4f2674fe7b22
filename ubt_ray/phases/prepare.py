"""prepare: a source (Fashion-MNIST idx files, a CleanCLIP-style CSV, webdataset tars) -> validated Parquet shards."""

from __future__ import annotations

import csv
import gzip
import io
import lzma
import posixpath
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import ray

from ..cluster import ensure_ray
from ..checks import check_csv_delimiter, check_fashion_mnist_classes
from ..config import Config
from ..core.captions import template_captions
from ..core.images import encode_png
from ..errors import UserError
from ..cost import cluster_cpu_usage
from ..manifest import RowCounts, fingerprint, write_manifest
from ..shards import REJECT_COLUMN, validate_and_write
from .. import console, storage

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


def prepare_fingerprint(cfg: Config) -> dict:
    """What makes two prepares the same (its inputs, declared once): the prepare, data and run settings."""
    return fingerprint(cfg, ("prepare", "data", "run"), {})


@console.phase("prepare", lambda cfg: f"{cfg.prepare.source} {cfg.prepare.input} -> {cfg.prepare.output}",
               lambda r: f"{r.rows.rows_out} rows written, {r.rows.rows_rejected} rejected")
def prepare(cfg: Config) -> PrepareResult:
    """Run the configured source into shards under `prepare.output`, with a manifest of every row."""
    started = time.time()
    # Fail on a wrong path or an unreachable endpoint before paying for Ray's start-up.
    if not storage.exists(cfg.prepare.input, cfg.storage):
        raise UserError(f"{cfg.prepare.input} does not exist: set prepare.input to the {cfg.prepare.source} input.")
    storage.claim_output(cfg.prepare.output, "prepare", cfg.storage)
    ensure_ray(cfg.ray)
    source = cfg.prepare.source
    if source == "fashion-mnist":
        splits = {name: _write(cfg, _fashion_mnist_dataset(cfg, name), storage.join(cfg.prepare.output, name))
                  for name in FASHION_MNIST_FILES}
    elif source == "fashion-scenes":
        splits = {name: _write(cfg, _fashion_scenes_dataset(cfg, name), storage.join(cfg.prepare.output, name))
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
                              rows=total, started=started, usage=cluster_cpu_usage(),
                              extra={"splits": {k: v.to_dict() for k, v in splits.items()}},
                              signature=prepare_fingerprint(cfg))
    if total.rows_out == 0:
        raise UserError(f"every one of the {total.rows_in} rows of {cfg.prepare.input} was rejected "
                        f"({', '.join(total.rejected)}): see {storage.join(cfg.prepare.output, 'manifest.json')}.")
    return PrepareResult(cfg.prepare.output, total, splits, manifest)


def _write(cfg: Config, ds: ray.data.Dataset, out: str) -> RowCounts:
    return validate_and_write(ds, out, cfg, cfg.prepare.rows_per_file, progress="prepare")


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


def _fashion_mnist_split(cfg: Config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(items (N, 28, 28) uint8, labels (N,)) of a Fashion-MNIST split, from the idx files under prepare.input."""
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(cfg, images_file), cfg)
    labels = read_idx(_find_idx(cfg, labels_file), cfg)
    if len(images) != len(labels):
        raise UserError(f"{cfg.prepare.input}: {split} images ({len(images)}) and labels ({len(labels)}) differ "
                        f"in count: reinstall dataset-fashion-mnist.")
    return images, labels


def _fashion_mnist_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    images, labels = _fashion_mnist_split(cfg, split)
    # The test split draws its templates from a different stream than train, both fixed by run.seed.
    check_fashion_mnist_classes(cfg)
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


# --- fashion-scenes: Fashion-MNIST items as 64x64 RGB scenes with grammar captions (ubt_ray/core/scenes.py) ---

def _fashion_scenes_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    """The split's Fashion-MNIST items as scene rows (key, caption, label, image), rendered in Ray Data tasks."""
    images, labels = _fashion_mnist_split(cfg, split)
    # Each row's scene is a function of (run.seed, split, row index) alone, so Ray's batching cannot change it.
    blocks = []
    for start in range(0, len(images), BLOCK_ROWS):
        end = min(start + BLOCK_ROWS, len(images))
        blocks.append(pa.table({
            "key": [f"scenes-{split}-{i:05d}" for i in range(start, end)],
            "index": pa.array(np.arange(start, end, dtype=np.int64)),
            "pixels": pa.array([images[i].tobytes() for i in range(start, end)], pa.binary()),
            "label": pa.array(labels[start:end].astype(np.int32)),
        }))
    h, w = images.shape[1:]
    return ray.data.from_arrow(blocks).map_batches(_render_scenes, batch_format="pyarrow",
                                                   fn_kwargs={"height": h, "width": w, "seed": cfg.run.seed,
                                                              "split": split})


def _render_scenes(table: pa.Table, height: int, width: int, seed: int, split: str) -> pa.Table:
    """The batch's rows as scenes: PNG image and caption from each row's item pixels, label and index."""
    from ..core.scenes import scene_row  # imported here so that the other sources never load the scene code
    pngs, captions = [], []
    for pixels, label, index in zip(table.column("pixels").to_pylist(), table.column("label").to_pylist(),
                                    table.column("index").to_pylist()):
        png, caption = scene_row(np.frombuffer(pixels, np.uint8).reshape(height, width), label, seed, split, index)
        pngs.append(png)
        captions.append(caption)
    return pa.table({"key": table.column("key"), "caption": pa.array(captions, pa.string()),
                     "label": table.column("label"), "image": pa.array(pngs, pa.binary())})


# --- CleanCLIP-style CSV -------------------------------------------------------------------------------------

def _csv_dataset(cfg: Config) -> ray.data.Dataset:
    p = cfg.prepare
    # surrogateescape keeps each byte that is not UTF-8 as a lone surrogate, so that the rows holding one are
    # rejected with that reason rather than read with replacement characters.
    text = storage.read_bytes(p.input, cfg.storage).decode("utf-8-sig", errors="surrogateescape")
    check_csv_delimiter(p)
    reader = csv.DictReader(io.StringIO(text), delimiter=p.csv_delimiter)
    try:
        header = reader.fieldnames or []
        needed = [c for c in (p.image_column, p.caption_column, p.label_column) if c]
        missing = [c for c in needed if c not in header]
        if missing:
            raise UserError(f"{p.input} has no column(s) {', '.join(missing)} (it has "
                            f"{', '.join(header).encode('utf-8', 'backslashreplace').decode() or 'none'}): "
                            f"set prepare.image_column / prepare.caption_column / prepare.label_column.")
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{p.input} is not a readable CSV (line {reader.line_num}: {e}): fix that line, or set "
                        f"prepare.csv_delimiter to its delimiter.") from None
    if not rows:
        raise UserError(f"{p.input} has a header but no rows: give it at least one image,caption row.")
    stem = PurePosixPath(p.input).stem
    input_uri = storage.absolute(p.input)  # Ray workers do not share this process's cwd
    base = input_uri.rsplit("/", 1)[0] or "/"
    paths, captions, labels, reasons = [], [], [], []
    for r in rows:
        path, reason = _join_relative(base, r.get(p.image_column), p.allow_absolute_paths)
        caption = r.get(p.caption_column)
        if caption is not None and not _is_utf8(caption):
            caption, reason = None, reason or "caption not UTF-8"
        label = None
        if p.label_column:
            label, label_reason = _parse_int(r.get(p.label_column))
            reason = reason or label_reason
        paths.append(None if reason else path)  # a refused path is never read
        captions.append(caption)
        labels.append(label)
        reasons.append(reason)
    table = pa.table({
        "key": [f"{stem}-{i:08d}" for i in range(len(rows))],
        "path": pa.array(paths, pa.string()),
        "caption": pa.array(captions, pa.string()),
        **({"label": pa.array(labels, pa.int32())} if p.label_column else {}),
        REJECT_COLUMN: pa.array(reasons, pa.string()),
    })
    blocks = [table.slice(s, BLOCK_ROWS) for s in range(0, len(rows), BLOCK_ROWS)]
    return ray.data.from_arrow(blocks).map_batches(_load_images, batch_format="pyarrow",
                                                   fn_kwargs={"storage_cfg": cfg.storage})


def _is_utf8(text: str) -> bool:
    """False when `text` holds bytes that were not UTF-8 (lone surrogates from surrogateescape)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _normal(uri: str) -> str:
    """`uri` with its `.` and `..` steps resolved (s3:// kept in front)."""
    if storage.is_s3(uri):
        return "s3://" + posixpath.normpath(uri[len("s3://"):])
    return posixpath.normpath(uri)


def _join_relative(base: str, path: str | None, allow_absolute: bool = False) -> tuple[str | None, str | None]:
    """(the image path of a CSV row, or None; the reason the row is refused, or None). Relative paths are taken
    against the CSV's folder `base` and must stay inside it; absolute paths (/... or s3://...) must lie inside it
    too, unless `allow_absolute` (prepare.allow_absolute_paths). A missing path is left to validation."""
    if not path:
        return None, None
    if not _is_utf8(path):
        return None, "image path not UTF-8"
    absolute = storage.is_s3(path) or path.startswith("/")
    full = _normal(path if absolute else f"{base.rstrip('/')}/{path}")
    root = _normal(base)
    # Same scheme (s3:// or local) and under the folder: a local path never starts with "s3://" and vice versa.
    inside = full == root or full.startswith(root.rstrip("/") + "/")
    if not inside and not (absolute and allow_absolute):
        return None, "image path outside the CSV's folder"
    return full, None


def _load_images(table: pa.Table, storage_cfg) -> pa.Table:
    """Read each row's image file; a missing or unreadable file, or a row already refused (no path), leaves the
    image null (rejected at validation, with the row's reject reason when it has one)."""
    images = []
    for path in table.column("path").to_pylist():
        try:
            images.append(storage.read_bytes(path, storage_cfg) if path else None)
        except UserError:
            images.append(None)
    return table.drop_columns(["path"]).append_column("image", pa.array(images, pa.binary()))


def _parse_int(value: str | None) -> tuple[int | None, str | None]:
    """(a label as an int32, or None when it is empty; the reason it is refused, or None)."""
    if value is None or not value.strip():
        return None, None
    if not _INTEGER.fullmatch(value):
        return None, "label not an integer"
    n = int(value)
    if n < 0:
        return None, "label negative"
    if n > 2**31 - 1:
        return None, "label too large"
    return n, None


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


# --- webdataset tars ------------------------------------------------------------------------------------------

def _webdataset_dataset(cfg: Config) -> ray.data.Dataset:
    files = storage.list_files(cfg.prepare.input, (".tar",), cfg.storage)
    if not files:
        raise UserError(f"no .tar shards under {cfg.prepare.input}: point prepare.input at webdataset tar files.")
    loc = storage.resolve(cfg.prepare.input, cfg.storage)
    paths = [storage.resolve(f, cfg.storage).path for f in files]
    with storage.friendly_errors(cfg.prepare.input, cfg.storage, "read"):
        ds = ray.data.read_binary_files(paths, filesystem=loc.fs, include_paths=True)
    return ds.map_batches(_expand_tars, batch_format="pyarrow", batch_size=1, fn_kwargs={"root": loc.path})


# What a damaged tar (or the compressed stream tarfile opens transparently) raises while it is read.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


def _tar_key(path: str, root: str) -> str:
    """The key prefix of a tar's samples: its path relative to prepare.input without `.tar` (a/shard.tar ->
    a/shard), so that tars of the same name in different folders give different keys; its name when prepare.input
    is the tar itself."""
    root = root.rstrip("/")
    rel = path[len(root) + 1:] if root and path.startswith(root + "/") else PurePosixPath(path).name
    return rel[:-len(".tar")] if rel.endswith(".tar") else rel


def _read_tar(data: bytes) -> tuple[list[tuple[str, bytes]], str | None, str | None]:
    """(the file members that were read whole, in order; the damage: None, "truncated tar" or "unreadable tar";
    the member being read when the damage was met, or None). Reading stops at the damage: tarfile stops silently
    at a cut or invalid header once past the first, so the end of the archive is checked to hold a zero block."""
    members: list[tuple[str, bytes]] = []
    current = None
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data))
    except _TAR_ERRORS:
        return members, "unreadable tar", None
    with tar:
        try:
            for member in tar:
                current = member.name
                if not member.isfile():
                    continue
                content = tar.extractfile(member).read()
                if len(content) != member.size:
                    return members, "truncated tar", current
                members.append((member.name, content))
            current = None
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
        except _TAR_ERRORS:
            return members, "truncated tar", current
    if len(end) < tarfile.BLOCKSIZE:
        return members, "truncated tar", None
    if end.count(0) != tarfile.BLOCKSIZE:  # a header tarfile could not read, not the end-of-archive block
        return members, "unreadable tar", None
    return members, None, None


def _sample_name(member: str) -> tuple[str, str]:
    """(sample name, extension) of a tar member: webdataset groups members by the path up to the first dot."""
    name = PurePosixPath(member)
    base, _, ext = name.name.partition(".")
    return str(name.parent / base), ext.lower()


def _expand_tars(table: pa.Table, root: str = "") -> pa.Table:
    """One row per sample of each tar: members grouped by basename, image from jpg/png/webp, caption from txt,
    label from cls. A damaged tar gives the samples read whole before the damage; the sample being read there
    (which may lack members) is rejected with the damage as its reason, as is one row standing for a tar of which
    nothing could be read, so that the manifest counts every tar."""
    keys, images, captions, labels, reasons = [], [], [], [], []
    for path, data in zip(table.column("path").to_pylist(), table.column("bytes").to_pylist()):
        prefix = _tar_key(path, root)
        members, damage, current = _read_tar(data)
        samples: dict[str, dict[str, bytes]] = {}
        for name, content in members:
            base, ext = _sample_name(name)
            samples.setdefault(base, {})[ext] = content
        damaged = None
        if damage:
            # A sample's members are contiguous: every sample but the one being read at the damage is whole.
            damaged = _sample_name(current)[0] if current else (_sample_name(members[-1][0])[0] if members else None)
            if damaged not in samples:  # the cut sample had no member read whole, or the tar none at all
                keys.append(f"{prefix}/{damaged if damaged is not None else f'<{damage}>'}")
                images.append(None), captions.append(None), labels.append(None), reasons.append(damage)
        for base, parts in sorted(samples.items()):
            keys.append(f"{prefix}/{base}")
            reason = damage if base == damaged else None
            images.append(next((parts[e] for e in IMAGE_SUFFIXES if e in parts), None))
            caption = None
            if "txt" in parts:
                try:
                    caption = parts["txt"].decode("utf-8").strip()
                except UnicodeDecodeError:
                    reason = reason or "caption not UTF-8"
            captions.append(caption)
            label = None
            if "cls" in parts:
                try:
                    label, label_reason = _parse_int(parts["cls"].decode("utf-8"))
                except UnicodeDecodeError:
                    label_reason = "label not an integer"
                reason = reason or label_reason
            labels.append(label)
            reasons.append(reason)
    # `label` is always present (null where a sample has no .cls) so that every block has one schema.
    return pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(images, pa.binary()),
                     "caption": pa.array(captions, pa.string()), "label": pa.array(labels, pa.int32()),
                     REJECT_COLUMN: pa.array(reasons, pa.string())})
