"""What every benchmark script does last: write its result as JSON and Markdown, and print the Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, name: str, result, markdown: str) -> None:
    """`<out>/<name>.json` and `<out>/<name>.md`, then the Markdown on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
