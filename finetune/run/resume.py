"""Surviving interruptions: atomic checkpoints, a checkpoint on Ctrl-C/SIGTERM, RNG state, resume lookup.

A killed or preempted job must restart where it stopped (same optimizer, scheduler, epoch and
RNG state) and never find a half-written file where a good checkpoint was.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import proxy, ref

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from finetune.atomic import DeferredCommits
from finetune.config.identity import describe, differences, only_extends
from finetune.data.datamodule import EpochSampler
from finetune.errors import SetupError
from finetune.run.run_dir import NO_RESUME

log = logging.getLogger(__name__)

INTERRUPTED_NAME = "interrupted"


# What only continuing the training reads: optimizer moments (2x the trainable weights under AdamW),
# scheduler state, and under EMA the raw (not averaged) weights. Best checkpoints leave them out.
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "current_model_state")
WITHOUT = "finetune_without"  # the storage option that names the keys to leave out


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder; fsync and rename over the target in the background.

    The checkpoint's bytes are written before ``save_checkpoint`` returns; the fsync and the rename follow on
    one background thread, in order with removals (:class:`~finetune.atomic.DeferredCommits`), so training goes on
    while the disk flushes. Loading a checkpoint, and Lightning's teardown at the end of every fit, test or
    interrupted run, wait until all of them are done. ``storage_options={WITHOUT: keys}`` leaves those top-level
    keys out of the file (:class:`BestCheckpoint`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.commits = DeferredCommits()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if isinstance(storage_options, dict) and WITHOUT in storage_options:
            left_out = set(storage_options[WITHOUT])
            checkpoint = {k: v for k, v in checkpoint.items() if k not in left_out}
            storage_options = None
        if "://" in str(path):  # remote storage: Lightning's own transaction-based save
            self.commits.wait()
            return super().save_checkpoint(checkpoint, path, storage_options)
        self.commits.write(path, lambda f: torch.save(checkpoint, f))
        return None

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.commits.wait()
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        if "://" in str(path):
            self.commits.wait()
            return super().remove_checkpoint(path)
        self.commits.remove(path)
        return None

    def teardown(self) -> None:
        self.commits.wait()
        super().teardown()


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose files hold the weights, hparams and callback states but no :data:`TRAINING_STATE`.

    Test, predict, export and ``backbone.weights=`` read the weights only; resuming reads last.ckpt or
    interrupted.ckpt, which keep everything. Unlike ``save_weights_only=True`` the callbacks still write
    into the file, so under EMA the best checkpoint holds the averaged weights val picked. Mirrors
    Lightning 2.6's ``_save_checkpoint`` with one storage option more (pyproject pins Lightning < 2.7).
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        trainer.save_checkpoint(filepath, self.save_weights_only, storage_options={WITHOUT: TRAINING_STATE})
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class RNGState(pl.Callback):
    """Stores torch/CUDA/numpy/python RNG states in checkpoints and restores them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters, but not the global RNGs
    that shuffle batches and drive dropout; without them a resumed run diverges from an
    uninterrupted one. Read through each library's public API (Lightning's own helpers are private),
    as plain types and tensors only, so the checkpoint still loads with weights_only=True.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        states: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss],
        }
        if torch.cuda.is_available():
            states["torch.cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" not in state_dict:
            return
        states = state_dict["rng"]
        torch.set_rng_state(states["torch"])
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        if "torch.cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch.cuda"])


class InterruptCheckpoint(pl.Callback):
    """On Ctrl-C or SIGTERM (what SLURM sends before preemption), save a resumable checkpoint.

    Other exceptions (a diverged loss, a bug) save nothing: the last good checkpoint stays. Such a
    checkpoint is usually taken mid-epoch; :class:`ResumeInEpoch` makes a resume from it go on with
    the next batch of that epoch's order. Not Lightning's public ``OnExceptionCheckpoint``: it saves on
    every exception, so a NaN loss would leave a diverged checkpoint as the newest one to resume from.

    Only during fit. An interruption of the test after it saved the test's weights (the best epoch's)
    with the finished fit's training state, as the newest checkpoint: a later ``resume=auto`` that
    extended the run (``trainer.max_epochs`` grown) trained on from the best epoch's weights instead of
    the last one's. last.ckpt holds the finished fit; a resume from it tests again. Once a fit ends,
    the interrupted.ckpt it resumed from is superseded and is removed (it keeps a full training state:
    up to 1.6 GB for a VGG-16 fine-tuned in full), so a finished run's folder never holds a stale one.

    With EMA (Lightning's WeightAveraging) a validation runs on the averaged weights, swapped in at its
    start and out at its end. A stop half-way through skipped the swap back, so the checkpoint held the
    averaged weights as the training weights and the raw ones as the average: the resumed run trained on
    from the average (weights off by 0.013, another best epoch). The swap is undone before the save.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._validation_open = False  # between on_validation_epoch_start and _end: averaged weights swapped in

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_open = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_open = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.trainer.states import TrainerFn
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._validation_open:
            self._validation_open = False
            swap_back_averaged_weights(trainer, pl_module)
        path = self.dirpath / f"{INTERRUPTED_NAME}.ckpt"
        trainer.save_checkpoint(str(path), weights_only=False)  # everything; said, so Lightning does not log it
        self.saved = path
        log.warning("interrupted: resumable checkpoint saved to %s", path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a fit that ended (its checkpoint writes committed): the interrupted.ckpt it resumed from is
        behind last.ckpt now (kept when last.ckpt is older, e.g. saved every few epochs only)."""
        stale = self.dirpath / f"{INTERRUPTED_NAME}.ckpt"
        if trainer.is_global_zero and stale.is_file() and latest_checkpoint(self.dirpath) == self.dirpath / "last.ckpt":
            stale.unlink()
            log.info("removed %s: this run went on past it (last.ckpt)", stale.name)


