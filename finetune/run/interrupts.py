"""Stopping cleanly on SIGTERM and Ctrl-C in every phase, with one hint that says how to go on.

Inside Lightning's training loop SIGTERM sets a flag and the loop stops after the batch (InterruptCheckpoint
then saves interrupted.ckpt). Before fit (the data check) nothing listened: the process died with
exit 143 and no word; during the feature extraction (inside fit, outside the loop) the flag was read only
when training started. :func:`stop_on_sigterm` raises :class:`~finetune.errors.Interrupted` there instead;
every temp file is removed on the way out, and a resumed run redoes only unfinished work (complete cache
shards are kept).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from finetune.errors import Interrupted
from finetune.progress import in_phase
from finetune.run.resume import latest_checkpoint


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Stop now when no one else stops: outside fit (this is the process's handler), or in one of our phases.

    During fit Lightning's handler calls this one after its own; in the loop it stops at the next batch itself.
    """
    if signal.getsignal(signal.SIGTERM) is _on_sigterm or in_phase():
        raise Interrupted("SIGTERM")


def stop_on_sigterm() -> None:
    """Install the handler (main thread only, as signal handlers must be)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def die_with_launcher() -> None:
    """A rank > 0 dies with the process that launched it (Linux ``PR_SET_PDEATHSIG``).

    Lightning's launcher watches its child ranks and kills everything when one dies, but nothing watches
    the other way. With gloo (CPU) the children see rank 0's sockets close and fail at once
    (tests/test_ddp_faults.py); with NCCL they would wait in their next collective for its timeout
    (10 minutes), holding the GPUs. Under torchrun the parent is its agent, which stops the group itself.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0" or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the kernel was told
        os._exit(1)


def resume_hint(cause: str, out_dir: str | Path) -> str:
    """The one line printed on every interruption: what was kept and the command that continues."""
    checkpoint = latest_checkpoint(Path(out_dir) / "checkpoints")
    kept = (f"a resumable checkpoint is in {checkpoint.parent}" if checkpoint is not None
            else "no checkpoint yet, and complete feature-cache shards are kept")
    return (f"interrupted by {cause}: {kept}; continue with the same command plus resume=auto "
            f"hydra.run.dir={out_dir}")


def say_how_to_resume(cause: str, out_dir: str | Path) -> None:
    print(resume_hint(cause, out_dir), file=sys.stderr)
