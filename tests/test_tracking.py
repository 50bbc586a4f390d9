"""Experiment tracking: wandb offline by default (run files written), TensorBoard and CSV available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.run.train import train


def test_wandb_runs_offline_without_api_key(tmp_path: Path, image_folder: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONWARNINGS="ignore", WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "wcache"),
               WANDB_CONFIG_DIR=str(tmp_path / "wconfig"), FINETUNE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "backbone.weights=none", "data=folder", f"data.root={image_folder}",
         "data.num_workers=0", "data.image_size=32", "trainer.max_epochs=1", "logger=wandb",
         "logger.wandb.group=my-sweep", "callbacks.progress_bar=none", f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "wandb should write an offline run (sync later with `wandb sync`)"
    assert list(runs[0].glob("run-*.wandb"))
    assert (runs[0] / "files" / "summary.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["test"]["acc"] > 0
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the CSV logger stays on beside wandb


@pytest.mark.usefixtures("one_torch_thread")
def test_tensorboard_logger_writes_events(compose_cfg, image_folder: Path) -> None:
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.num_workers=0",
                      "data.image_size=32", "trainer.max_epochs=1", "logger=tensorboard")
    train(cfg)
    events = list((Path(cfg.paths.output_dir) / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
