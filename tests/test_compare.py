"""compare reads a sweep's summary.json files into one CSV / Markdown / PNG; gaps show as '-'."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from finetune.cli.compare import (
    _DISPLAY,
    FIELDS,
    collect_summaries,
    main,
    override_words,
    print_comparison,
    shared_overrides,
    write_comparison,
)
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


# ----------------------------------------------------------------------------- console table

SHARED = "backbone.weights=none,data.image_size=32,trainer.max_epochs=1"


@pytest.fixture
def hydra_sweep(tmp_path: Path) -> Path:
    """Four jobs named the way conf/hydra/default.yaml names them: key=value,... in key order."""
    root = tmp_path / "multirun"
    jobs = [("resnet18", "feature_extractor", 0.9333), ("resnet18", "full_finetune", 0.9561),
            ("vgg16", "feature_extractor", 0.8812), ("vgg16", "partial_unfreeze", 0.9102)]
    for backbone, strategy, acc in jobs:
        summary = {**FULL, "backbone": backbone, "strategy": strategy, "weights": "none",
                   "test": {**FULL["test"], "acc": acc}}
        name = f"backbone.weights=none,backbone={backbone},data.image_size=32,strategy={strategy},trainer.max_epochs=1"
        _write(root, name, summary)
    return root


def _render(rows: list[dict], width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    print_comparison(rows, console)
    return console.export_text()


def test_override_words_split_hydra_folder_names() -> None:
    assert override_words("a=1,b=[2,3],+c.d=x") == ["a=1", "b=[2,3]", "+c.d=x"]
    assert override_words("a=x,y,b=2") == ["a=x,y", "b=2"]  # an unbracketed comma stays in its value
    assert override_words("3_partial") == ["3_partial"]
    assert override_words(".") == []


@pytest.mark.parametrize("width", [80, 120])
def test_console_table_fits_the_width_and_shows_numbers_in_full(hydra_sweep: Path, width: int) -> None:
    rows = collect_summaries(hydra_sweep)
    text = _render(rows, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(line for line in lines if len(line) > width)
    assert "…" not in text
    for number in ("93.33", "95.61", "88.12", "91.02", "91.50", "93.00"):  # top-1, mean per-class, best val in %
        assert number in text
    for name in ("resnet18", "vgg16", "feature_extractor", "full_finetune", "partial_unfreeze[2]"):
        assert name in text


def test_console_factors_shared_overrides_into_one_header_line(hydra_sweep: Path) -> None:
    rows = collect_summaries(hydra_sweep)
    assert shared_overrides(rows) == SHARED.split(",")
    text = _render(rows, 80)
    header = "all jobs: " + SHARED.replace(",", " ")
    assert text.splitlines()[0] == header
    for word in SHARED.split(","):
        assert text.count(word) == 1, word  # in the header line, in no row
    # backbone and strategy have their own columns, so the run column would repeat them: it is left out
    assert "backbone=resnet18" not in text and "strategy=" not in text


def test_console_run_column_shows_only_what_differs(tmp_path: Path) -> None:
    for lr in ("0.1", "0.001"):
        _write(tmp_path, f"backbone=resnet18,optimizer.lr={lr},trainer.max_epochs=30", FULL)
    text = _render(collect_summaries(tmp_path), 80)
    assert "all jobs: backbone=resnet18 trainer.max_epochs=30" in text
    body = [line for line in text.splitlines() if "optimizer.lr=" in line]
    assert len(body) == 2 and all("│" in line and "max_epochs" not in line for line in body)
    assert any("optimizer.lr=0.001" in line and "92.00" in line for line in body)


def test_console_drops_columns_at_80_not_squeezes_them(hydra_sweep: Path) -> None:
    rows = collect_summaries(hydra_sweep)
    narrow, wide = _render(rows, 80), _render(rows, 120)
    header = next(line for line in narrow.splitlines() if "top-1 %" in line)
    assert "mean cls %" in header and "best val %" in header  # whole headers, not letter columns
    assert "not shown at 80 columns" in narrow
    assert len(next(line for line in wide.splitlines() if "top-1 %" in line)) > len(header)


def test_cli_console_output_fits_80_columns_and_files_keep_every_column(
    hydra_sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main([str(hydra_sweep), f"out={tmp_path / 'cmp'}"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "93.33" in out and out.count("backbone.weights=none") == 1
    markdown = (tmp_path / "cmp" / "comparison.md").read_text()
    assert markdown.splitlines()[0] == "| " + " | ".join(_DISPLAY) + " |"
    assert sum("backbone.weights=none" in line for line in markdown.splitlines()) == 4  # full run names
    assert "0.9333" in markdown
    with (tmp_path / "cmp" / "comparison.csv").open(newline="") as handle:
        assert tuple(csv.DictReader(handle).fieldnames or ()) == FIELDS
