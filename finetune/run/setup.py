"""Everything a job does before it builds a model, in an order that writes nothing until all checks passed.

The data is scanned and listed, the run's identity (result-defining config + data fingerprint) is
taken, the run directory is claimed against it, a resume is checked against the checkpoint's own
identity; only then are the data report, ``run_identity.json``, ``splits.csv`` and ``resolved_config.yaml``
written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from finetune.atomic import write_text_atomic
from finetune.config.identity import result_defining
from finetune.config.schema import FinetuneConfig, StrategyName
from finetune.config.typed import to_yaml
from finetune.data.datasets import Splits, load_splits, write_splits_csv
from finetune.errors import SetupError
from finetune.run.builders import apply_tf32, check_data
from finetune.run.outputs import reset_peak_memory
from finetune.run.resume import check_resume_matches, resolve_resume
from finetune.run.run_dir import (
    CONFIG_NAME,
    SPLITS_NAME,
    claim_run_dir,
    lock_run_dir,
    remove_leftovers,
    set_aside,
    write_identity,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A job cleared to run: where it writes, its data, its identity and the checkpoint it resumes."""

    out_dir: Path
    splits: Splits
    identity: dict[str, Any]
    resume_from: Path | None
    started: float


def data_fingerprint(splits: Splits) -> str:
    """What identifies the data a run read: every file with its size and modification time, or a dataset
    version string, hashed."""
    return hashlib.sha256(splits.fingerprint.encode()).hexdigest()


def prepare_run(cfg: FinetuneConfig) -> Prepared | dict[str, Any]:
    """Claim the run directory and load the data; a finished identical run's summary when resume=auto skips it."""
    started = time.perf_counter()
    reset_peak_memory()
    out_dir = Path(cfg.paths.output_dir)
    report = check_data(cfg)
    skip: set[Path] = set()
    if report is not None:
        from finetune.data.checks import apply_policy

        try:
            skip = set(apply_policy(report, str(cfg.data.on_bad_image)))
        except SetupError:
            if not (out_dir / "summary.json").is_file():  # the list the message points to must exist
                report.write(out_dir)
            raise
    if cfg.data.name == "folder":  # the check hashed every file already: the split reads nothing again
        splits = load_splits(cfg.data, skip=skip, hashes=report.hashes if report is not None else None)
    else:
        splits = load_splits(cfg.data)
    if cfg.monitor == "val/top5" and splits.num_classes < 5:
        raise SetupError(f"monitor=val/top5 needs 5 or more classes; this data has {splits.num_classes}. "
                         f"Use val/acc or val/mean_class_acc.")
    identity = result_defining(cfg, data_fingerprint(splits))
    claim = claim_run_dir(cfg, out_dir, identity)  # refuses to overwrite a run; resume=auto skips a matching one
    if claim.finished is not None:
        return claim.finished
    resume_from = None
    if cfg.strategy.name != StrategyName.linear_probe:
        resume_from = resolve_resume(cfg.resume, out_dir)
        if resume_from is not None:
            check_resume_matches(resume_from, identity)
            log.info("resuming from %s", resume_from)
    lock_run_dir(out_dir)  # before the first file of this run: a second run in the folder is refused
    remove_leftovers(out_dir)
    if report is not None:
        report.write(out_dir)
        if skip:
            log.warning("data check: skipping %d unreadable file(s), listed in %s", len(skip),
                        out_dir / "bad_files.txt")
        for line in report.warnings():
            log.warning("data check: %s", line)
    if claim.extends is not None:
        set_aside(claim.extends)
    write_identity(out_dir, identity)
    write_splits_csv(splits, out_dir / SPLITS_NAME)  # what was in train/val/test, with content hashes
    write_text_atomic(out_dir / CONFIG_NAME, to_yaml(cfg))
    pl.seed_everything(cfg.seed, workers=True)
    apply_tf32(cfg.speed.tf32)
    return Prepared(out_dir, splits, identity, resume_from, started)
