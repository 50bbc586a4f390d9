"""finetune.cli.report: counts that must match torchvision, files that must exist, errors that must be clear.

Everything runs offline on the CPU with weights=none, tiny images (32 px), batch 2 and one step;
the numbers themselves are not asserted except where they are exact (params) or stated by
torchvision (FLOPs at 224 px).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli.args import parse_args
from finetune.cli.report import (
    CPU_MEMORY_COLUMN,
    ReportSettings,
    count_flops,
    main,
    measure_backbone,
    meta_backbone,
    write_report,
)
from finetune.cli.report import FIXED_STRATEGIES as STRATEGY_NAMES
from finetune.errors import SetupError
from finetune.model.backbones import BACKBONE_NAMES, imagenet_meta

BACKBONES = ("resnet18", "vgg11")
TINY = {"batch_size": 2, "image_size": 32, "steps": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Measured once, no warm-up: an AdamW step over vgg11's 130M parameters takes seconds on a CPU."""
    return [row for name in BACKBONES for row in measure_backbone(name, STRATEGY_NAMES, **TINY, warmup=0)]


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


def test_cli_runs_end_to_end_in_process(tmp_path: Path) -> None:
    args = ["backbone=resnet18", "strategy=feature_extractor", "image_size=32", "batch_size=2", "steps=1"]
    assert main([*args, "warmup=0", f"out={tmp_path}"]) == 0
    assert (tmp_path / "report.csv").is_file()


def test_cli_unknown_backbone_exits_2_naming_the_choices(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.report", "backbone=vgg17", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "vgg17" in result.stderr
    assert all(name in result.stderr for name in BACKBONE_NAMES)
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
