"""Local and s3:// paths behind one interface (pyarrow filesystems), with one-sentence errors.

Credentials come only from the standard AWS chain (environment, ~/.aws, instance metadata); an
S3-compatible server is reached through `storage.endpoint_url`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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
    remove_dir(dst, storage)
    dest = resolve(dst, storage)
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
    """A local directory to write into; uploaded to `uri` on success when `uri` is on S3."""
    if not is_s3(uri):
        path = Path(uri)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        yield path
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

