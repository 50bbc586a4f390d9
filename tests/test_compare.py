"""compare reads a sweep's summary.json files into one CSV / Markdown / PNG; gaps show as '-'."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli.compare import FIELDS, collect_summaries, main, write_comparison
from finetune.errors import SetupError

FULL = {
    "backbone": "resnet18",
    "weights": "imagenet",
    "strategy": "partial_unfreeze",
    "unfreeze_last": 2,
    "trainable_stages": ["layer3", "layer4"],
    "dataset": "digits",
    "num_classes": 10,
    "image_size": 64,
    "params_total": 11181642,
    "params_trainable": 8398858,
    "epochs_run": 2,
    "global_steps": 40,
    "monitor": "val/acc",
    "best_val_metric": 0.93,
    "best_checkpoint": "checkpoints/best.ckpt",
    "test": {"acc": 0.92, "top5": 0.99, "mean_class_acc": 0.915, "f1_macro": 0.91, "loss": 0.3},
    "wall_seconds": {"feature_extraction": 1.2, "training": 30.5, "test": 1.0, "total": 35.0},
    "peak_memory": {"cpu_rss_bytes": 1234, "cuda_max_allocated_bytes": None},
    "device": "cpu",
    "seed": 42,
}


def _write(root: Path, subdir: str, summary: dict) -> None:
    job = root / subdir
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three jobs as Hydra lays them out (numbered subdirs), one with missing sections."""
    root = tmp_path / "multirun"
    vgg = {**FULL, "backbone": "vgg16", "strategy": "feature_extractor", "unfreeze_last": 0}
    vgg["test"] = {**FULL["test"], "acc": 0.81}
    _write(root, "10_backbone=vgg16", vgg)
    _write(root, "2_backbone=resnet18", FULL)
    _write(root, "3_partial", {"backbone": "resnet50", "strategy": "full_finetune", "test": {"acc": 0.5}})
    (root / ".submitit").mkdir()  # other sweep files are ignored
    (root / ".submitit" / "log.out").write_text("x")
    return root


def test_collect_reads_every_job_in_hydra_order(sweep: Path) -> None:
    rows = collect_summaries(sweep)
    assert [r["run"] for r in rows] == ["2_backbone=resnet18", "3_partial", "10_backbone=vgg16"]
    first = rows[0]
    assert first["test_acc"] == 0.92
    assert first["wall_feature_extraction_s"] == 1.2
    assert first["peak_cuda_bytes"] is None
    partial = rows[1]
    assert partial["test_acc"] == 0.5
    assert partial["test_top5"] is None and partial["params_total"] is None


def test_write_comparison_files_and_csv_values(sweep: Path, tmp_path: Path) -> None:
    paths = write_comparison(collect_summaries(sweep), tmp_path / "out")
    assert set(paths) == {"csv", "md", "png"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with paths["csv"].open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == FIELDS
        rows = list(reader)
    assert len(rows) == 3
    assert rows[0]["backbone"] == "resnet18"
    assert float(rows[0]["test_acc"]) == pytest.approx(0.92)
    assert int(rows[0]["params_trainable"]) == 8398858
    assert float(rows[0]["wall_total_s"]) == pytest.approx(35.0)
    assert rows[1]["test_top5"] == ""  # missing stays empty so pandas reads NaN
    assert rows[2]["backbone"] == "vgg16" and float(rows[2]["test_acc"]) == pytest.approx(0.81)

    markdown = paths["md"].read_text()
    partial_line = next(line for line in markdown.splitlines() if "3_partial" in line)
    assert "| - |" in partial_line
    assert "0.9200" in markdown


def test_unreadable_summary_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path, "0_ok", FULL)
    (tmp_path / "1_bad").mkdir()
    (tmp_path / "1_bad" / "summary.json").write_text("{not json")
    assert [r["run"] for r in collect_summaries(tmp_path)] == ["0_ok"]


def test_out_option_and_missing_dir(sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweep), f"out={tmp_path / 'cmp'}"]) == 0
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
    assert main([str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SetupError):
        collect_summaries(tmp_path / "nowhere")


def test_cli_empty_dir_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.compare", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "summary.json" in result.stderr
    assert "Traceback" not in result.stderr
