"""What the terminal shows: one channel (Python logging, on stderr) with a line as each phase starts and ends and
progress for the long ones (a bar on a terminal, a rate/ETA line otherwise), and Ray's own logs quiet unless
`ubt -v` asks for them. The command's result (a table) goes to stdout, last."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

log = logging.getLogger("ubt_ray")

LINE_EVERY_S = 30.0          # seconds between rate/ETA lines when stderr is not a terminal
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.serve")


_verbose = False


def verbose() -> bool:
    """Whether Ray's own logs, progress bars and warnings should reach the terminal (`ubt -v`)."""
    return _verbose


class _Handler(logging.Handler):
    """Writes to the current sys.stderr (looked up at each line: a test may swap it) through tqdm, so that a
    log line does not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def setup(verbose_: bool = False) -> None:
    """Send ubt's log lines to stderr as `HH:MM:SS message`; everything else (Ray, open_clip, torch) only at
    ERROR, unless `verbose_` (then WARNING and Ray's INFO lines too). Idempotent."""
    global _verbose
    _verbose = verbose_
    root = logging.getLogger()
    if not any(isinstance(h, _Handler) for h in root.handlers):
        handler = _Handler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose() else logging.ERROR)
    log.setLevel(logging.INFO)
    _quiet_loggers()


def ray_level() -> int:
    """The level of Ray's console loggers: ERROR, or INFO with -v."""
    return logging.INFO if verbose() else logging.ERROR


def _quiet_loggers() -> None:
    level = ray_level()
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if name == "ray.data":  # its own console handler (propagate=False); the file handler stays at DEBUG
            for h in logger.handlers:
                if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
                    h.setLevel(level)
        else:
            logger.setLevel(level)


def quiet_ray() -> None:
    """Once Ray is started: its console loggers at ERROR (INFO with -v), its deprecation warnings off, Ray Data's
    progress bars off (ubt shows its own progress; -v brings them back). Ray's log files under its session
    directory keep everything."""
    import ray.data  # its import configures the ray.data logger, so this comes after it
    from ray.util.annotations import RayDeprecationWarning
    loud = verbose()
    _quiet_loggers()
    if not loud:
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    ray.data.DataContext.get_current().enable_progress_bars = loud and os.isatty(2)


def phase_started(name: str, detail: str = "") -> float:
    """Log that phase `name` starts; returns the start time for `phase_done`."""
    log.info(f"[{name}] started" + (f": {detail}" if detail else ""))
    return time.time()


def phase_done(name: str, started: float, detail: str = "") -> None:
    log.info(f"[{name}] done in {duration(time.time() - started)}" + (f": {detail}" if detail else ""))


def phase(name: str, detail: Callable[..., str] | None = None, done: Callable[..., str] | None = None):
    """Decorator: log a line when the phase function starts (with `detail(*args, **kwargs)`) and when it returns
    (with its duration and `done(result)`)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            started = phase_started(name, _safe(detail, *args, **kwargs))
            result = fn(*args, **kwargs)
            phase_done(name, started, _safe(done, result))
            return result
        return run
    return wrap


def _safe(fn: Callable[..., str] | None, *args, **kwargs) -> str:
    if fn is None:
        return ""
    try:
        return fn(*args, **kwargs)
    except Exception:  # a message is never worth a failed phase
        return ""


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class Progress:
    """Progress of one phase towards `total` units: a tqdm bar when stderr is a terminal, else a log line with
    the rate and the time left every LINE_EVERY_S seconds (and one at the end)."""

    def __init__(self, name: str, total: int | None, unit: str = "rows", every_s: float = LINE_EVERY_S):
        self.name, self.total, self.unit, self.every_s = name, total, unit, every_s
        self.done, self.started = 0, time.time()
        self._last_line, self._last_done = self.started, 0
        self._bar = None
        if sys.stderr.isatty() and not verbose():
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=f"[{name}]", unit=f" {unit}", unit_scale=True, leave=False,
                             file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update_to(self, done: int) -> None:
        if done <= self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        now = time.time()
        if self._bar is None and now - self._last_line >= self.every_s:
            log.info(self.line())
            self._last_line, self._last_done = now, self.done

    def line(self) -> str:
        """`[name] done/total unit (rate, time left)`, the rate over the time since the last line (a start-up's
        slow first seconds, e.g. loading a model, do not weigh on the time left)."""
        rate = (self.done - self._last_done) / max(1e-9, time.time() - self._last_line)
        of = f"/{self.total}" if self.total else ""
        eta = (f", about {duration((self.total - self.done) / rate)} left"
               if self.total and rate > 0 and self.done < self.total else "")
        return f"[{self.name}] {self.done}{of} {self.unit} ({rate:.0f} {self.unit}/s{eta})"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def watch(name: str, total: int | None, poll: Callable[[], int], unit: str = "rows",
          every_s: float = 1.0) -> Iterator[Progress]:
    """Show the progress of the block's work from `poll()` (e.g. rows a Ray actor has counted), asked every
    `every_s` seconds on a background thread while the block runs (it blocks this thread, e.g. a Ray Data write)."""
    progress = Progress(name, total, unit)
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            try:
                progress.update_to(int(poll()))
            except Exception:  # the thing polled may be gone once the work fails; the work's error is what counts
                return

    thread = threading.Thread(target=loop, name=f"ubt-progress-{name}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=5)
        progress.close()


def track(name: str, items: Iterable, total: int | None, size: Callable = len, unit: str = "rows") -> Iterator:
    """`items` as they are, with the progress of `size(item)` units each towards `total` shown on the way."""
    progress = Progress(name, total, unit)
    try:
        for item in items:
            yield item
            progress.update_to(progress.done + size(item))
    finally:
        progress.close()
