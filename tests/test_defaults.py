"""Runs with the user's defaults: the rich progress bar and the csv logger (conftest turns the bar off)."""

from __future__ import annotations

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from finetune.errors import SetupError
from finetune.run.resume import check_resume_matches
from finetune.run.train import train
from tests.conftest import write_image_folder


def with_default_bar(cfg: DictConfig, bar: str = "rich") -> DictConfig:
    """Undo the fixture's ``callbacks.progress_bar=none``: the default (rich) bar, as a user gets it."""
    with open_dict(cfg):
        cfg.callbacks.progress_bar = bar
    return cfg


def logged_columns(cfg: DictConfig) -> list[str]:
    """The header of the default csv logger's metrics file."""
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
        return next(csv.reader(f))


def test_lr_find_with_default_progress_bar(compose_cfg, caplog) -> None:
    """Issue 17: the real fit after lr_find's sweep (a fit of the same trainer without the bar) crashed with
    "You called self.log(train/loss_step, ...) twice in training_step with different arguments"."""
    cfg = with_default_bar(compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1",
                                       "tune.lr_find=true"))
    assert "csv" in cfg.logger
    caplog.set_level("INFO")
    summary = train(cfg)
    # lr_find's save and restore of its own temp file: Lightning's INFO lines about a file the user never made
    assert ".lr_find_" not in caplog.text and "`weights_only` was not set" not in caplog.text
    assert "Loaded model weights from the checkpoint at" in caplog.text  # the test's restore still says so
    assert "acc" in summary["test"]
    assert summary["lr_find"]["suggested_lr"] > 0
    assert Path(summary["lr_find"]["plot"]).stat().st_size > 1000
    assert "train/loss_step" in logged_columns(cfg)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_default_run_with_default_progress_bar(compose_cfg, caplog, recwarn, bar: str) -> None:
    caplog.set_level(logging.INFO)
    cfg = with_default_bar(compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1"), bar)
    summary = train(cfg)
    assert "acc" in summary["test"]
    assert summary["global_steps"] > 0
    columns = logged_columns(cfg)
    assert "train/loss_step" in columns and "train/loss_epoch" in columns
    assert "loss" not in columns  # the bar's copy of the step loss stays off the loggers
    # small data: log_every_n_steps follows the epoch's batches, so Lightning has nothing to warn of
    assert not [w for w in recwarn if "logging interval" in str(w.message)]
    logged = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("extracting train features: ") for line in logged)  # the cached phase reports
    assert any("total 11.18 M" in line and "cached 11.18 M" in line for line in logged)  # the truthful summary
    assert f"total {summary['params_total'] / 1e6:,.2f} M" in "\n".join(logged)  # the same as summary.json


def test_best_checkpoint_holds_weights_not_training_state(compose_cfg, image_folder) -> None:
    """Best checkpoints leave optimizer and scheduler state out (last.ckpt keeps them, for resume), and a resume
    from one is refused with the way out; its weights are the test's, as before."""
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
                      "data.num_workers=0", "trainer.max_epochs=1", "strategy=full_finetune", "logger=none")
    summary = train(cfg)
    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    last_path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last = torch.load(last_path, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best and "lr_schedulers" not in best
    assert last["optimizer_states"] and last["lr_schedulers"]
    assert best["callbacks"] and best["hyper_parameters"]["identity"] == last["hyper_parameters"]["identity"]
    assert Path(summary["best_checkpoint"]).stat().st_size < 0.6 * last_path.stat().st_size  # AdamW: 2 moments
    with pytest.raises(SetupError, match=r"holds the weights only .*resume=auto"):
        check_resume_matches(Path(summary["best_checkpoint"]), best["hyper_parameters"]["identity"])


def test_a_default_cached_run_prints_no_python_warning(tmp_path: Path) -> None:
    """The console of a default feature_extractor run (cache, resident features, rich bar, csv logger), warnings
    not silenced as the other subprocess tests silence them: torch's "The given NumPy array is not writable"
    (the resident features share the cache's read-only memory map) reached every user."""
    root = write_image_folder(tmp_path / "images", classes=3, per_class=12)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "backbone=resnet18", "backbone.weights=none", "data=folder",
         f"data.root={root}", "data.image_size=32", "data.num_workers=0", "trainer.max_epochs=2",
         f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "feature cache:" in output and "run finished" in output  # the cached, resident path, to its end
    assert not re.findall(r"^.*\b\w*Warning\b.*$", output, re.MULTILINE), output[-3000:]
