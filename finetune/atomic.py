"""Files written whole or not at all: temp file, fsync, rename, with Ctrl-C held until the rename.

A leaf module (it imports nothing of finetune), so the data layer's reports and the run layer's
checkpoints and summary share one writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: reading it means setting it, which other threads could see


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then arrive as they would have.

    A KeyboardInterrupt raised inside torch.save's write callback does not stop the save cleanly: torch's
    zip writer turns it into ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, so a
    Ctrl-C that lands while last.ckpt is written ended the run with exit 1 and a traceback instead of
    interrupted.ckpt and exit 130. A file takes milliseconds to write; the signal waits that long. Main
    thread only (Python runs signal handlers there); elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in HELD_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None or handler is signal.SIG_IGN:  # installed outside Python, or ignored: leave it
            continue
        previous[signum] = handler
        signal.signal(signum, lambda received, _frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):  # each held signal once, in the order it came
            signal.raise_signal(signum)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write`` into a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never half of one; Ctrl-C and SIGTERM
    wait for the write to finish (:func:`signals_held`).
    """
    path = Path(path)
    with signals_held():
        _commit(*_write_temp(path, write), path)
    return path


class DeferredCommits:
    """Files written in the caller's thread, made durable (fsync, then the rename) on one background thread.

    An fsync takes 0.6 ms to several ms on a local disk and seconds for a large file on network storage;
    training need not wait for it. The bytes are written before :meth:`write` returns, so the caller may change
    whatever it wrote from at once; only the fsync and the rename come later, in the order they were asked
    for, as do removals (a previous best checkpoint is deleted only after the new one is in place). At most one
    commit waits while the next file is written. After a failure nothing queued behind it runs (no removal
    follows a checkpoint that never landed); the error is raised once, by the next :meth:`write`, :meth:`remove`
    or :meth:`wait`. A kill before a rename leaves the old file and a ``.NAME.*.tmp`` that the next run removes.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._queued: Future[None] | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def write(self, path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
        """Write ``path`` through ``write`` now; it replaces the old file once fsync'd. Ctrl-C waits until the
        bytes are written and the commit queued (:func:`signals_held`), so it never loses a finished write."""
        path = Path(path)
        with signals_held():
            fd, tmp = _write_temp(path, write)
            try:
                if self._queued is not None:
                    self._queued.result()  # one commit in flight at most: slow storage holds back, not piles up
                self._raise_failure()
            except BaseException:
                _discard(fd, tmp)
                raise
            self._submit(lambda: _commit(fd, tmp, path), cleanup=lambda: _discard(fd, tmp))
        return path

    def remove(self, path: str | os.PathLike) -> None:
        """Delete ``path`` after every commit asked for before."""
        self._raise_failure()
        self._submit(lambda: Path(path).unlink(missing_ok=True))

    def wait(self) -> None:
        """Return when every queued commit and removal is done; raise the first failure not yet raised."""
        self._drain()
        self._raise_failure()

    def _submit(self, job: Callable[[], Any], cleanup: Callable[[], Any] | None = None) -> None:
        def run() -> None:
            with self._lock:
                failed = self._error is not None
            if failed:  # something before it failed: a removal after it would lose the only good file
                if cleanup is not None:
                    cleanup()
                return
            try:
                job()
            except BaseException as error:  # raised in the caller's thread (_raise_failure)
                with self._lock:
                    self._error = error

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-commit")
        self._queued = self._pool.submit(run)

    def _raise_failure(self) -> None:
        """Raise a background failure once, after what was queued behind it has been skipped (not run later)."""
        with self._lock:
            failed = self._error is not None
        if not failed:
            return
        self._drain()
        with self._lock:
            error, self._error = self._error, None
        raise error

    def _drain(self) -> None:
        pool, self._pool, self._queued = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True)


def _write_temp(path: Path, write: Callable[[IO[bytes]], None]) -> tuple[int, str]:
    """A new temp file beside ``path`` holding what ``write`` wrote (flushed, not fsync'd); its fd stays open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600: give it the mode open() would have
        with os.fdopen(fd, "wb", closefd=False) as f:
            write(f)
            f.flush()
    except BaseException:
        _discard(fd, tmp)
        raise
    return fd, tmp


def _discard(fd: int, tmp: str) -> None:
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def _commit(fd: int, tmp: str, path: Path) -> None:
    """fsync the temp file, close it, rename it over ``path``; on failure the temp file goes, the old file stays."""
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
