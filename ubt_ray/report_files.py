"""Result tables and charts as files (Markdown, CSV, JSON, PNG), written through `storage` (local or s3://)."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from . import storage
from .config import Config


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """`rows` as CSV with a header of `columns` (other keys left out, missing ones empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report_files(output: str, stem: str, cfg: Config, rows: list[dict], columns: Sequence[str],
                       markdown: str, png: bytes | None = None, extra: dict | None = None) -> None:
    """<output>/<stem>.md, .csv, .json ({"rows": rows, **extra}) and, when given, .png."""
    storage.write_bytes(storage.join(output, f"{stem}.md"), markdown.encode(), cfg.storage)
    storage.write_bytes(storage.join(output, f"{stem}.csv"), csv_text(rows, columns).encode(), cfg.storage)
    storage.write_json(storage.join(output, f"{stem}.json"), {"rows": rows, **(extra or {})}, cfg.storage)
    if png is not None:
        storage.write_bytes(storage.join(output, f"{stem}.png"), png, cfg.storage)