def swap_back_averaged_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """What WeightAveraging's ``on_validation_epoch_end`` does: the training weights back in the module, the
    average back in its AveragedModel (private API, pinned by pyproject's upper bound)."""
    from pytorch_lightning.callbacks import WeightAveraging

    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging) and getattr(callback, "_average_model", None) is not None:
            callback._swap_models(pl_module)


class ResumeInEpoch(pl.Callback):
    """A run resumed mid-epoch goes on with the next batch of the same order, with that epoch's stages; one
    stopped during a validation runs that validation again.

    It then ends with the weights, the best checkpoint and the metrics of an uninterrupted run
    (:func:`position_train_loaders`, :func:`revalidate`).
    """

    def __init__(self) -> None:
        self._first_batch: int | None = None  # batch index the resumed epoch must go on with
        self._quiet: tuple | None = None  # the warnings filter hiding Lightning's mid-epoch warning
        self.samples_per_batch: int | None = None  # of this run's train loader; a checkpoint records it
        self._recorded: int | None = None  # what the checkpoint resumed from recorded
        self._trainer: Callable[[], pl.Trainer | None] | None = None  # a weak reference, for state_dict
        # the checkpoint resumed from was saved inside a validation, and it has not run again yet
        self._validation_unfinished = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = ref(trainer)  # no cycle: the trainer holds this callback

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        samples = self.samples_per_batch if self.samples_per_batch is not None else self._recorded
        if samples is not None:  # before on_train_start: still the restored checkpoint's
            state["samples_per_batch"] = samples
        trainer = self._trainer() if self._trainer is not None else None
        if self._validation_unfinished or (trainer is not None and validating_unfinished(trainer)):
            state["validation_unfinished"] = True  # also when stopped again before it ran
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._recorded = state_dict.get("samples_per_batch")
        self._validation_unfinished = bool(state_dict.get("validation_unfinished", False))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:  # before on_validation_end, where ModelCheckpoint saves
            self._validation_unfinished = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_unfinished:
            revalidate(trainer)
        if restarted_inside_epoch(trainer):
            replay_epoch_start(trainer, pl_module)
        samplers = train_samplers(trainer)
        self.samples_per_batch = samplers[0][1] if samplers else None
        done = batches_done(trainer)
        if done and self._recorded is not None and self.samples_per_batch not in (None, self._recorded):
            raise SetupError(
                f"Cannot resume inside epoch {trainer.current_epoch}: the interrupted run took train batches of "
                f"{self._recorded} samples and this one takes {self.samples_per_batch} (cache.resident or "
                f"cache.steps_per_block differ, or the features no longer fit on the device), so Lightning's "
                f"count of done batches means other samples here. Resume with the interrupted run's cache "
                f"settings (its resolved_config.yaml), e.g. cache.resident=false if it read batches from the files."
            )
        if not position_train_loaders(trainer, done):
            if done:
                log.warning("resumed at batch %d of epoch %d, but the train loader draws no EpochSampler order "
                            "(e.g. DDP wraps it): this epoch's first batches are drawn again.", done + 1,
                            trainer.current_epoch)
            return
        if not done:
            return
        self._first_batch = done
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        if done % accumulate == 0:
            self._quiet = _hide_lightning_mid_epoch_warning()
        else:
            log.warning("resumed inside a gradient accumulation window (batch %d, accumulate_grad_batches=%d): the "
                        "gradients of its first %d batches were not saved, so this resume is not exact.", done + 1,
                        accumulate, done % accumulate)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._validation_unfinished = False  # it ran again by now, or Lightning did not take it up
        if self._first_batch is None:
            return
        expected, self._first_batch = self._first_batch, None
        _unhide(self._quiet)
        self._quiet = None
        if batch_idx != expected:  # Lightning counted the restored epoch differently: say so
            log.warning("resume: the loader was positioned at batch %d but Lightning goes on with batch %d; "
                        "this epoch's order is not the uninterrupted run's.", expected, batch_idx)


