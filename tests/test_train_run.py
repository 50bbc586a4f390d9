"""End-to-end: `python -m finetune` as users run it, on tiny data the test writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.run.train import train

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_cli_run_on_folder_writes_checkpoint_and_consistent_summary(tmp_path: Path, image_folder: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run_cli(
        ["backbone=resnet18", "backbone.weights=none", "strategy=partial_unfreeze", "strategy.unfreeze_last=1",
         "data=folder", f"data.root={image_folder}", "data.image_size=32", "data.batch_size=8",
         "data.num_workers=0", "trainer.max_epochs=2", "trainer.accelerator=cpu", "callbacks.progress_bar=none",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "confusion_matrix.png").stat().st_size > 1000
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert OmegaConf.load(summary["config_path"]).backbone.name == "resnet18"

    rows = _read_metrics(run_dir)
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert summary["epochs_run"] == 2 == len(val)
    assert summary["best_val_metric"] == pytest.approx(max(val), abs=1e-6)
    test_rows = [r for r in rows if r.get("test/acc")]
    assert summary["test"]["acc"] == pytest.approx(float(test_rows[-1]["test/acc"]), abs=1e-6)
    for key in ("acc", "mean_class_acc", "f1_macro", "loss"):
        assert key in summary["test"]
    assert "top5" not in summary["test"]  # 3 classes: top-5 is meaningless
    assert summary["num_classes"] == 3 and summary["dataset"] == "folder"
    assert summary["trainable_stages"] == ["layer4"]
    assert 0 < summary["params_trainable"] < summary["params_total"]
    assert summary["wall_seconds"]["total"] >= summary["wall_seconds"]["training"] > 0
    assert summary["peak_memory"]["cpu_rss_bytes"] > 0
    assert summary["device"] == "cpu"


@pytest.mark.usefixtures("one_torch_thread")
def test_digits_default_run_learns(compose_cfg) -> None:
    """The main job on the defaults (digits) composes and learns far above chance (10%)."""
    cfg = compose_cfg("backbone.weights=none", "strategy=partial_unfreeze", "trainer.max_epochs=1",
                      "data.image_size=32", "logger=none", "trainer.enable_model_summary=false")
    summary = train(cfg)
    assert summary["test"]["acc"] > 0.5
    assert summary["test"]["top5"] >= summary["test"]["acc"]


def test_bad_files_are_skipped_and_listed(compose_cfg, image_folder: Path) -> None:
    (image_folder / "class_0" / "broken.jpg").write_bytes(b"")  # zero-byte
    good = image_folder / "class_1" / "img_001.jpg"
    (image_folder / "class_1" / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
                      "data.num_workers=0", "trainer.max_epochs=1", "logger=none")
    summary = train(cfg)
    listed = (Path(cfg.paths.output_dir) / "bad_files.txt").read_text()
    assert "broken.jpg" in listed and "truncated.jpg" in listed
    assert sum(summary["split_sizes"].values()) == 36  # 38 files, 2 skipped


def test_bad_files_with_error_policy_stop_before_training(compose_cfg, image_folder: Path) -> None:
    from finetune.errors import SetupError

    (image_folder / "class_2" / "notes.jpg").write_text("not an image")
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}",
                      "data.on_bad_image=error", "logger=none")
    with pytest.raises(SetupError, match="on_bad_image=skip"):
        train(cfg)
    assert "notes.jpg" in (Path(cfg.paths.output_dir) / "bad_files.txt").read_text()
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_help_lists_groups_and_choices(tmp_path: Path) -> None:
    proc = _run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for line in ("backbone:", "strategy:", "data:", "vgg19_bn", "partial_unfreeze", "flowers102"):
        assert line in proc.stdout


def test_offline_dataset_download_is_a_short_error(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    """No network and no files: exit-2 style SetupError naming the files and the folder, before training."""
    import torchvision.datasets.utils as tv_utils

    from finetune.data.datasets import load_splits
    from finetune.errors import SetupError

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download (offline)")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    cfg = compose_cfg("data=flowers102", f"data.root={tmp_path / 'data'}")
    with pytest.raises(SetupError) as info:
        load_splits(cfg.data)
    message = str(info.value)
    assert "102flowers.tgz" in message and str(tmp_path / "data" / "flowers-102") in message
    assert "data=digits" in message


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
                                      "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_every_backbone_trains_at_tiny_size(compose_cfg, backbone: str) -> None:
    summary = train(compose_cfg(f"backbone={backbone}", "backbone.weights=none", "strategy=partial_unfreeze",
                                "strategy.unfreeze_last=1", "data.image_size=32", "trainer.max_epochs=1",
                                "logger=none", "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2"))
    assert summary["backbone"] == backbone and 0.0 <= summary["test"]["acc"] <= 1.0


def test_tf32_switch_sets_torch_precision_and_refuses_other_values(compose_cfg) -> None:
    import torch

    from finetune.config.typed import to_typed
    from finetune.errors import SetupError
    from finetune.run.builders import apply_tf32

    def state() -> tuple[bool, str]:
        # Lightning reads get_float32_matmul_precision() on CUDA set-up: it must not raise afterwards
        return torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()

    try:
        apply_tf32(False)
        assert state() == (False, "highest")
        apply_tf32(True)
        assert state() == (True, "high")
        apply_tf32("auto")  # PyTorch's defaults again: a later job of a sweep does not inherit
        assert state() == (True, "highest")
        with pytest.raises(SetupError, match=r"speed\.tf32"):
            to_typed(compose_cfg("speed.tf32=fast"))
    finally:
        apply_tf32("auto")
