"""Progress of the phases that take seconds outside Lightning's epoch bars.

The data check, the feature extraction, the linear probe's C grid, predict and export all report
through :func:`progress`: a bar on a terminal (rich or tqdm, as ``callbacks.progress_bar`` says; on
stderr, gone when the phase ends), a log line every :data:`LOG_EVERY_S` seconds without a terminal
(logs, SLURM, CI; ``FINETUNE_PROGRESS_EVERY_S`` sets the interval), and one closing line with the count,
the time and the rate in every case. Only rank 0 of a multi-process launch shows it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

log = logging.getLogger("finetune.progress")

STYLES = ("rich", "tqdm", "none")
LOG_EVERY_S = 30.0  # FINETUNE_PROGRESS_EVERY_S overrides it (0: a line per batch, e.g. for a test harness)
_style = "rich"
_active = 0  # phases running now (nested: extraction inside fit)


def in_phase() -> bool:
    """Whether one of the phases reported here is running (a SIGTERM then stops it: finetune.run.interrupts)."""
    return _active > 0


def set_style(style: str) -> None:
    """The process-wide bar style: ``rich``, ``tqdm`` or ``none`` (no bar, no interim lines: the closing line only)."""
    global _style
    if str(style) not in STYLES:
        raise ValueError(f"progress style {style!r} is not one of {', '.join(STYLES)}")
    _style = str(style)


def is_launch_rank_zero() -> bool:
    """Rank 0 of a multi-process launch (Lightning DDP, torchrun, SLURM), or a single process."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"


def rate_text(done: int, seconds: float, unit: str) -> str:
    """``"4,576 images in 9.1 s (503 images/s)"``: what the closing line and the interim lines say."""
    rate = f" ({done / seconds:,.0f} {unit}/s)" if seconds > 0 and done else ""
    return f"{done:,} {unit} in {seconds:.1f} s{rate}"


def interim_text(what: str, done: int, total: int | None, seconds: float, unit: str) -> str:
    """A log line while the phase runs: count of total, rate and the time left."""
    of = f"/{total:,}" if total else ""
    eta = ""
    if total and done and seconds > 0:
        eta = f", about {(total - done) * seconds / done:.0f} s left"
    rate = f" ({done / seconds:,.0f} {unit}/s{eta})" if seconds > 0 and done else ""
    return f"{what}: {done:,}{of} {unit}{rate}"


class _RichBar:
    def __init__(self, what: str, total: int | None, unit: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task(what, total=total, rate="")
        self._unit = unit

    def update(self, n: int) -> None:
        self._progress.advance(self._task, n)
        speed = self._progress.tasks[0].speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:,.0f} {self._unit}/s")

    def close(self) -> None:
        self._progress.stop()


class _TqdmBar:
    def __init__(self, what: str, total: int | None, unit: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=what, unit=f" {unit}", file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _open_bar(what: str, total: int | None, unit: str) -> Any:
    if _style == "none" or not sys.stderr.isatty():
        return None
    return (_RichBar if _style == "rich" else _TqdmBar)(what, total, unit)


@contextmanager
def progress(what: str, total: int | None, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; show the phase's progress; log ``what: N unit in S s (R unit/s)`` when it ends.

    Nothing is logged for a phase that raised: its error says what happened.
    """
    global _active
    show = is_launch_rank_zero()
    bar = _open_bar(what, total, unit) if show else None
    every = float(os.environ.get("FINETUNE_PROGRESS_EVERY_S", LOG_EVERY_S))
    started = last_line = time.perf_counter()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last_line
        done += n
        if bar is not None:
            bar.update(n)
        elif show and _style != "none":
            now = time.perf_counter()
            if now - last_line >= every:
                last_line = now
                log.info("%s", interim_text(what, done, total, now - started, unit))

    _active += 1
    try:
        yield advance
    finally:
        _active -= 1
        if bar is not None:
            bar.close()
    if show:
        log.info("%s: %s", what, rate_text(done, time.perf_counter() - started, unit))


@contextmanager
def counted(what: str, unit: str = "images") -> Iterator[Callable[[int, int], None]]:
    """:func:`progress` for work that reports ``(done, total)`` itself (the data check): it opens at the first
    report, so work with nothing to do (every file known from an earlier check) shows nothing."""
    with ExitStack() as stack:
        state: dict[str, Any] = {"advance": None, "done": 0}

        def report(done: int, total: int) -> None:
            if state["advance"] is None:
                state["advance"] = stack.enter_context(progress(what, total, unit))
            state["advance"](done - state["done"])
            state["done"] = done

        yield report
