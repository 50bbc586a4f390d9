"""Lightning DDP with 2 CPU processes (gloo): same accuracy as one process, one summary, sharded cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_image_folder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _start(root: Path, run_dir: Path, cache: Path, *extra: str, backbone: tuple[str, ...] = ("backbone=resnet18",)
           ) -> subprocess.Popen:
    with open(run_dir.with_suffix(".stderr"), "w") as log:  # beside run_dir; a file, not a pipe: read at the end
        return subprocess.Popen(
            [sys.executable, "-m", "finetune", *backbone, "backbone.weights=none", "data=folder",
             f"data.root={root}", "data.image_size=32", "data.num_workers=0", "trainer.max_epochs=4",
             "trainer.accelerator=cpu", "callbacks.progress_bar=none", "optimizer.lr=1e-2", f"cache.dir={cache}",
             f"hydra.run.dir={run_dir}", *extra],
            env=ENV, stdout=subprocess.DEVNULL, stderr=log,
        )


def _summary(proc: subprocess.Popen, run_dir: Path) -> dict:
    assert proc.wait(timeout=600) == 0, run_dir.with_suffix(".stderr").read_text()[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("strategy", ["feature_extractor", "partial_unfreeze"])
def test_ddp_two_cpu_processes_match_single_process(tmp_path: Path, strategy: str) -> None:
    root = write_image_folder(tmp_path / "images", classes=4, per_class=16)
    extra = (f"strategy={strategy}", "strategy.unfreeze_last=1", "data.augment=false")
    # Both at once: the DDP ranks wait on each other (gloo) much of the time, and the runs share no files.
    ddp_proc = _start(root, tmp_path / "ddp", tmp_path / "cache2", *extra, "data.batch_size=4", "trainer=ddp",
                      "trainer.devices=2", "trainer.accelerator=cpu")
    try:
        single = _summary(_start(root, tmp_path / "single", tmp_path / "cache1", *extra, "data.batch_size=8"),
                          tmp_path / "single")
        ddp = _summary(ddp_proc, tmp_path / "ddp")
    finally:
        if ddp_proc.poll() is None:
            ddp_proc.kill()
            ddp_proc.wait()
    assert abs(ddp["test"]["acc"] - single["test"]["acc"]) <= 0.15
    assert ddp["test"]["acc"] > 0.5
    assert ddp["epochs_run"] == single["epochs_run"] == 4
    folder = Path(ddp["feature_cache"])
    assert {p.name for p in folder.glob("train.*of2.features.npy")} == {"train.0of2.features.npy",
                                                                       "train.1of2.features.npy"}
    assert len(list((tmp_path / "ddp").rglob("summary.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [("backbone=mobilenet_v3_small",), ("backbone=timm", "backbone.name=resnet10t"),
                                      ("backbone=timm", "backbone.name=vit_tiny_patch16_224")],
                         ids=["mobilenet_v3_small", "timm-resnet10t", "timm-vit_tiny"])
def test_ddp_trains_other_families_with_gradual_unfreezing(tmp_path: Path, backbone: tuple[str, ...]) -> None:
    """Beyond ResNet: 2 gloo processes, stages unfreezing at epoch 1 (the model re-wrapped), one summary."""
    if "backbone=timm" in backbone:
        pytest.importorskip("timm")
    root = write_image_folder(tmp_path / "images", classes=4, per_class=16)
    run_dir = tmp_path / "ddp"
    proc = _start(root, run_dir, tmp_path / "cache", "strategy=gradual_unfreeze", "strategy.milestones=[1,2]",
                  "data.augment=false", "data.batch_size=4", "trainer.max_epochs=3", "trainer=ddp", "trainer.devices=2",
                  "trainer.accelerator=cpu", backbone=backbone)
    try:
        summary = _summary(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert summary["epochs_run"] == 3 and summary["test"]["acc"] >= 0.0
    assert [event["epoch"] for event in summary["unfreeze_events"]][-2:] == [1, 2]
    assert len(list(run_dir.rglob("summary.json"))) == 1
