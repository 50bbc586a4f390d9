"""Runs with the user's defaults: the rich progress bar and the csv logger (conftest turns the bar off)."""

from __future__ import annotations

import csv
from pathlib import Path

from omegaconf import DictConfig, open_dict

from finetune.run.train import train


def with_default_bar(cfg: DictConfig) -> DictConfig:
    """Undo the fixture's ``callbacks.progress_bar=none``: the default (rich) bar, as a user gets it."""
    with open_dict(cfg):
        cfg.callbacks.progress_bar = "rich"
    return cfg


def logged_columns(cfg: DictConfig) -> list[str]:
    """The header of the default csv logger's metrics file."""
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
        return next(csv.reader(f))


def test_lr_find_with_default_progress_bar(compose_cfg) -> None:
    """Issue 17: the real fit after lr_find's sweep (a fit of the same trainer without the bar) crashed with
    "You called self.log(train/loss_step, ...) twice in training_step with different arguments"."""
    cfg = with_default_bar(compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1",
                                       "tune.lr_find=true"))
    assert "csv" in cfg.logger
    summary = train(cfg)
    assert "acc" in summary["test"]
    assert summary["lr_find"]["suggested_lr"] > 0
    assert Path(summary["lr_find"]["plot"]).stat().st_size > 1000
    assert "train/loss_step" in logged_columns(cfg)


def test_default_run_with_default_progress_bar(compose_cfg) -> None:
    cfg = with_default_bar(compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1"))
    summary = train(cfg)
    assert "acc" in summary["test"]
    assert summary["global_steps"] > 0
    columns = logged_columns(cfg)
    assert "train/loss_step" in columns and "train/loss_epoch" in columns
    assert "loss" not in columns  # the bar's copy of the step loss stays off the loggers
