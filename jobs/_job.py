"""What every ubt-ray job shares: the import path and the delegation to the `ubt` command of one phase.

A job joins the cluster it was submitted to (Ray sets RAY_ADDRESS for a job; `ray.init()` with no address)
and runs the same way on a laptop (a local Ray).

Submitted with `ray job submit --working-dir DIR`, a job runs in Ray's copy of DIR, inside the cluster's
temporary session dir: a relative output path would put the outputs there, out of the user's sight and deleted
with the session. Such a job refuses to start (exit status 2) and names the fix (an absolute path or s3://, e.g.
run.output_dir="$PWD/outputs/cluster" on the submit command line); any other job prints where its outputs go.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

_JOBS = Path(__file__).resolve().parent
# jobs/ is on sys.path as the script's directory, and jobs/select.py would then shadow the standard library's
# `select`: keep only the working dir (for ubt_ray when it is not installed).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _JOBS]
sys.path.insert(0, str(_JOBS.parent))


def ray_job_working_dir() -> str | None:
    """The working dir of this process when it is the driver of a Ray job submitted with a working_dir (Ray's copy
    of it, in the cluster's temp dir), else None."""
    try:
        runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def output_locations(phase: str, argv: list[str]) -> dict[str, str] | None:
    """Where `ubt <phase> argv` writes, by config key as it is set (experimental.score.output ...): run.output_dir
    and every section's output (compare.output only for compare, the one output not under run.output_dir). None
    when the arguments do not parse or load, which `ubt` itself then reports."""
    from ubt_ray.cli import build_parser
    from ubt_ray.config import is_experimental, load_config
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args, extra = build_parser().parse_known_args([phase, *argv])
        overrides = list(getattr(args, "overrides", None) or []) + [
            a for a in extra if "=" in a and not a.startswith("-")]
        cfg = load_config(getattr(args, "config", None), overrides)
    except (SystemExit, Exception):
        return None
    outputs = {"run.output_dir": cfg.run.output_dir}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict) and isinstance(values.get("output"), str) and (
                section != "compare" or phase == "compare"):
            key = f"{section}.output"
            outputs[f"experimental.{key}" if is_experimental(key) else key] = values["output"]  # named as it is set
    return outputs


def is_relative(path: str) -> bool:
    return not (path.startswith("s3://") or os.path.isabs(os.path.expanduser(path)))


def check_outputs(phase: str, argv: list[str]) -> int | None:
    """In a Ray job with a working dir: 2 (after saying why) if an output would land in Ray's temporary copy of
    it; else None, after printing where the outputs go."""
    workdir = ray_job_working_dir()
    if workdir is None or "-h" in argv or "--help" in argv:
        return None
    outputs = output_locations(phase, argv)
    if outputs is None:
        return None
    relative = {k: v for k, v in outputs.items() if is_relative(v)}
    root = relative.get("run.output_dir")
    if root is not None:  # the outputs under it need no mention of their own
        relative = {k: v for k, v in relative.items() if k == "run.output_dir" or not v.startswith(root + "/")}
    if relative:
        keys = ", ".join(f"{k}={v}" for k, v in relative.items())
        key, value = next(iter(relative.items()))
        example = 'run.output_dir="$PWD/outputs/cluster"' if root is not None else f'{key}="$PWD/{value}"'
        print(f"ubt {phase}: error: {keys}: a relative output path, and this Ray job runs in Ray's temporary copy "
              f"of its working dir ({workdir}): the outputs would land there, out of sight, and be deleted with "
              f"the cluster's session. Give an absolute path or an s3:// URI on the submit command line, e.g. "
              f"{example}.", file=sys.stderr)
        return 2
    print(f"ubt {phase}: outputs go to {outputs['run.output_dir']}", flush=True)
    return None


def job(phase: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of the job that runs `ubt <phase> argv...`."""
    def main(argv: list[str] | None = None) -> int:
        from ubt_ray.cli import main as ubt
        args = list(sys.argv[1:] if argv is None else argv)
        refused = check_outputs(phase, args)
        if refused is not None:
            return refused
        return ubt([phase, *args])
    main.__doc__ = f"Run `ubt {phase}` with these arguments; returns its exit status."
    return main
