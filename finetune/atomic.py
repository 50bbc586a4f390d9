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
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_held():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it 0600: give it the mode open() would have
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))
