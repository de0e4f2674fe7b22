"""What every ubt-ray job shares: the import path and the delegation to the `ubt` command of one phase.

A job joins the cluster it was submitted to (Ray sets RAY_ADDRESS for a job; `ray.init()` with no address)
and runs the same way on a laptop (a local Ray).
"""

import sys
from pathlib import Path
from typing import Callable

_JOBS = Path(__file__).resolve().parent
# jobs/ is on sys.path as the script's directory, and jobs/select.py would then shadow the standard library's
# `select`: keep only the working dir (for ubt_ray when it is not installed).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _JOBS]
sys.path.insert(0, str(_JOBS.parent))


def job(phase: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of the job that runs `ubt <phase> argv...`."""
    def main(argv: list[str] | None = None) -> int:
        from ubt_ray.cli import main as ubt
        return ubt([phase, *(sys.argv[1:] if argv is None else argv)])
    main.__doc__ = f"Run `ubt {phase}` with these arguments; returns its exit status."
    return main
