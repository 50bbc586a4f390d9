"""Sweeps: a -m grid makes one run directory per job, resumes without redoing jobs, and compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_image_folder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# a tiny image folder, not the default digits (1,797 images): what is checked is the sweep's bookkeeping
TINY = ["backbone=resnet18", "backbone.weights=none", "data=folder", "data.image_size=32", "data.augment=false",
        "data.num_workers=0", "trainer.max_epochs=1", "callbacks.progress_bar=none", "logger=none"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("sweep-data") / "images", classes=3, per_class=12)


def _multirun(sweep_dir: Path, cache: Path, images: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "finetune", "-m", *TINY, f"data.root={images}",
                           f"cache.dir={cache}", f"hydra.sweep.dir={sweep_dir}", *args], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_grid_sweep_resume_and_compare(tmp_path: Path, images: Path) -> None:
    sweep = tmp_path / "multirun"
    _multirun(sweep, tmp_path / "cache", images, "strategy=feature_extractor,linear_probe")
    summaries = sorted(sweep.rglob("summary.json"))
    assert len(summaries) == 2
    first = {p.parent.name: json.loads(p.read_text()) for p in summaries}
    assert {s["strategy"] for s in first.values()} == {"feature_extractor", "linear_probe"}
    # both jobs share one feature cache (same backbone, weights, transform, data)
    assert len({s["feature_cache"] for s in first.values()}) == 1

    # extend the grid and resume: finished jobs are skipped, the new one runs
    _multirun(sweep, tmp_path / "cache", images, "strategy=feature_extractor,linear_probe,partial_unfreeze",
              "resume=auto")
    after = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("summary.json")}
    assert len(after) == 3
    for name, summary in first.items():
        assert after[name]["finished_at"] == summary["finished_at"], f"{name} was redone"

    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "finetune.compare", str(sweep), f"out={out}"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "comparison.csv").read_text().strip().splitlines()) == 4


def test_optuna_search_runs_trials_and_reports_best(tmp_path: Path, images: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    _multirun(sweep, tmp_path / "cache", images, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
              "hydra.sweeper.sampler.n_startup_trials=1", "strategy=feature_extractor")
    result = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in result and "optimizer.lr" in result
    assert len(list(sweep.rglob("summary.json"))) == 2
