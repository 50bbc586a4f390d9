"""Stopping cleanly on SIGTERM and Ctrl-C in every phase, with one hint that says how to go on.

Inside Lightning's training loop SIGTERM sets a flag and the loop stops after the batch (InterruptCheckpoint
then saves interrupted.ckpt). Before fit (the data check) nothing listened: the process died with
exit 143 and no word; during the feature extraction (inside fit, outside the loop) the flag was read only
when training started. :func:`stop_on_sigterm` raises :class:`~finetune.errors.Interrupted` there instead;
every temp file is removed on the way out, and a resumed run redoes only unfinished work (complete cache
shards are kept).

Ctrl-C in the training loop stops as SIGTERM does, after the batch in progress (:class:`CtrlCAtBatchEnd`):
Python raises KeyboardInterrupt wherever the loop is, between a backward and its optimizer step or in the
middle of a block of resident steps, and interrupted.ckpt then held weights that a resume trained again from
an earlier position.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from finetune.errors import Interrupted
from finetune.progress import in_phase
from finetune.run.resume import latest_checkpoint

log = logging.getLogger(__name__)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Stop now when no one else stops: outside fit (this is the process's handler), or in one of our phases.

    During fit Lightning's handler calls this one after its own; in the loop it stops at the next batch itself.
    """
    if signal.getsignal(signal.SIGTERM) is _on_sigterm or in_phase():
        raise Interrupted("SIGTERM")


def stop_on_sigterm() -> None:
    """Install the handler (main thread only, as signal handlers must be)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


class CtrlCAtBatchEnd(pl.Callback):
    """While training, the first Ctrl-C stops the run after the batch in progress (a block of resident steps
    is one batch), the second at once.

    The stop goes Lightning's SIGTERM way: its loop checks ``trainer.received_sigterm`` after each batch
    and after each epoch's end, then InterruptCheckpoint saves interrupted.ckpt with whole steps only, so
    ``resume=auto`` continues exactly where the run stopped. The flag is raised in this callback's
    ``on_train_batch_end`` and ``on_train_epoch_end``, not in the handler: a Ctrl-C during validation
    lets the validation and that epoch's checkpoints finish (Lightning's validation loop reads the flag
    per batch and would stop it half-way). :func:`~finetune.run.train.fit_and_test` turns Lightning's
    SIGTERMException back into the KeyboardInterrupt the caller expects (exit 130, a notebook's
    interrupt) when ``requested``. Single process only: with several DDP ranks each would see the key at
    another batch, so there Ctrl-C stops at once, as Lightning does it.
    """

    def __init__(self) -> None:
        self.requested = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = False
        if (trainer.world_size == 1 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):  # else someone else's handler
            signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: now, mid-batch (a resume then repeats part of it)
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this batch, with a checkpoint to resume from; Ctrl-C again stops "
                    "at once")

    def _promote(self, trainer: pl.Trainer) -> None:
        trainer._signal_connector.received_sigterm = True  # Lightning's own stop flag (no public setter)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.requested and not validation_follows(trainer, batch_idx):  # else at the epoch's end
            self._promote(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.requested:
            self._promote(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if signal.getsignal(signal.SIGINT) == self._on_ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def validation_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning may validate right after train batch ``batch_idx``: the epoch's last batch, or one
    that ``val_check_interval`` picks."""
    done = batch_idx + 1
    every = trainer.val_check_batch
    return done >= trainer.num_training_batches or (isinstance(every, int) and every > 0 and done % every == 0)


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
