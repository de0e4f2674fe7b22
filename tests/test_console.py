"""What the terminal shows: the summary saved to a file whose path is printed before the result table (last), a
rate/ETA line for long work when stderr is not a terminal, and Ray's own loggers quiet unless -v."""

from __future__ import annotations

import json
import logging
import time

from helpers import last_json
from ubt_ray import console
from ubt_ray.cli import SUMMARY_FILE, SUMMARY_LINE, Outcome, report
from ubt_ray.config import load_config


def test_the_summary_goes_to_a_file_and_the_table_comes_last(tmp_path, capsys):
    summary = {"model": "m", "steps": 3, "detection": {"rows": 10, "paths": ["a"] * 300}}
    report(Outcome(summary, str(tmp_path / "out")), load_config())
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{SUMMARY_LINE}{tmp_path / 'out' / SUMMARY_FILE}"
    assert out[1:] == ["model  m", "steps  3"]  # nested values stay in the file, not on the screen
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text()) == summary
    assert last_json("\n".join(out)) == summary
    report(Outcome(summary, str(tmp_path / "out"), "| a | b |"), load_config())
    assert capsys.readouterr().out.splitlines()[-1] == "| a | b |"


def test_long_work_shows_its_rate_and_time_left_without_a_terminal(capsys):
    console.setup()
    done = {"rows": 0}
    with console.watch("score", 1000, lambda: done["rows"], every_s=0.05) as progress:
        progress.every_s = 0.1
        for _ in range(6):
            done["rows"] += 100
            time.sleep(0.12)
    lines = [line for line in capsys.readouterr().err.splitlines() if "[score]" in line]
    assert lines and all("/1000 rows (" in line and "rows/s" in line for line in lines), lines
    assert any("left)" in line for line in lines), lines


def test_phase_lines_name_the_phase_and_its_time(capsys):
    console.setup()

    @console.phase("select", lambda k: f"top {k}", lambda r: f"{r} rows")
    def select(k):
        return k * 2

    assert select(3) == 6
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("[select] started: top 3") and "[select] done in " in err[1] and err[1].endswith(": 6 rows")


def test_ray_is_quiet_unless_verbose():
    console.setup(False)
    console.quiet_ray()
    data_console = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert logging.getLogger("ray").level == logging.ERROR and all(h.level == logging.ERROR for h in data_console)
    console.setup(True)
    console.quiet_ray()
    try:
        assert logging.getLogger("ray").level == logging.INFO and all(h.level == logging.INFO for h in data_console)
    finally:
        console.setup(False)
        console.quiet_ray()
