"""finetune.cli.report: counts that must match torchvision, files that must exist, errors that must be clear.

Everything runs offline on the CPU with weights=none, tiny images (32 px), batch 2 and one step;
the numbers themselves are not asserted except where they are exact (params) or stated by
torchvision (FLOPs at 224 px).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from finetune.cli.args import parse_args
from finetune.cli.report import (
    CPU_MEMORY_COLUMN,
    CUDA_MEMORY_COLUMN,
    ReportSettings,
    count_flops,
    display_columns,
    main,
    measure_backbone,
    meta_backbone,
    print_table,
    write_report,
)
from finetune.cli.report import FIXED_STRATEGIES as STRATEGY_NAMES
from finetune.errors import SetupError
from finetune.model.backbones import imagenet_meta

BACKBONES = ("resnet18", "vgg11")
TINY = {"batch_size": 2, "image_size": 32, "steps": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Measured once, no warm-up: an AdamW step over vgg11's 130M parameters takes seconds on a CPU.

    On one torch thread: at batch 2 and 32 px, a second thread costs more than it gives (2x on a busy 2-core
    machine); no assertion reads a speed.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [row for name in BACKBONES for row in measure_backbone(name, STRATEGY_NAMES, **TINY, warmup=0)]
    finally:
        torch.set_num_threads(threads)


def _row(rows: list[dict], backbone: str, strategy: str) -> dict:
    return next(r for r in rows if r["backbone"] == backbone and r["strategy"] == strategy)


@pytest.mark.parametrize("name", BACKBONES)
def test_counted_macs_match_torchvision_meta_at_224(name: str) -> None:
    """torchvision's `_ops` are multiply-adds at 224 px; ours omit only the dropped ImageNet classifier."""
    macs = count_flops(meta_backbone(name), 224) / 2
    stated = imagenet_meta(name)["gflops"] * 1e9
    assert macs == pytest.approx(stated, rel=0.05)


@pytest.mark.parametrize("name", BACKBONES)
def test_trainable_params_follow_the_strategy(rows: list[dict], name: str) -> None:
    frozen = _row(rows, name, "feature_extractor")
    partial = _row(rows, name, "partial_unfreeze")
    full = _row(rows, name, "full_finetune")
    assert frozen["trainable_params"] == 0
    assert 0 < partial["trainable_params"] < full["total_params"]
    assert full["trainable_params"] == full["total_params"]
    assert frozen["head_params"] == full["head_params"] > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_measurements_are_positive_and_memory_grows_with_what_trains(rows: list[dict], name: str) -> None:
    frozen = _row(rows, name, "feature_extractor")
    full = _row(rows, name, "full_finetune")
    for key in ("gflops", "weights_mb", "forward_img_s", "train_img_s"):
        assert full[key] > 0, key
    assert full["gmacs"] == pytest.approx(full["gflops"] / 2)
    # Training everything adds gradients and two AdamW moments per weight: far above the frozen copy.
    if full[CPU_MEMORY_COLUMN] is not None:  # None where /proc/self/clear_refs is not writable
        assert full[CPU_MEMORY_COLUMN] > 2 * frozen[CPU_MEMORY_COLUMN] > 0


