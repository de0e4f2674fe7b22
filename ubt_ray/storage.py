"""Local and s3:// paths behind one interface (pyarrow filesystems), with one-sentence errors.

Credentials come only from the standard AWS chain (environment, ~/.aws, instance metadata); an
S3-compatible server is reached through `storage.endpoint_url`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .config import StorageConfig
from .errors import UserError


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and s3:// URIs alike."""
    return "/".join([str(base).rstrip("/")] + [p.strip("/") for p in parts])


@dataclass(frozen=True)
class Location:
    """A resolved path: the filesystem and the path inside it (bucket/key for S3)."""
    fs: pafs.FileSystem
    path: str
    uri: str


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Resolve a local path or s3://bucket/prefix to a pyarrow filesystem and an inner path."""
    uri = str(uri)
    if is_s3(uri):
        return Location(s3_filesystem(storage or StorageConfig()), uri[len("s3://"):].rstrip("/"), uri)
    return Location(pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute()), uri)


def absolute(uri: str | None) -> str | None:
    """`uri` as Ray workers must see it: s3:// as is, a local path made absolute against this process's cwd
    (a worker's cwd is not the driver's)."""
    if uri is None or is_s3(uri):
        return uri
    return str(Path(uri).expanduser().absolute())


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    kwargs = dict(region=storage.region, connect_timeout=storage.connect_timeout_s,
                  request_timeout=max(30.0, storage.connect_timeout_s),
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    if storage.endpoint_url:
        parsed = urlparse(storage.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"storage.endpoint_url {storage.endpoint_url!r} is not a URL: "
                            "give it as http://host:port or https://host.")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


@contextmanager
def friendly_errors(uri: str, storage: StorageConfig | None = None, action: str = "read") -> Iterator[None]:
    """Turn filesystem errors on `uri` into one-sentence UserErrors that name the path and the fix."""
    try:
        yield
    except UserError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise UserError(describe_io_error(uri, e, storage, action)) from None


def describe_io_error(uri: str, e: BaseException, storage: StorageConfig | None, action: str) -> str:
    text = str(e)
    low = text.lower()
    if is_s3(uri):
        endpoint = (storage.endpoint_url if storage else None) or "AWS S3"
        if any(s in low for s in ("couldn't connect", "could not connect", "curlcode: 7", "connection refused",
                                  "timed out", "timeout", "resolve host", "curlcode: 28", "curlcode: 6")):
            return (f"cannot reach S3 endpoint {endpoint} for {uri}: check storage.endpoint_url and that "
                    f"the server is running.")
        if "nosuchbucket" in low or "bucket does not exist" in low:
            return f"S3 bucket of {uri} does not exist at {endpoint}: create it or fix the path."
        if "access denied" in low or "forbidden" in low or "invalidaccesskeyid" in low or "signature" in low:
            return (f"access to {uri} was denied by {endpoint}: set credentials through the standard AWS chain "
                    f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials).")
    # Before "not found": a damaged Parquet file says "Parquet magic bytes not found in footer".
    if (uri.endswith(".parquet") or "parquet" in low) and any(s in low for s in (
            "magic bytes", "file size is 0", "deserialize thrift", "page header", "corrupt", "not a parquet file",
            "unexpected end of stream")):
        return f"{uri} is not a readable Parquet file: remove it, or re-create it with the phase that wrote it."
    if "no such file" in low or "not found" in low or "does not exist" in low or isinstance(e, FileNotFoundError):
        return f"{uri} does not exist: check the path ({action})."
    first = text.splitlines()[0] if text else type(e).__name__
    return f"cannot {action} {uri} ({first}): check the path, permissions and storage settings."


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "check"):
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def _file_infos(uri: str, suffixes: tuple[str, ...], storage: StorageConfig | None) -> list[pafs.FileInfo]:
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "list"):
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.NotFound:
            raise UserError(f"{uri} does not exist: check the path, or run the phase that writes it first.")
        else:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted((i for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(suffixes)
                   and not any(part.startswith(("_", ".")) for part in i.path[len(loc.path):].split("/") if part)),
                  key=lambda i: i.path)


def list_files(uri: str, suffixes: tuple[str, ...], storage: StorageConfig | None = None) -> list[str]:
    """All files under `uri` (a directory/prefix, or one file) whose names end with one of `suffixes`, sorted."""
    prefix = "s3://" if is_s3(uri) else ""
    return [prefix + i.path for i in _file_infos(uri, suffixes, storage)]


