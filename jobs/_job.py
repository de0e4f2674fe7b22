"""What every ubt-ray job shares: the import path and the delegation to the `ubt` command of one phase.

A job joins the cluster it was submitted to (Ray sets RAY_ADDRESS for a job; `ray.init()` with no address)
and runs the same way on a laptop (a local Ray).
"""

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir, when ubt_ray is not installed


def job(phase: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of the job that runs `ubt <phase> argv...`."""
    def main(argv: list[str] | None = None) -> int:
        from ubt_ray.cli import main as ubt
        return ubt([phase, *(sys.argv[1:] if argv is None else argv)])
    main.__doc__ = f"Run `ubt {phase}` with these arguments; returns its exit status."
    return main
