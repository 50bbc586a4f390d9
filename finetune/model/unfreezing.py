"""Scheduled unfreezing (gradual_unfreeze, freeze_then_finetune) done right, as a Lightning callback.

Avoids the known faults of Lightning's BackboneFinetuning: frozen BatchNorm stays in eval until
its stage unfreezes (``freeze_stages``); the optimizer holds a group per stage from the start
(LR 0 until its milestone), so a checkpoint restores into the same layout and the schedule is a
pure function of the epoch, which makes resume exact; under DDP the model is re-wrapped when the
set of trainable parameters changes, so no find_unused_parameters is needed and nothing hangs.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

from finetune.model.strategies import count_params, trainable_at

log = logging.getLogger(__name__)


class StageUnfreezer(pl.Callback):
    """At each epoch start, make exactly the scheduled stages trainable; log trainable params."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        added = pl_module.apply_schedule(trainer.current_epoch)
        if added:
            log.info("epoch %d: unfreezing %s (%d trainable params)", trainer.current_epoch, ", ".join(added),
                     count_params(pl_module, trainable_only=True))
            _rewrap_ddp(trainer)
        pl_module.log("trainable_params", float(count_params(pl_module, trainable_only=True)), on_step=False,
                      on_epoch=True, sync_dist=False)


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """DDP registers the parameters that require grad when it wraps the model: wrap again."""
    from pytorch_lightning.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and strategy.model is not strategy.lightning_module:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def unfreeze_events(module: Any, epochs_run: int) -> list[dict[str, Any]]:
    """summary.json's record: each unfreezing that happened, with trainable params after it."""
    events = []
    for epoch, stages in module.schedule:
        if epoch == 0 or epoch >= epochs_run or not stages:
            continue
        trainable = set(trainable_at(module.schedule, epoch))
        params = count_params(module.head) + sum(
            p.numel() for name in trainable for p in module.backbone.stages[name].parameters()
        )
        events.append({"epoch": epoch, "stages": list(stages), "trainable_params": params})
    return events
