"""What every benchmark script does last: write its result as JSON and Markdown, with the provenance that makes
it a published figure (command, commit, machine, resolved configs), and print the Markdown."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli_summary(stdout: str) -> dict:
    """The full summary a `ubt` command saved: the file named on its stdout's `summary: PATH` line (relative paths
    are from the repository, where the benchmarks run ubt)."""
    path = next(line[len("summary: "):] for line in reversed(stdout.splitlines()) if line.startswith("summary: "))
    return json.loads((REPO / path).read_text())


def commit() -> str:
    """HEAD's commit, with `-dirty` when tracked files differ from it (the figure then comes from uncommitted code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    """The machine in a few facts: CPU model and count, its widest vector instructions (two CPUs of one model name
    can differ by AVX-512 and bf16, which changed this project's CPU times about fourfold), memory, GPU (when torch
    sees one), OS and Python."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags")))
    except (OSError, StopIteration):
        pass
    vector = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"),
                                      ("AMX", "amx_tile")) if flag in flags]
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "vector": vector, "memory_gib": mem_gib, "gpu": gpu,
            "os": platform.platform(), "python": platform.python_version()}


def provenance(configs: dict | None = None) -> dict:
    """Command, commit, machine and time of this run, and the resolved configs it ran (name -> dict)."""
    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "commit": commit(),
            "machine": machine(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "configs": configs or {}}


def resolved_config(*args: str) -> dict:
    """The resolved config of `ubt ... -c FILE key=value` arguments, as a dict (what the run used)."""
    sys.path.insert(0, str(REPO))
    from ubt_ray.config import load_config
    files = [a for i, a in enumerate(args) if i and args[i - 1] in ("-c", "--config")]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return load_config(files or None, overrides).to_dict()


def write_results(out: str | Path, name: str, result, markdown: str, configs: dict | None = None) -> None:
    """`<out>/<name>.json` ({"provenance": ..., "result": ...}) and `<out>/<name>.md` (the Markdown with its
    command, commit and machine under it), then the Markdown on stdout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(configs)
    (out / f"{name}.json").write_text(json.dumps({"provenance": prov, "result": result}, indent=2) + "\n")
    m = prov["machine"]
    footer = (f"\nCommand: `{prov['command']}`  \nCommit: `{prov['commit']}`  \n"
              f"Machine: {m['cpus']} x {m['cpu']}" + (f" ({', '.join(m['vector'])})" if m.get("vector") else "")
              + f", {m['memory_gib']} GiB" + (f", {m['gpu']}" if m["gpu"] else "")
              + f"  \nFinished: {prov['finished_at']}\n")
    (out / f"{name}.md").write_text(markdown.rstrip("\n") + "\n" + footer)
    print(markdown)


def read_result(path: str | Path):
    """The result part of a results JSON (older files hold the result alone)."""
    data = json.loads(Path(path).read_text())
    return data["result"] if isinstance(data, dict) and "provenance" in data else data
