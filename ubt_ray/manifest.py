"""`manifest.json` beside every output: resolved config, inputs, row accounting, wall time, cost (cost.py),
versions."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from typing import Callable

from .config import Config
from .cost import Usage, cost_block
from .core.rows import RowCounts
from .errors import UserError
from . import storage


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ubt-ray", "torch", "torchvision", "ray", "open_clip_torch", "pyarrow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_manifest(out_uri: str, phase: str, cfg: Config, *, inputs: dict, rows: RowCounts | None,
                   started: float, usage: Usage, extra: dict | None = None, signature: dict | None = None) -> dict:
    """Write `<out_uri>/manifest.json`, which marks the output finished (storage.require_finished), and return
    its content; `usage` (the phase's sample-passes and reservation) becomes its `cost` block (cost.py), with the
    same wall time; `signature` (the phase's `fingerprint`) lets `finished_output` reuse it."""
    wall = round(time.time() - started, 3)
    manifest = {
        "phase": phase,
        "output": out_uri,
        "inputs": inputs,
        "rows": rows.to_dict() if rows is not None else None,
        "wall_time_s": wall,
        "cost": cost_block(usage, wall),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "config": cfg.to_dict(),
        **(extra or {}),
        **({"fingerprint": signature} if signature is not None else {}),
    }
    storage.write_json(storage.join(out_uri, storage.MANIFEST), manifest, cfg.storage)
    storage.release_output(out_uri)
    return manifest


def fingerprint(cfg: Config, sections: tuple[str, ...], files: dict[str, tuple[str | None, tuple[str, ...]]],
                **extra) -> dict:
    """What makes two runs of a phase the same, for reusing a finished one: the config `sections`, the seed,
    `extra`, and the signatures (path, size, mtime) of the files under each named uri with the given suffixes
    (None for a uri the phase does not read). As it reads back from JSON, to compare with a stored one."""
    c = cfg.to_dict()
    out = {"config": {s: c[s] for s in sections}, "seed": cfg.run.seed, **extra,
           **{name: storage.file_signatures(uri, suffixes, cfg.storage) if uri else None
              for name, (uri, suffixes) in files.items()}}
    return json.loads(json.dumps(out))


def finished_output(out_uri: str, signature: dict | Callable[[], dict] | None, cfg: Config,
                    record: str = storage.MANIFEST, needs: tuple[str, ...] = ()) -> dict | None:
    """The one test every reusing phase applies for "this output is finished and matches these inputs": the JSON
    `record` of `out_uri` when the output is finished (its manifest, written last, is there), holds `signature`
    as its "fingerprint", and each of its fields named in `needs` is a path that still exists (e.g. the model it
    made); else None. A callable `signature` is computed only once the manifest is found (a fingerprint lists
    the input files, which is wasted work when there is nothing to reuse)."""
    if signature is None or not storage.exists(storage.join(out_uri, storage.MANIFEST), cfg.storage):
        return None
    if callable(signature):
        signature = signature()
    uri = storage.join(out_uri, record)
    if record != storage.MANIFEST and not storage.exists(uri, cfg.storage):
        return None
    done = storage.read_json(uri, cfg.storage)
    if done.get("fingerprint") != signature or any(not done.get(n) or not storage.exists(done[n], cfg.storage)
                                                    for n in needs):
        return None
    return done


def read_manifest(out_uri: str, cfg: Config) -> dict:
    uri = storage.join(out_uri, "manifest.json")
    if not storage.exists(uri, cfg.storage):
        raise UserError(f"{out_uri} has no manifest.json: run the phase that writes it first.")
    return storage.read_json(uri, cfg.storage)