def file_signatures(uri: str, suffixes: tuple[str, ...], storage: StorageConfig | None = None) -> list[list]:
    """[path, size, mtime in ns] of each file `list_files` names: rewritten files get a new signature."""
    prefix = "s3://" if is_s3(uri) else ""
    return [[prefix + i.path, i.size, i.mtime_ns] for i in _file_infos(uri, suffixes, storage)]


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "read"):
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "write"):
        if not is_s3(uri):
            loc.fs.create_dir(str(Path(loc.path).parent), recursive=True)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)


def read_json(uri: str, storage: StorageConfig | None = None) -> dict:
    return json.loads(read_bytes(uri, storage))


def write_json(uri: str, obj: dict, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode(), storage)


def make_dir(uri: str, storage: StorageConfig | None = None) -> None:
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "create"):
        loc.fs.create_dir(loc.path, recursive=True)


def remove_dir(uri: str, storage: StorageConfig | None = None) -> None:
    """Delete a directory/prefix if it exists (outputs are rewritten whole, never mixed with a previous run's)."""
    loc = resolve(uri, storage)
    with friendly_errors(uri, storage, "delete"):
        if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
            loc.fs.delete_dir(loc.path)


def copy_dir(src: str, dst: str, storage: StorageConfig | None = None) -> None:
    """Copy the directory/prefix `src` to `dst` (each local or S3), replacing what was there."""
    source = resolve(src, storage)
    with friendly_errors(src, storage, "read"):
        missing = source.fs.get_file_info(source.path).type == pafs.FileType.NotFound
    if missing:
        raise UserError(f"{src} does not exist: check the path.")
    with replacing_dir(dst, storage) as into:
        dest = resolve(into, storage)
        with friendly_errors(dst, storage, "write"):
            dest.fs.create_dir(dest.path, recursive=True)
            pafs.copy_files(source.path, dest.path, source_filesystem=source.fs, destination_filesystem=dest.fs)


