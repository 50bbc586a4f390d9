"""What a run directory already holds decides what a new run there may do.

A finished run (summary.json) is a record: ``resume=auto`` skips it only when its identity (the
result-defining config and the data fingerprint, run_identity.json) is the one asked for now (how a
sweep is resumed), extends it when only ``trainer.max_epochs`` grew, and refuses any other difference;
a run started there without ``resume`` is refused instead of
overwriting that record or mixing its checkpoints with new ones. Deciding writes nothing; an
extension sets the old summary aside only after the resume's own checks passed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.atomic import write_json_atomic
from finetune.config.identity import DATA_KEY, describe, differences, only_extends
from finetune.config.schema import FinetuneConfig
from finetune.errors import SetupError
from finetune.progress import is_launch_rank_zero
from finetune.run.files import CONFIG_NAME, SPLITS_NAME, SUMMARY_NAME  # noqa: F401  (where callers import them)

log = logging.getLogger(__name__)

NO_RESUME = (None, "none", "null", "", "false", "False")  # how a config says "start fresh"
IDENTITY_NAME = "run_identity.json"  # the run's identity (finetune.config.identity), beside its config


LOCK_NAME = ".finetune.lock"  # held (flock) by the process running in the folder; the kernel frees it on exit
_held: dict[Path, int] = {}  # run folder -> the open lock file descriptor of this process


def lock_run_dir(out_dir: Path) -> None:
    """One run per run directory at a time: an exclusive flock, taken before the run writes anything.

    A second start is refused naming the holder's PID. A holder that died (kill -9, a crash) holds nothing:
    the kernel released its lock, so the folder is free again. Ranks > 0 of a multi-process launch share
    rank 0's folder and take no lock. Idempotent within one process.
    """
    import fcntl
    import os

    if not is_launch_rank_zero():
        return
    out_dir = out_dir.absolute()
    if out_dir in _held:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SetupError(f"The run directory {out_dir} cannot be used ({err.strerror or err}): give a writable "
                         f"hydra.run.dir (or hydra.sweep.dir).") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SetupError(f"Another finetune run (PID {holder}) is running in {out_dir} now; two runs in one folder "
                         f"would overwrite each other's checkpoints and summary. Wait for it to end, or give this "
                         f"run its own hydra.run.dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[out_dir] = fd


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Temp files of an earlier process killed while writing (``write_atomic``'s ``.NAME.*.tmp``): the run
    holds the folder's lock, so no live writer owns them."""
    gone = []
    for path in out_dir.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            gone.append(path)
    if gone:
        log.info("removed %d temp file(s) a killed run left in %s", len(gone), out_dir)
    return gone


def write_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    write_json_atomic(out_dir / IDENTITY_NAME, identity)


def read_identity(out_dir: Path) -> dict[str, Any] | None:
    """The identity a run recorded; None when it has none (an older version) or it cannot be read."""
    try:
        loaded = json.loads((out_dir / IDENTITY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


@dataclass
class Claim:
    """What a run may do in its folder: ``finished``, the summary of the same run done before (skip it);
    ``extends``, the summary of a finished run this one continues (set aside once its checks passed)."""

    finished: dict[str, Any] | None = None
    extends: Path | None = None


def claim_run_dir(cfg: FinetuneConfig, out_dir: Path, identity: dict[str, Any], compare_data: bool = True) -> Claim:
    """Decide, writing nothing, whether this run may use ``out_dir``; a SetupError when it would overwrite a run.

    ``identity`` is this run's (:func:`finetune.config.identity.result_defining`): a finished run there is
    skipped only when its recorded identity is the same, extended when only ``trainer.max_epochs`` grew.
    ``compare_data=False``: the data is not loaded yet (the check at the door); its fingerprint is left out.
    """
    resume = cfg.resume
    finished = out_dir / SUMMARY_NAME
    if not finished.is_file():
        has_checkpoints = any((out_dir / "checkpoints").glob("*.ckpt"))
        if resume in NO_RESUME and has_checkpoints:
            raise SetupError(
                f"{out_dir} holds checkpoints of an unfinished run; starting a new run there would mix the two. "
                f"Continue it with resume=auto (same hydra.run.dir), or choose another hydra.run.dir (the default "
                f"is a new timestamped folder), or delete that folder to start over."
            )
        return Claim()
    if resume != "auto":
        raise SetupError(
            f"{out_dir} already holds a finished run ({SUMMARY_NAME}); a new run there would overwrite its record "
            f"and mix its checkpoints with new ones. Choose another hydra.run.dir (or hydra.sweep.dir for a "
            f"sweep; the default is a new timestamped folder), use resume=auto to skip it (or to extend it with a "
            f"larger trainer.max_epochs), or delete that folder to redo it."
        )
    stored = read_identity(out_dir)
    if stored is None:
        raise SetupError(
            f"resume=auto: {out_dir} holds a finished run without {IDENTITY_NAME} (an earlier finetune version, or "
            f"a damaged folder), so it cannot be shown to be this config's run. Give this run its own "
            f"hydra.run.dir (or a new hydra.sweep.dir), or delete that folder to redo it."
        )
    diffs = differences(stored, identity)
    if not compare_data:
        diffs.pop(DATA_KEY, None)
    if not diffs:
        log.info("resume=auto: %s is finished with the same config; skipping it", out_dir)
        return Claim(finished=json.loads(finished.read_text()))
    if only_extends(diffs):
        if not (out_dir / "checkpoints" / "last.ckpt").is_file():
            raise SetupError(f"resume=auto with trainer.max_epochs={diffs['trainer.max_epochs'][1]} would extend the "
                             f"finished run in {out_dir}, but its checkpoints/last.ckpt is gone. Give the longer run "
                             f"its own hydra.run.dir.")
        return Claim(extends=finished)
    raise SetupError(
        f"resume=auto: {out_dir} holds a finished run with another config or data ({describe(diffs)}). Its results "
        f"are not those of this config, and a new run there would overwrite them. Give the new settings their "
        f"own hydra.run.dir (or a new hydra.sweep.dir for a sweep), or delete that folder to redo it."
    )


def set_aside(summary: Path) -> Path | None:
    """Keep an extended run's old summary under a name of its own; the folder then reads as unfinished.

    Every rank of a multi-process launch may call this: the first one moves the file, the others find
    it gone.
    """
    try:
        epochs = json.loads(summary.read_text()).get("epochs_run")
    except (OSError, ValueError):
        return None
    stem = f"summary.until-epoch{epochs}" if epochs is not None else "summary.previous"
    target, n = summary.with_name(f"{stem}.json"), 1
    while target.exists():
        n += 1
        target = summary.with_name(f"{stem}-{n}.json")
    try:
        summary.rename(target)
    except FileNotFoundError:
        return None
    log.info("resume=auto: extending the finished run in %s (its summary is kept as %s)", summary.parent, target.name)
    return target