LIGHTNING_MID_EPOCH_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


def position_train_loaders(trainer: pl.Trainer, done: int) -> bool:
    """Point every train EpochSampler at the restored epoch, past its ``done`` batches; False: none found.

    Lightning restores the loop counters (k batches of epoch e done) but builds the loader anew, and
    creates its iterator before it calls ``set_epoch``: a mid-epoch resume replayed the epoch's first
    batches, and with ``num_workers`` > 0 even a resume at an epoch boundary drew epoch 0's order
    (Lightning issue #21938). Runs in ``on_train_start``, after Lightning's restart bookkeeping and
    before the first batch; the iterator is made again when the position changed. Reads private loop
    state (``_combined_loader``, ``_data_fetcher``; pinned by pyproject's upper bound): a stateful
    dataloader (torchdata's) would restore the position itself, but it cannot re-draw an order from
    (seed, epoch), which is what keeps cached, uncached and any-worker runs on the same batches.
    """
    samplers = train_samplers(trainer)
    epoch = int(trainer.fit_loop.epoch_progress.current.processed)  # what Lightning passes to set_epoch
    moved = False
    for sampler, batch_size in samplers:
        skip = min(done * batch_size, len(sampler))
        if sampler.epoch != epoch or skip:
            sampler.start_at(epoch, skip)
            moved = True
    if moved:
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)  # a worker iterator drew its first indices already, from the old position
    if samplers and done:
        log.info("resuming epoch %d at batch %d of %d, in the same order as the uninterrupted run", epoch,
                 done + 1, trainer.num_training_batches)
    return bool(samplers)


def validating_unfinished(trainer: pl.Trainer) -> bool:
    """Whether fit is inside a validation that has batches left: what a checkpoint saved now (on SIGTERM, or
    a second Ctrl-C) stops in the middle of. Not in the validation's end hooks, where the epoch's own
    checkpoints are saved after its last batch."""
    from pytorch_lightning.trainer.states import RunningStage, TrainerFn

    if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage != RunningStage.VALIDATING:
        return False
    return not trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch


def revalidate(trainer: pl.Trainer) -> None:
    """Make the restored loop run the interrupted validation again, from its first batch.

    The checkpoint holds the weights the validation was measuring (no training step comes between), but
    Lightning reads its counters as "the epoch's last batch is done" and skips the validation: the resumed
    run then never saw that epoch's val metric, so its best checkpoint, early stopping and the test on the
    best weights differed from an uninterrupted run's. Lightning restarts a validation saved from inside
    a step itself (``restarted_mid_evaluation``: the training loop then validates before training on);
    this makes it take that path with no val batch counted as done. Runs in ``on_train_start``, after
    Lightning's restart bookkeeping (private loop state, pinned by pyproject's upper bound).
    """
    from pytorch_lightning.loops.evaluation_loop import RestartStage

    epoch_loop = trainer.fit_loop.epoch_loop
    if not epoch_loop.restarting:
        return
    val_loop = epoch_loop.val_loop
    val_loop.batch_progress.current.reset()
    val_loop._restart_stage = RestartStage.RESTARTED_MID_EVALUATION
    log.info("resuming with epoch %d's validation, which the interruption stopped half-way", trainer.current_epoch)


def restarted_inside_epoch(trainer: pl.Trainer) -> bool:
    """Whether Lightning continues an epoch it restored, skipping that epoch's ``on_train_epoch_start``."""
    fit = trainer.fit_loop
    return bool(getattr(fit, "restarted_mid_epoch", False) or getattr(fit, "restarted_on_epoch_end", False))


def batches_done(trainer: pl.Trainer) -> int:
    """Batches of the current epoch the restored loop counts as done: 0 unless it restarts mid-epoch.

    Mirrors what ``_TrainingEpochLoop.reset`` makes of the restored counters (it runs later): a
    checkpoint saved in ``on_train_batch_end`` counts that batch as done, and a full epoch starts over.
    """
    loop = trainer.fit_loop.epoch_loop
    if not loop.restarting:
        return 0
    done = int(loop.batch_progress.current.completed) + int(bool(getattr(loop, "restarted_on_train_batch_end",
                                                                           False)))
    return done if done < trainer.num_training_batches else 0


