"""The `jobs/` entry points for `ray job submit`: one per phase and one for the pipeline, each `main(argv)`
running that phase's `ubt` subcommand."""

import importlib.util
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent.parent / "jobs"
PHASES = ["pipeline", "prepare", "poison", "train", "evaluate", "overfit", "score", "select", "unlearn", "defend",
          "baseline", "compare", "sweep"]


def load_job(name):
    sys.path.insert(0, str(JOBS))
    try:
        spec = importlib.util.spec_from_file_location(f"job_{name}", JOBS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if str(JOBS) in sys.path:  # _job.py takes jobs/ off the path itself (jobs/select.py shadows `select`)
            sys.path.remove(str(JOBS))


def test_there_is_a_job_for_every_phase():
    assert sorted(p.stem for p in JOBS.glob("[a-z]*.py")) == sorted(PHASES)


@pytest.mark.parametrize("name", PHASES)
def test_job_runs_its_phase(name, capsys):
    job = load_job(name)
    with pytest.raises(SystemExit) as exit_:
        job.main(["--help"])
    assert exit_.value.code == 0 and f"usage: ubt {name}" in capsys.readouterr().out


def test_job_reports_a_user_error_as_exit_status_2(capsys):
    assert load_job("defend").main(["defend.model=/nonexistent/model"]) == 2
    assert "defend.model=/nonexistent/model does not exist" in capsys.readouterr().err
