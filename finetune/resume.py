"""Surviving interruptions: atomic checkpoints, a checkpoint on Ctrl-C/SIGTERM, RNG state, resume lookup.

A killed or preempted job must restart where it stopped (same optimizer, scheduler, epoch and
RNG state) and never find a half-written file where a good checkpoint was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from omegaconf import DictConfig
from pytorch_lightning.plugins.io import TorchCheckpointIO

from finetune.errors import SetupError
from finetune.run_outputs import write_atomic

log = logging.getLogger(__name__)

INTERRUPTED_NAME = "interrupted"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder, fsync, then rename over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction-based save
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomic(path, lambda f: torch.save(checkpoint, f))
        return None


class RNGState(pl.Callback):
    """Stores torch/numpy/python RNG states in checkpoints and restores them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters, but not the global RNGs
    that shuffle batches and drive dropout; without them a resumed run diverges from an
    uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        kind, keys, pos, has_gauss, cached = states["numpy"]
        # Plain types and tensors only, so the checkpoint still loads with weights_only=True.
        states["numpy"] = [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)]
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" not in state_dict:
            return
        states = dict(state_dict["rng"])
        kind, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (kind, keys.numpy(), pos, has_gauss, cached)
        _set_rng_states(states)


class InterruptCheckpoint(pl.Callback):
    """On Ctrl-C or SIGTERM (what SLURM sends before preemption), save a resumable checkpoint.

    Other exceptions (a diverged loss, a bug) save nothing: the last good checkpoint stays.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        path = self.dirpath / f"{INTERRUPTED_NAME}.ckpt"
        trainer.save_checkpoint(str(path))
        self.saved = path
        log.warning("interrupted: resumable checkpoint saved to %s", path)


class FiniteLoss(pl.Callback):
    """Stop at the first NaN/Inf training loss, naming the step and the usual fixes.

    Losses are kept (as device scalars) and checked together every ``every`` steps and at epoch
    end: no kernel and no host-device sync per step, and the first bad step is still exact.
    """

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self._losses: list[torch.Tensor] = []
        self._steps: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._losses.append(loss.detach())
        self._steps.append(trainer.global_step - 1)  # the optimizer step that produced this loss
        if len(self._losses) >= self.every:
            self._raise_if_bad(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_bad(trainer)

    def _raise_if_bad(self, trainer: pl.Trainer) -> None:
        losses, steps = self._losses, self._steps
        self._losses, self._steps = [], []
        if not losses:
            return
        finite = torch.isfinite(torch.stack(losses).float())
        if bool(finite.all()):
            return
        first = steps[int((~finite).nonzero()[0])]
        raise TrainingDiverged(
            f"The training loss became NaN/Inf at global step {int(first)} (epoch {trainer.current_epoch}). The "
            f"last good checkpoint is kept in {Path(trainer.default_root_dir) / 'checkpoints'}. Likely fixes: "
            f"lower optimizer.lr (e.g. 10x), use trainer.precision=32-true or bf16-mixed instead of 16-mixed, "
            f"set trainer.gradient_clip_val=1.0, or check the data for broken values."
        )


class TrainingDiverged(SetupError):
    exit_code = 3


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest of last.ckpt / interrupted.ckpt in a run's checkpoints folder."""
    candidates = [p for p in (folder / "last.ckpt", folder / f"{INTERRUPTED_NAME}.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def resolve_resume(value: Any, run_dir: Path) -> Path | None:
    """``resume=auto``: the run directory's latest checkpoint (none: a fresh start); ``resume=PATH``: that file."""
    if value in (None, False, "none", "null", ""):
        return None
    if value == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise SetupError(f"resume='{value}' is neither 'auto' nor an existing checkpoint file.")
    return path


def check_resume_matches(path: Path, cfg: DictConfig, num_classes: int) -> None:
    """Refuse a checkpoint made for another backbone, strategy or class count, saying what differs."""
    from finetune.checkpoints import read_checkpoint

    hp = read_checkpoint(path)["hyper_parameters"]  # refuses code pickles and foreign files, clearly
    wanted = {"backbone": cfg.backbone.name, "num_classes": num_classes, "strategy": cfg.strategy.name}
    found = {k: hp.get(k) for k in wanted}
    if found != wanted:
        raise SetupError(
            f"Cannot resume from '{path}': it holds {found}, but the config asks for {wanted}. Resume with "
            f"the same backbone/strategy/data, or start a new run (resume=none, another hydra.run.dir)."
        )
