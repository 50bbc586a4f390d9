"""What a person sees while phases run: progress lines, epoch-bar metrics that fit, a truthful model summary."""

from __future__ import annotations

import logging

import pytest
import torch

import finetune.progress as progress_module
from finetune.model.module import FinetuneModule
from finetune.progress import counted, interim_text, progress, rate_text, set_style
from finetune.run.bars import RICH_BAR_COLUMNS, short_metrics
from finetune.run.model_summary import stage_rows, summary_text


@pytest.fixture(autouse=True)
def _plain_style():
    set_style("rich")  # no terminal under pytest: log lines, never a bar
    yield
    set_style("rich")


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "finetune.progress"]


def test_a_phase_ends_with_count_time_and_rate(caplog) -> None:
    caplog.set_level(logging.INFO, logger="finetune.progress")
    with progress("extracting train features", 100) as advance:
        for _ in range(4):
            advance(25)
    (line,) = progress_lines(caplog)
    assert line.startswith("extracting train features: 100 images in ")
    assert "images/s" in line


def test_without_a_terminal_interim_lines_say_count_rate_and_time_left(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="finetune.progress")
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.0)
    with progress("checking images", 10) as advance:
        advance(5)
    lines = progress_lines(caplog)
    assert lines[0].startswith("checking images: 5/10 images") and "s left" in lines[0]
    assert len(lines) == 2  # the interim line and the closing one
    assert interim_text("x", 5, 10, 1.0, "images") == "x: 5/10 images (5 images/s, about 1 s left)"
    assert rate_text(4576, 9.1, "images") == "4,576 images in 9.1 s (503 images/s)"


def test_style_none_keeps_the_closing_line_only(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="finetune.progress")
    monkeypatch.setenv("FINETUNE_PROGRESS_EVERY_S", "0")
    set_style("none")
    with progress("predicting", 3) as advance:
        advance(1)
        advance(2)
    assert len(progress_lines(caplog)) == 1


def test_only_rank_zero_reports_and_a_failed_phase_claims_nothing(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="finetune.progress")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with progress("extracting val features", 2) as advance:
        advance(2)
    assert progress_lines(caplog) == []
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(RuntimeError), progress("extracting test features", 2) as advance:
        advance(1)
        raise RuntimeError("disk full")
    assert progress_lines(caplog) == []


def test_counted_opens_at_the_first_report_only(caplog) -> None:
    caplog.set_level(logging.INFO, logger="finetune.progress")
    with counted("checking images"):
        pass  # every file known from an earlier check: nothing to say
    assert progress_lines(caplog) == []
    with counted("checking images") as report:
        for done in range(1, 8):
            report(done, 7)
    assert progress_lines(caplog)[0].startswith("checking images: 7 images in ")


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="rich, tqdm, none"):
        set_style("fancy")


def test_bar_metrics_are_short_fixed_precision_and_fit_the_width() -> None:
    items = {"v_num": 3, "loss": torch.tensor(2.23456), "train/loss_epoch": 2.1, "val/acc": 0.678571403,
             "val/mean_class_acc": 0.66, "val/f1_macro": 0.6, "val/top5": 0.99, "custom/thing": 1.0}
    shown = short_metrics(items, width=200)
    assert list(shown)[:4] == ["loss", "val_acc", "val_mca", "train_loss"]
    assert shown["val_acc"] == "0.679" and "v_num" not in shown and "custom_thing" in shown
    narrow = short_metrics(items, width=80 - RICH_BAR_COLUMNS)
    assert sum(len(k) + len(v) + 3 for k, v in narrow.items()) <= 80 - RICH_BAR_COLUMNS
    assert list(narrow) == ["loss", "val_acc"]  # the first to stay at 80 columns
    assert short_metrics(items, width=0) == {}


def test_model_summary_counts_a_cached_prefix_and_says_so() -> None:
    """Lightning's summary showed 0 params for a cached backbone; this one counts every stage."""
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="feature_extractor")
    total = sum(p.numel() for p in module.parameters())
    module.input_stage = module.cacheable_prefix
    module.detach_frozen_prefix()
    assert sum(p.numel() for p in module.parameters()) == 1539  # what Lightning would count: the head only
    rows = stage_rows(module)
    assert sum(n for _, n, _ in rows) == total
    assert [state for _, _, state in rows] == ["frozen · cached"] * 5 + ["trains"]
    text = summary_text(module)
    assert "total 11.18 M, trainable 1,539" in text and "cached 11.18 M" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_model_summary_names_when_frozen_stages_start_training() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="gradual_unfreeze",
                            milestones=[1, 2])
    states = dict((name, state) for name, _, state in stage_rows(module))
    assert states["layer4"] == "frozen · trains from epoch 1" and states["layer3"] == "frozen · trains from epoch 2"
    assert states["stem"] == "frozen"
