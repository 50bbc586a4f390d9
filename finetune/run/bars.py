"""Epoch bars whose metrics fit one terminal line: short names, three decimals, what matters first.

Lightning's bars show every ``prog_bar`` metric under its logged name with all its digits
(``val/mean_class_acc: 0.6785714030265808``) plus ``v_num``: at 80 columns that wraps into a tall
column. These bars show ``loss val_acc val_mca ...`` at ``.3f`` and drop, from the end, whatever does
not fit beside the bar.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

# logged name -> name on the bar, in the order shown: the step loss and the default monitor first
SHORT_NAMES = {
    "loss": "loss",
    "val/acc": "val_acc",
    "val/mean_class_acc": "val_mca",
    "train/loss_epoch": "train_loss",
    "val/f1_macro": "val_f1",
    "val/top5": "val_top5",
    "val/loss": "val_loss",
}
# columns the bar itself takes beside the metrics: description, bar, counts, times, speed
RICH_BAR_COLUMNS = 52
TQDM_BAR_COLUMNS = 50


def short_metrics(items: Mapping[str, Any], width: int) -> dict[str, str]:
    """The bar's metrics: short names, values at 3 decimals, at most ``width`` characters in all."""
    ordered = sorted((k for k in items if k != "v_num"),
                     key=lambda k: (list(SHORT_NAMES).index(k) if k in SHORT_NAMES else len(SHORT_NAMES), k))
    shown: dict[str, str] = {}
    used = 0
    for key in ordered:
        name = SHORT_NAMES.get(key, key.replace("/", "_"))
        value = items[key]
        text = value if isinstance(value, str) else f"{float(value):.3f}"
        size = len(name) + len(text) + 3  # "name: value" and the space between metrics
        if used + size > width:
            break
        shown[name] = text
        used += size
    return shown


def terminal_width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _blocks(trainer: pl.Trainer) -> tuple[int, int] | None:
    """(optimizer steps per epoch, steps per batch) when the train batches are blocks of several steps."""
    loader = trainer.train_dataloader
    steps = getattr(loader, "optimizer_steps_per_epoch", None)
    return (int(steps), int(loader.steps_per_block)) if steps is not None else None


class CountsSteps:
    """A bar that counts optimizer steps: with resident cached features (cache.resident) one Lightning batch is a
    block of several, and a bar of batches would show 3/3 for an epoch of 143 steps."""

    @property
    def total_train_batches(self) -> int | float:
        blocks = _blocks(self.trainer) if self._trainer is not None else None
        return blocks[0] if blocks is not None else super().total_train_batches  # type: ignore[misc]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        blocks = _blocks(trainer)
        if blocks is not None:
            batch_idx = min((batch_idx + 1) * blocks[1], blocks[0]) - 1  # the last step this batch took
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # type: ignore[misc]


class FittingRichBar(CountsSteps, RichProgressBar):
    """Lightning's rich bar with :func:`short_metrics`, counting optimizer steps."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return short_metrics(super().get_metrics(trainer, pl_module), terminal_width() - RICH_BAR_COLUMNS)


class FittingTqdmBar(CountsSteps, TQDMProgressBar):
    """Lightning's tqdm bar with :func:`short_metrics`, counting optimizer steps."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return short_metrics(super().get_metrics(trainer, pl_module), terminal_width() - TQDM_BAR_COLUMNS)
