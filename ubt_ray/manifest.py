"""`manifest.json` beside every output: resolved config, inputs, row accounting, wall time, versions."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata

from .config import Config
from .errors import UserError
from . import storage

MAX_EXAMPLES_PER_REASON = 20


@dataclass
class RowCounts:
    """Rows in = rows out + rows rejected, with the rejection reasons counted and a few example keys kept."""
    rows_in: int = 0
    rows_out: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, key: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(key)

    def merge(self, other: "RowCounts") -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        for reason, n in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: MAX_EXAMPLES_PER_REASON - len(ex)])

    def check(self, what: str) -> None:
        """Fail loudly if rows were lost: the accounting invariant is part of the product."""
        if self.rows_in != self.rows_out + self.rows_rejected:
            raise RuntimeError(f"{what}: rows in ({self.rows_in}) != rows out ({self.rows_out}) + rows rejected "
                               f"({self.rows_rejected}); this is a bug in ubt_ray, please report it.")

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "rows_rejected": self.rows_rejected,
                "rejected_by_reason": dict(sorted(self.rejected.items())),
                "rejected_examples": {k: v for k, v in sorted(self.examples.items())}}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("ubt-ray", "torch", "torchvision", "ray", "open_clip_torch", "pyarrow", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_manifest(out_uri: str, phase: str, cfg: Config, *, inputs: dict, rows: RowCounts | None,
                   started: float, extra: dict | None = None) -> dict:
    """Write `<out_uri>/manifest.json`, which marks the output finished (storage.require_finished), and return
    its content."""
    manifest = {
        "phase": phase,
        "output": out_uri,
        "inputs": inputs,
        "rows": rows.to_dict() if rows is not None else None,
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "config": cfg.to_dict(),
        **(extra or {}),
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


def read_manifest(out_uri: str, cfg: Config) -> dict:
    uri = storage.join(out_uri, "manifest.json")
    if not storage.exists(uri, cfg.storage):
        raise UserError(f"{out_uri} has no manifest.json: run the phase that writes it first.")
    return storage.read_json(uri, cfg.storage)
