"""Progress lines for kiln's long steps, on the "kiln" logger (the CLI shows them on a terminal).

A step that may run for minutes (calibrating EfficientNet-Lite0 on 48 photos, ranking its 50
layers) says how far it is at most once every few seconds, with an estimate of the time left,
so a quiet terminal means work and not a hang. Short steps print nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

log = logging.getLogger("kiln")

EVERY_SECONDS = 5.0  # at most one line per step this often


class Progress:
    """Counts `total` units of one step (None: unknown) and logs where it stands."""

    def __init__(self, what: str, total: int | None = None, unit: str = ""):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.spoke = False

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last < EVERY_SECONDS or (self.total is not None and self.done >= self.total):
            return
        self.last, self.spoke = now, True
        elapsed = now - self.start
        if self.total:
            left = elapsed / self.done * (self.total - self.done)
            log.info("%s: %d of %d%s, about %.0f s left", self.what, self.done, self.total, self.unit, left)
        else:
            log.info("%s: %d%s so far (%.0f s)", self.what, self.done, self.unit, elapsed)

    def finish(self) -> None:
        """One closing line, only for a step that spoke on the way."""
        if self.spoke:
            log.info("%s: %d%s done in %.1f s", self.what, self.done, self.unit, time.perf_counter() - self.start)


@contextlib.contextmanager
def heartbeat(what: str, expected_seconds: float | None = None):
    """For one step that cannot count its own progress (a backend's build, a child process):
    a line every EVERY_SECONDS while it runs, with the time left where an earlier run of the
    same step on this host says how long it takes, and a closing line if it spoke."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(EVERY_SECONDS):
            elapsed = time.perf_counter() - start
            if expected_seconds:
                left = expected_seconds - elapsed
                estimate = f"about {left:.0f} s left" if left >= 1 else "taking longer than its last build here"
                log.info("%s: %.0f s, %s (%.0f s last time on this host)", what, elapsed, estimate, expected_seconds)
            else:
                log.info("%s: %.0f s so far", what, elapsed)

    thread = threading.Thread(target=beat, name="kiln-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        elapsed = time.perf_counter() - start
        if elapsed >= EVERY_SECONDS:
            log.info("%s: done in %.1f s", what, elapsed)


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]):
    """Log a stage's start and end on the kiln logger and add its seconds to `timings` (a stage
    that runs once per build, such as compile, adds up over the builds of one compile)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    timings[name] = timings.get(name, 0.0) + seconds
    log.info("%s done in %.1f s", name, seconds)


FORMAT = "[kiln %(elapsed)6.1fs] %(message)s"


def terminal_handler() -> logging.Handler:
    """A stderr handler printing each line with the seconds since it was made."""
    handler = logging.StreamHandler(sys.stderr)
    start = time.perf_counter()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(lambda record: setattr(record, "elapsed", time.perf_counter() - start) or True)
    return handler


@contextlib.contextmanager
def shown_on_terminal(wanted: bool | None):
    """Progress on stderr for one compile from the Python API: when asked (True), or by default
    (None) when stderr is a terminal and the program configured no logging of its own. The
    kiln logger is left as it was afterwards."""
    configured = log.handlers or logging.getLogger().handlers
    show = wanted if wanted is not None else (sys.stderr.isatty() and not configured)
    if not show:
        yield
        return
    handler, level = terminal_handler(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Other libraries' warnings that kiln causes and the user cannot act on (torchao's missing
    CUDA extensions on a CPU machine, torch's deprecation notes while torchao loads): held back
    for the duration of the import that triggers them."""
    loggers = [(logging.getLogger(name), logging.getLogger(name).level) for name in names]
    for logger, _ in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in loggers:
            logger.setLevel(level)