def train_samplers(trainer: pl.Trainer) -> list[tuple[EpochSampler, int]]:
    """(EpochSampler, samples per batch) of each train loader that draws its order from one."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    found = []
    for loader in getattr(combined, "flattened", []):
        blocks = getattr(loader, "samples_per_batch", None)  # finetune.data.resident.BlockLoader
        if isinstance(loader.sampler if blocks else None, EpochSampler) and isinstance(blocks, int):
            found.append((loader.sampler, blocks))
            continue
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        sampler = getattr(loader, "sampler", None) if sampler is None else sampler
        batch_size = getattr(batch_sampler, "batch_size", None)
        if isinstance(sampler, EpochSampler) and isinstance(batch_size, int):
            found.append((sampler, batch_size))
    return found


def replay_epoch_start(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Redo the epoch-start work the weights depend on: Lightning skips ``on_train_epoch_start`` then.

    That is the scheduled unfreezing (which stages train in this epoch): without it a
    gradual_unfreeze run resumed after a milestone went on training with the epoch-0 stages.
    """
    from finetune.model.unfreezing import StageUnfreezer

    for callback in trainer.callbacks:
        if isinstance(callback, StageUnfreezer):
            callback.on_train_epoch_start(trainer, pl_module)


def _hide_lightning_mid_epoch_warning() -> tuple:
    """Lightning warns that a mid-epoch resume of a non-resumable loader is unreliable: ours is exact."""
    warnings.filterwarnings("ignore", message=LIGHTNING_MID_EPOCH_WARNING)
    return warnings.filters[0]


def _unhide(entry: tuple | None) -> None:
    if entry is not None and entry in warnings.filters:
        warnings.filters.remove(entry)


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
        # a block of several optimizer steps (cache.resident) returns each step's loss under "losses"
        losses = outputs.get("losses", outputs.get("loss")) if isinstance(outputs, dict) else outputs
        if losses is None:
            return
        losses = losses.detach().reshape(-1)
        first = trainer.global_step - len(losses)  # the optimizer step that produced the first of them
        self._losses.append(losses)
        self._steps.extend(range(first, first + len(losses)))
        if len(self._steps) >= self.every:
            self._raise_if_bad(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_bad(trainer)

    def _raise_if_bad(self, trainer: pl.Trainer) -> None:
        losses, steps = self._losses, self._steps
        self._losses, self._steps = [], []
        if not losses:
            return
        finite = torch.isfinite(torch.cat(losses).float())
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
    """``resume=auto``: the run directory's latest checkpoint (none: a fresh start); ``resume=PATH``: that file.

    Not ``trainer.fit(ckpt_path="last")``: that finds only the checkpoint callbacks' ``last`` files, never
    interrupted.ckpt (written on Ctrl-C/SIGTERM, usually newer), and it cannot be checked before fit starts.
    """
    if value in NO_RESUME:
        return None
    if value == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise SetupError(f"resume='{value}' is neither 'auto' nor an existing checkpoint file.")
    return path


def check_resume_matches(path: Path, identity: dict[str, Any]) -> None:
    """Refuse, before any weights load, a checkpoint of another run: its recorded identity must be this one's.

    Only ``trainer.max_epochs`` may grow (the run continues to more epochs). A changed seed, data root or
    data file, transform, strategy, optimizer or regularization is named with both values: the resumed run
    would otherwise mix two runs' results (a new seed's cache under the old backbone, another folder's data).
    """
    from finetune.model.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)  # refuses code pickles and foreign files, clearly
    hp = checkpoint["hyper_parameters"]
    recorded = hp.get("identity")
    if not isinstance(recorded, dict):
        raise SetupError(
            f"Cannot resume from '{path}': it records no run identity (written by an earlier finetune version), so "
            f"it cannot be shown to belong to this config and data. Start a new run (resume=null, another "
            f"hydra.run.dir), or use its weights with backbone.weights='{path}'."
        )
    diffs = differences(recorded, identity)
    if diffs and not only_extends(diffs):
        raise SetupError(
            f"Cannot resume from '{path}': this config or data is not the checkpoint's ({describe(diffs)}). A resumed "
            f"run must compute what the interrupted one would have; only trainer.max_epochs may grow. Resume with "
            f"the run's own settings (its resolved_config.yaml lists them), or start a new run: resume=null with "
            f"another hydra.run.dir."
        )
    if "optimizer_states" not in checkpoint:
        raise SetupError(
            f"Cannot resume from '{path}': it holds the weights only (a best checkpoint keeps no optimizer state), "
            f"so training cannot continue from it exactly. Resume from the run's last.ckpt (resume=auto with its "
            f"hydra.run.dir), or start a new run from its weights with backbone.weights='{path}'."
        )