def test_write_report_writes_every_file_with_one_csv_row_per_backbone_and_strategy(
    rows: list[dict], tmp_path: Path
) -> None:
    paths = write_report(rows, tmp_path / "out")
    assert set(paths) == {"csv", "markdown", "accuracy_vs_flops", "peak_memory"}
    with open(paths["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(BACKBONES) * len(STRATEGY_NAMES)
    assert {(r["backbone"], r["strategy"]) for r in table} == {(b, s) for b in BACKBONES for s in STRATEGY_NAMES}
    assert CPU_MEMORY_COLUMN in table[0]
    markdown = paths["markdown"].read_text()
    assert markdown.count("\n| vgg11 |") == len(STRATEGY_NAMES)
    assert "GMACs @32px" in markdown and "GMACs @224px" in markdown  # measured size and ImageNet's
    for kind in ("accuracy_vs_flops", "peak_memory"):
        assert paths[kind].read_bytes().startswith(b"\x89PNG")


def parse_overrides(tokens: list[str]) -> ReportSettings:
    return parse_args(ReportSettings, tokens, prog="python -m finetune.report")


def test_parse_overrides_reads_comma_lists_and_keeps_defaults() -> None:
    settings = parse_overrides(["backbone=[vgg11,resnet18,vgg11]", "steps=3", "out=elsewhere"])
    assert settings.backbone == ["vgg11", "resnet18"]
    assert parse_overrides(["backbone=vgg11,resnet18", "+strategy=full_finetune"]).backbone == ["vgg11", "resnet18"]
    assert settings.strategy == list(STRATEGY_NAMES)
    assert settings.steps == 3
    assert settings.weights == "none"
    assert str(settings.out) == "elsewhere"
    assert str(parse_overrides([]).out) == "outputs/report"  # the default stays out of a checkout (.gitignore)


@pytest.mark.parametrize(
    ("token", "named"),
    [
        ("colour=red", "batch_size"),
        ("strategy=freeze_all", "partial_unfreeze"),
        ("image_size=8", "32"),
        ("weights=/some/file.pth", "imagenet"),
    ],
)
def test_bad_overrides_say_what_is_valid(token: str, named: str) -> None:
    with pytest.raises(SetupError, match=named):
        parse_overrides([token])


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_runs_end_to_end_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    args = ["backbone=resnet18", "strategy=feature_extractor", "image_size=32", "batch_size=2", "steps=1"]
    assert main([*args, "warmup=0", f"out={tmp_path}"]) == 0
    assert (tmp_path / "report.csv").is_file()
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "resnet18" in out and "feature_extractor" in out and "…" not in out


# Two backbones x three strategies as a GPU would measure them: no measuring, exact numbers to look for.
FAKE = [
    {"backbone": backbone, "weights": "none", "device": "cuda:0 (NVIDIA H200)", "batch_size": 16, "image_size": 224,
     "total_params": total, "gflops": 2 * gmacs, "gmacs": gmacs, "imagenet_gmacs": gmacs, "weights_mb": mb,
     "forward_img_s": fwd, "imagenet_top1": top1, "imagenet_top5": top5, "strategy": strategy,
     "trainable_stages": "-", "trainable_params": total if trainable is None else trainable, "head_params": 5130,
     "train_img_s": speed, CUDA_MEMORY_COLUMN: memory}
    for backbone, total, gmacs, mb, fwd, top1, top5 in [
        ("vgg16", 134260544, 15.4700, 512.3, 812.34, 71.592, 90.382),
        ("resnet50", 23508032, 4.0890, 90.1, 2345.67, 76.13, 92.862),
    ]
    for strategy, trainable, speed, memory in [
        ("feature_extractor", 0, 2100.51, 812.4),
        ("partial_unfreeze", 15000000, 900.25, 3456.0),
        ("full_finetune", None, 312.5, 12345.0),
    ]
]


def _render(rows: list[dict], width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    print_table(rows, console)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120])
def test_console_table_fits_the_width_with_numbers_in_full(width: int) -> None:
    text = _render(FAKE, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), "\n".join(line for line in lines if len(line) > width)
    assert "…" not in text
    header = next(line for line in lines if "backbone" in line and "strategy" in line)
    for name in ("trainable M", "train img/s", "CUDA MB"):  # the key columns, whole headers
        assert name in header
    for number in ("0.005", "15.005", "134.266", "23.513", "2,100.5", "900.2", "12,345", "3,456"):
        assert number in text
    for name in ("vgg16", "resnet50", "feature_extractor", "partial_unfreeze", "full_finetune"):
        assert text.count(name) >= 2


def test_console_table_keeps_more_columns_when_wide_and_says_what_it_left_out() -> None:
    narrow, wide = _render(FAKE, 80), _render(FAKE, 120)
    assert "not shown at 80 columns" in narrow and "report.md" in narrow
    wide_header = next(line for line in wide.splitlines() if "backbone" in line and "strategy" in line)
    for name in ("params M", "GMACs", "fwd img/s"):
        assert name in wide_header
    for number in ("134.26", "23.51", "15.470", "4.089", "812.3", "2,345.7"):
        assert number in wide


def test_report_files_keep_every_column(tmp_path: Path) -> None:
    paths = write_report(FAKE, tmp_path)
    markdown = paths["markdown"].read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(header for header, _ in display_columns(FAKE)) + " |"
    assert "peak CUDA memory allocated (MB)" in markdown[0] and "ImageNet top-5" in markdown[0]
    assert sum(line.startswith("| vgg16 |") for line in markdown) == 3
    with open(paths["csv"], newline="") as handle:
        reader = csv.DictReader(handle)
        assert list(reader.fieldnames or ()) == list(FAKE[0])
        assert len(list(reader)) == len(FAKE)


def test_cli_unknown_backbone_exits_2_naming_the_choices(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.report", "backbone=vgg17", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "vgg17" in result.stderr
    assert "vgg19" in result.stderr and "families:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