def upload_dir(local_dir: str | Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local directory to `uri` (local or S3), replacing what was there."""
    copy_dir(str(Path(local_dir).absolute()), uri, storage)


def download_dir(uri: str, local_dir: str | Path, storage: StorageConfig | None = None) -> Path:
    """Copy `uri` (a directory/prefix) into `local_dir` and return it."""
    src = resolve(uri, storage)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    with friendly_errors(uri, storage, "read"):
        if src.fs.get_file_info(src.path).type == pafs.FileType.NotFound:
            raise UserError(f"{uri} does not exist: check the path.")
        pafs.copy_files(src.path, str(local_dir.absolute()), source_filesystem=src.fs,
                        destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextmanager
def local_staging(uri: str, storage: StorageConfig | None = None) -> Iterator[Path]:
    """A local directory to write into, which becomes `uri` whole on success (replacing_dir locally; uploaded
    when `uri` is on S3)."""
    if not is_s3(uri):
        with replacing_dir(uri, storage) as into:
            Path(into).mkdir(parents=True)
            yield Path(into)
        return
    with tempfile.TemporaryDirectory(prefix="ubt-stage-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, uri, storage)


@contextmanager
def local_copy(uri: str, storage: StorageConfig | None = None) -> Iterator[Path]:
    """A local directory holding the contents of `uri` (the path itself when local)."""
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise UserError(f"{uri} does not exist: check the path.")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ubt-fetch-") as tmp:
        yield download_dir(uri, tmp, storage)


# --- outputs: claimed before a phase writes, committed whole, finished by their manifest ---------------------

MARKER = ".ubt-output"      # in every folder a phase writes: says "ubt wrote this", and which phase
MANIFEST = "manifest.json"  # written last: an output without it is unfinished
_claimed: set[str] = set()  # outputs this process is writing now (its own reads of them are allowed)
_overwrite = False          # `--overwrite`: a non-empty folder that ubt did not write may be emptied


def allow_overwrite(allowed: bool) -> None:
    """Let the phases of this process empty an output folder that ubt did not write (the CLI's --overwrite)."""
    global _overwrite
    _overwrite = allowed


def overwrite_allowed() -> bool:
    """Whether --overwrite was given (allow_overwrite)."""
    return _overwrite


def _key(uri: str) -> str:
    return absolute(str(uri)).rstrip("/")


def _marker_phase(loc: Location, names: set[str]) -> str | None:
    """The phase that wrote the folder at `loc` (its marker, or the manifest of an output written before markers
    existed), or None when ubt did not write it."""
    for name in (MARKER, MANIFEST):
        if name in names:
            try:
                with loc.fs.open_input_stream(f"{loc.path}/{name}") as f:
                    data = json.loads(f.read())
            except (OSError, ValueError, pa.ArrowException):
                continue
            if isinstance(data, dict) and (name == MARKER or "versions" in data) and isinstance(data.get("phase"), str):
                return data["phase"]
    return None


def claim_output(uri: str, phase: str, storage_cfg: StorageConfig | None = None) -> None:
    """Make `uri` this phase's output folder before anything is written there. A missing or empty folder, or
    one this phase wrote before, is taken (its manifest removed: until the phase writes a new one the folder
    reads as unfinished); a folder with other files is refused with one sentence, unless --overwrite was
    given, which empties it. Nothing is deleted here but the old manifest."""
    key = _key(uri)
    if key in _claimed:
        return
    loc = resolve(uri, storage_cfg)
    with friendly_errors(uri, storage_cfg, "check"):
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            raise UserError(f"{uri} is a file, not a folder: give the {phase} output a folder path.")
        names: set[str] = set()
        if info.type == pafs.FileType.Directory:
            names = {PurePath(i.path).name for i in loc.fs.get_file_info(pafs.FileSelector(loc.path))}
        if names:
            owner = _marker_phase(loc, names)
            if owner != phase and not _overwrite:
                what = (f"holds the output of `ubt {owner}`" if owner else
                        f"already holds files that ubt did not write ({', '.join(sorted(names)[:3])}"
                        f"{', ...' if len(names) > 3 else ''})")
                raise UserError(f"{uri} {what}: give the {phase} output an empty or new folder, or pass "
                                f"--overwrite to replace what is there.")
            if owner != phase:  # --overwrite
                loc.fs.delete_dir_contents(loc.path)
            elif MANIFEST in names:
                loc.fs.delete_file(f"{loc.path}/{MANIFEST}")
        loc.fs.create_dir(loc.path, recursive=True)
        with loc.fs.open_output_stream(f"{loc.path}/{MARKER}") as f:
            f.write(json.dumps({"phase": phase, "written_by": "ubt-ray"}).encode())
    _claimed.add(key)


def release_output(uri: str) -> None:
    """The phase writing `uri` has finished it (its manifest is written)."""
    _claimed.discard(_key(uri))


def require_finished(uri: str, storage_cfg: StorageConfig | None = None) -> None:
    """Refuse to read `uri` when it lies inside an output that a phase started and did not finish (the nearest
    folder at or above it with a ubt marker has no manifest), unless this process is writing that output now.
    Folders that ubt did not write (a user's own shards or checkpoint) pass as they are."""
    loc = resolve(uri, storage_cfg)
    path = loc.path.rstrip("/")
    parts = path.split("/")
    with friendly_errors(uri, storage_cfg, "check"):
        for depth in range(min(len(parts) - 1, 6)):  # the folder itself and a few above it
            folder = "/".join(parts[:len(parts) - depth])
            if not folder or (is_s3(uri) and "/" not in folder):  # the root, or a bucket
                break
            if loc.fs.get_file_info(f"{folder}/{MARKER}").type != pafs.FileType.File:
                continue
            shown = ("s3://" + folder) if is_s3(uri) else folder
            if _key(shown) in _claimed or loc.fs.get_file_info(f"{folder}/{MANIFEST}").type == pafs.FileType.File:
                return
            phase = _marker_phase(Location(loc.fs, folder, shown), {MARKER}) or "the phase that writes it"
            raise UserError(f"{uri} is part of an unfinished output of `ubt {phase}` ({shown} has no "
                            f"{MANIFEST}: that run was interrupted or failed): run it again to finish it.")


@contextmanager
def replacing_dir(uri: str, storage_cfg: StorageConfig | None = None) -> Iterator[str]:
    """Where to write the folder `uri` whole, replacing what was there. Local: a hidden sibling folder, renamed
    over `uri` only when the block succeeds, so an interrupted write leaves no half-written `uri` (the sibling
    is removed; one left by a killed process is removed by the next write). S3 has no rename: `uri` is emptied
    and written in place, and the phase's manifest, written last, says when it is complete."""
    if is_s3(uri):
        marker = join(uri, MARKER)
        kept = read_bytes(marker, storage_cfg) if exists(marker, storage_cfg) else None
        remove_dir(uri, storage_cfg)
        if kept is not None:
            write_bytes(marker, kept, storage_cfg)
        yield uri
        return
    final = Path(uri).expanduser().absolute()
    with friendly_errors(uri, storage_cfg, "write"):
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        yield str(tmp)
        with friendly_errors(uri, storage_cfg, "write"):
            tmp.mkdir(exist_ok=True)
            if (final / MARKER).is_file() and not (tmp / MARKER).exists():
                shutil.copy2(final / MARKER, tmp / MARKER)
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
