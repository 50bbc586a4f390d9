"""Measured cost of each backbone under each strategy: params, FLOPs, size, memory and speed.

torchvision's weights meta states params, GFLOPs and ImageNet accuracy; what it cannot state is
what a backbone costs on *this* machine at *your* batch size and resolution, nor how much a
strategy saves. This module measures that and sets it next to the stated ImageNet accuracy.

    python -m finetune.report backbone=vgg16,resnet50 strategy=feature_extractor,full_finetune

The measuring API (``measure_backbone``, ``write_report``) is plain functions, so a notebook can
call it without the command line.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune import config_dir
from finetune.cli.args import run_command
from finetune.cli.compare import ConsoleColumn, fit_table, print_lines
from finetune.config.problems import ConfigProblem
from finetune.config.schema import Choice, StrategyName, at_least
from finetune.errors import SetupError
from finetune.model.backbones import (
    Backbone,
    build_backbone,
    check_image_size,
    check_name,
    empty_backbone,
    imagenet_meta,
    preprocessing_for,
)
from finetune.model.strategies import (
    STRATEGY_NAMES,
    count_params,
    freeze_stages,
    param_groups,
    trainable_at,
    unfreeze_schedule,
)

NUM_CLASSES = 10
MIN_IMAGE_SIZE = 32  # most CNNs downsample 5 times; per-model limits: backbones.check_image_size

# What each memory column measures: the name must say it, since the two are not comparable.
CUDA_MEMORY_COLUMN = "train_peak_cuda_alloc_mb"
CPU_MEMORY_COLUMN = "train_peak_rss_delta_mb"
MEMORY_COLUMNS = (CUDA_MEMORY_COLUMN, CPU_MEMORY_COLUMN)
MEMORY_LABELS = {
    CUDA_MEMORY_COLUMN: "peak CUDA memory allocated (MB)",
    CPU_MEMORY_COLUMN: "peak RSS growth of the process (MB)",
}
MEMORY_NOTES = {
    CUDA_MEMORY_COLUMN: "torch.cuda.max_memory_allocated above the level before the strategy's copy "
    "of the model was made: weights, gradients, AdamW state and activations; not the CUDA context "
    "nor the caching allocator's unused reserve.",
    CPU_MEMORY_COLUMN: "peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the RSS "
    "before the strategy's copy of the model was made: weights, gradients, AdamW state, activations "
    "and allocator overhead, as the OS sees it.",
}


# ---------------------------------------------------------------------------------------------
# Command line: key=value words, comma lists, parsed by finetune.cli.args like the other commands.
# ---------------------------------------------------------------------------------------------


# What the report measures by default: the three fixed strategies of the study.
FIXED_STRATEGIES = ("feature_extractor", "partial_unfreeze", "full_finetune")
PROG = "python -m finetune.report"


class ReportWeights(Choice):
    none = "none"
    imagenet = "imagenet"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ReportSettings:
    """Everything one report run needs; the defaults are what ``python -m finetune.report`` uses."""

    backbone: list[str] = field(default_factory=lambda: ["vgg16", "resnet50"], metadata={
        "doc": "backbones to measure, comma-separated: any torchvision classifier (conf/backbone/ lists them, "
               "e.g. vgg16,resnet50,convnext_tiny,efficientnet_b0,vit_b_16)", "metavar": "NAME[,...]"})
    strategy: list[StrategyName] = field(default_factory=lambda: [StrategyName(s) for s in FIXED_STRATEGIES],
                                         metadata={"doc": "strategies to measure, comma-separated: "
                                                   + ", ".join(STRATEGY_NAMES), "metavar": "NAME[,...]"})
    batch_size: int = field(default=16, metadata={"doc": "images per step"})
    image_size: int = field(default=224, metadata={"doc": f"square input size in pixels, >= {MIN_IMAGE_SIZE}"})
    steps: int = field(default=5, metadata={"doc": "timed steps per measurement"})
    warmup: int = field(default=2, metadata={"doc": "untimed steps before them (allocator, cuDNN autotune)"})
    weights: ReportWeights = field(default=ReportWeights.none, metadata={
        "doc": "none: random init, no download (weights change neither FLOPs, speed nor memory)"})
    device: str = field(default_factory=_default_device, metadata={
        "doc": "cpu, cuda or cuda:N (by default cuda when PyTorch sees a GPU)", "metavar": "cpu|cuda|cuda:N"})
    out: Path = field(default=Path("outputs/report"), metadata={"doc": "folder for report.csv, report.md and the "
                                                                      "plots"})

    def __post_init__(self) -> None:
        """``a,b,a`` measures a and b once each, in the order given."""
        self.backbone = list(dict.fromkeys(self.backbone))
        self.strategy = list(dict.fromkeys(self.strategy))

    def validate(self) -> None:
        if not self.backbone:
            raise ConfigProblem("backbone", "", "is empty", "e.g. backbone=vgg16,resnet50 (conf/backbone/ lists them).")
        for name in self.backbone:
            check_name(name)
            check_image_size(name, self.image_size)
        if not self.strategy:
            raise ConfigProblem("strategy", "", "is empty", f"choose from {', '.join(STRATEGY_NAMES)}.")
        at_least("batch_size", self.batch_size, 1, "e.g. batch_size=8.")
        at_least("image_size", self.image_size, MIN_IMAGE_SIZE, "five stride-2 steps: smaller inputs vanish.")
        at_least("steps", self.steps, 1, "e.g. steps=5.")
        at_least("warmup", self.warmup, 0, "0: time from the first step.")
        _check_device(self.device)


def _check_device(value: str) -> str:
    """Fail before measuring anything if the device cannot be used here."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise SetupError(f"device={value} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise SetupError(f"device={value} is not supported by the report; use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device={value} was asked for, but PyTorch sees no CUDA GPU here; use device=cpu.")
    return value


def _check_strategies(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown or not names:
        raise SetupError(
            f"Unknown strategy '{','.join(unknown)}'. Choose from: {', '.join(STRATEGY_NAMES)} "
            f"(comma-separated, e.g. strategy=feature_extractor,full_finetune)."
        )
    return names


# ---------------------------------------------------------------------------------------------
# Measurements. Each is a small function so a notebook or a benchmark script can reuse one alone.
# ---------------------------------------------------------------------------------------------


def _conf(group: str, name: str) -> dict[str, Any]:
    """One option of one config group, read from conf/ so the report measures what users run."""
    path = config_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise SetupError(f"No config '{group}/{name}.yaml' in {config_dir()}; reinstall the package.")
    return OmegaConf.to_container(OmegaConf.load(path))


def strategy_settings(strategy: str) -> dict[str, Any]:
    """unfreeze_last, milestones, freeze_epochs and backbone_lr_ratio as conf/strategy/ sets them."""
    cfg = _conf("strategy", strategy)
    return {"unfreeze_last": cfg.get("unfreeze_last"), "backbone_lr_ratio": float(cfg["backbone_lr_ratio"]),
            "milestones": list(cfg.get("milestones") or []) or None, "freeze_epochs": cfg.get("freeze_epochs")}


def final_trainable(stage_names: list[str], strategy: str, settings: dict[str, Any]) -> list[str]:
    """Stages that train once every scheduled unfreezing has happened (the most a strategy costs)."""
    schedule = unfreeze_schedule(stage_names, strategy, settings["unfreeze_last"], settings["milestones"],
                                 settings["freeze_epochs"])
    return trainable_at(schedule, schedule[-1][0])


def make_optimizer(backbone: Backbone, head: nn.Module, backbone_lr_ratio: float) -> torch.optim.Optimizer:
    """AdamW with the param groups and settings of conf/optimizer/adamw.yaml, as training builds it."""
    cfg = _conf("optimizer", "adamw")
    groups = param_groups(
        backbone,
        head,
        float(cfg["lr"]),
        float(cfg.get("weight_decay", 0.0)),
        backbone_lr_ratio,
        bool(cfg.get("no_decay_norm_bias", True)),
    )
    return torch.optim.AdamW(groups)


def count_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass of one image (a multiply-add counts 2), counted by PyTorch itself.

    Works on a model on the meta device, which costs neither memory nor compute.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def meta_backbone(name: str, image_size: int | None = None) -> Backbone:
    """The backbone's structure without storage, built for ``image_size``: for FLOP counting, instantly."""
    return empty_backbone(name, image_size)


def weights_file_mb(model: nn.Module) -> float:
    """Size of the saved state_dict on disk, measured by saving it, so format overhead counts."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.pth"
        torch.save(model.state_dict(), path)
        return path.stat().st_size / 2**20


def _sync(device: torch.device) -> None:
    """GPU work is asynchronous; time only after it has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(step: Callable[[], None], batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    """Warm-up steps first (allocator, cuDNN autotune, lazy optimizer state), then timed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def forward_images_per_s(
    backbone: nn.Module, batch_size: int, image_size: int, steps: int, warmup: int, device: torch.device
) -> float:
    """Inference throughput: eval mode, no autograd, the backbone's pooled features only."""
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    backbone.eval()

    def step() -> None:
        with torch.inference_mode():
            backbone(x)

    return _images_per_s(step, batch_size, steps, warmup, device)


def train_images_per_s(
    backbone: Backbone,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    image_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> float:
    """Training throughput: forward, loss, backward and optimizer step, frozen stages without grad."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)
    backbone.train()
    head.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(backbone(x)), y).backward()
        optimizer.step()

    return _images_per_s(step, batch_size, steps, warmup, device)


def memory_column(device: torch.device | str) -> str:
    """The memory column's name says what was measured, since CUDA and CPU numbers differ in kind."""
    return CUDA_MEMORY_COLUMN if torch.device(device).type == "cuda" else CPU_MEMORY_COLUMN


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _return_freed_memory() -> None:
    """Give freed heap back to the OS so the next baseline is not inflated by the last block."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the baseline is a little higher
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of the block above the level at its start, in MB (``None`` where unmeasurable).

    CUDA: max_memory_allocated. CPU: the kernel's peak-RSS mark (VmHWM), reset at entry by writing
    5 to /proc/self/clear_refs (Linux), so blocks in one process do not see each other's peaks.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: float | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        _return_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            self._start = _proc_status_kb("VmRSS") * 1024
        except OSError:
            self._start = -1  # no /proc or not allowed: report nothing rather than a wrong number
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self._start >= 0:
            self.mb = (_proc_status_kb("VmHWM") * 1024 - self._start) / 2**20


def device_label(device: torch.device) -> str:
    """Which hardware produced the numbers; speed means nothing without it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _measure_strategy(
    template: Backbone,
    strategy: str,
    batch_size: int,
    image_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, Any]:
    """One strategy on a fresh copy of the backbone: trainable params, training speed and memory."""
    settings = strategy_settings(strategy)
    with PeakMemory(device) as memory:
        backbone = copy.deepcopy(template)
        trainable = final_trainable(backbone.stage_names, strategy, settings)
        freeze_stages(backbone, trainable)
        head = nn.Linear(backbone.feature_dim, NUM_CLASSES).to(device)
        optimizer = make_optimizer(backbone, head, settings["backbone_lr_ratio"])
        train_speed = train_images_per_s(backbone, head, optimizer, batch_size, image_size, steps, warmup, device)
        trainable_params = count_params(backbone, trainable_only=True)
        head_params = count_params(head)
        del backbone, head, optimizer
    return {
        "strategy": strategy,
        "trainable_stages": ",".join(trainable) or "-",
        "trainable_params": trainable_params,
        "head_params": head_params,
        "train_img_s": round(train_speed, 2),
        memory_column(device): None if memory.mb is None else round(memory.mb, 1),
    }


def measure_backbone(
    name: str,
    strategies: Sequence[str],
    batch_size: int,
    image_size: int,
    steps: int,
    device: torch.device | str,
    *,
    weights: str = "none",
    warmup: int = 1,
    on_progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per strategy for backbone ``name``, measured on ``device`` with synthetic images.

    Weights default to 'none' because they change neither FLOPs, speed nor memory, and random
    init needs no download. ``on_progress`` is called after each finished part (for a progress bar).
    """
    check_name(name)
    _check_strategies(tuple(strategies))
    device = torch.device(device)
    done = on_progress or (lambda _: None)
    template = build_backbone(name, weights=weights, image_size=image_size).to(device)
    structure = meta_backbone(name, image_size)
    flops = count_flops(structure, image_size)
    crop = preprocessing_for(name).crop_size
    meta = imagenet_meta(name)
    common = {
        "backbone": name,
        "weights": weights,
        "device": device_label(device),
        "batch_size": batch_size,
        "image_size": image_size,
        "total_params": count_params(template),
        # torchvision's count with the ImageNet classifier: the study's 138.4 M (VGG-16) vs 25.6 M (ResNet-50)
        "imagenet_params": meta["num_params"],
        "gflops": round(flops / 1e9, 4),
        "gmacs": round(flops / 2e9, 4),
        "imagenet_gmacs": round(count_flops(meta_backbone(name, crop), crop) / 2e9, 4),
        "weights_mb": round(weights_file_mb(template), 2),
        "forward_img_s": round(forward_images_per_s(template, batch_size, image_size, steps, warmup, device), 2),
        "imagenet_top1": meta["imagenet_top1"],
        "imagenet_top5": meta["imagenet_top5"],
    }
    done(f"{name}: FLOPs, size, forward")
    rows = []
    for strategy in strategies:
        measured = _measure_strategy(template, strategy, batch_size, image_size, steps, warmup, device)
        rows.append({**common, **measured})
        done(f"{name}: {strategy}")
    return rows


# ---------------------------------------------------------------------------------------------
# Output: CSV (every column), Markdown and the screen table (readable columns), two plots.
# ---------------------------------------------------------------------------------------------


def _memory_key(rows: Sequence[dict[str, Any]]) -> str:
    """The memory column these rows carry (one report is measured on one device)."""
    for key in MEMORY_COLUMNS:
        if any(key in row for row in rows):
            return key
    return CPU_MEMORY_COLUMN


def _per_million(value: Any) -> float | None:
    return None if value is None else value / 1e6


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def display_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """Header and formatter of each column a person reads; the CSV keeps the raw numbers."""
    mem = _memory_key(rows)
    size = rows[0]["image_size"] if rows else "?"
    gmacs = [(f"GMACs @{size}px", lambda r: _fmt(r["gmacs"], 3))]
    if _two_gmacs(rows):  # at the eval crop the two are one column
        gmacs.append(("GMACs @224px", lambda r: _fmt(r["imagenet_gmacs"], 2)))
    return [
        ("backbone", lambda r: r["backbone"]),
        ("strategy", lambda r: r["strategy"]),
        ("params (M)", lambda r: _fmt(r["total_params"] / 1e6, 2)),
        ("with ImageNet head (M)", lambda r: _fmt(_per_million(r.get("imagenet_params")), 2)),
        ("trainable (M)", lambda r: _fmt((r["trainable_params"] + r["head_params"]) / 1e6, 3)),
        *gmacs,
        ("weights (MB)", lambda r: _fmt(r["weights_mb"], 1)),
        ("fwd img/s", lambda r: _fmt(r["forward_img_s"], 1)),
        ("train img/s", lambda r: _fmt(r["train_img_s"], 1)),
        (MEMORY_LABELS[mem], lambda r: _fmt(r.get(mem), 0)),
        ("ImageNet top-1", lambda r: _fmt(r["imagenet_top1"], 2)),
        ("ImageNet top-5", lambda r: _fmt(r["imagenet_top5"], 2)),
    ]


def settings_line(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence of context, without which speed and memory numbers cannot be compared."""
    first = rows[0]
    return (
        f"Measured on {first['device']}, batch {first['batch_size']}, {first['image_size']} px, "
        f"weights={first['weights']}, head Linear(features, {NUM_CLASSES}), AdamW. "
        f"Trainable counts the head. Memory: {MEMORY_NOTES[_memory_key(rows)]} "
        f"ImageNet accuracy: torchvision's weights meta; GMACs: PyTorch's FlopCounterMode."
    )


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_markdown(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = display_columns(rows)
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|",
        *("| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows),
    ]
    path.write_text("\n".join(lines) + "\n\n" + settings_line(rows) + "\n")
    return path


def _figure(size: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure drawn by the Agg backend without pyplot, so importing this module never switches
    the backend of a notebook or GUI session that calls the API."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _one_row_per_backbone(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({row["backbone"]: row for row in rows}.values())


def plot_accuracy_vs_flops(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """ImageNet top-1 against GMACs at 224 px: the accuracy was earned at that size."""
    fig, ax = _figure((6.4, 4.4))
    for row in _one_row_per_backbone(rows):
        if row["imagenet_top1"] is None:
            continue
        color = "tab:blue" if row["backbone"].startswith("resnet") else "tab:orange"
        point = (row["imagenet_gmacs"], row["imagenet_top1"])
        ax.scatter(*point, s=18 + row["weights_mb"] / 4, color=color, alpha=0.7)
        ax.annotate(row["backbone"], point, textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("GMACs per image at 224 px (FlopCounterMode)")
    ax.set_ylabel("ImageNet top-1 (%, torchvision meta)")
    ax.set_title("Accuracy vs compute (marker area ~ weights size)")
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_peak_memory(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: what each strategy needs to train, per backbone."""
    mem = _memory_key(rows)
    backbones = list(dict.fromkeys(row["backbone"] for row in rows))
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    by_key = {(row["backbone"], row["strategy"]): row.get(mem) for row in rows}
    width = 0.8 / max(len(strategies), 1)
    fig, ax = _figure((max(6.4, 1.6 * len(backbones) + 2), 4.4))
    for i, strategy in enumerate(strategies):
        xs = [b + (i - (len(strategies) - 1) / 2) * width for b in range(len(backbones))]
        ys = [by_key.get((name, strategy)) or 0.0 for name in backbones]
        ax.bar_label(ax.bar(xs, ys, width=width, label=strategy), fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(backbones)), backbones)
    ax.set_ylabel(MEMORY_LABELS[mem])
    size, batch = rows[0]["image_size"], rows[0]["batch_size"]
    ax.set_title(f"Training-step memory, batch {batch} at {size} px on {rows[0]['device']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """CSV, Markdown and two PNG plots in ``out_dir`` (made if missing); returns their paths."""
    if not rows:
        raise SetupError("Nothing was measured, so there is no report to write.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(rows, out / "report.csv"),
        "markdown": write_markdown(rows, out / "report.md"),
        "accuracy_vs_flops": plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png"),
        "peak_memory": plot_peak_memory(rows, out / "peak_memory.png"),
    }


# The screen's short memory headers; the long MEMORY_LABELS stay in report.md and the plots.
MEMORY_SHORT = {CUDA_MEMORY_COLUMN: "CUDA MB", CPU_MEMORY_COLUMN: "RSS+ MB"}


def _two_gmacs(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether GMACs at the measured size differ from those at 224 px (else the two are one column)."""
    return any(r["gmacs"] != r["imagenet_gmacs"] for r in rows)


def console_columns(rows: Sequence[dict[str, Any]]) -> list[ConsoleColumn]:
    """The screen table's columns with short headers, fixed precision and a priority each.

    Priority 0 is always shown; the others are dropped, highest first, when the terminal is too
    narrow for them (report.md and report.csv keep every column).
    """
    mem = _memory_key(rows)
    columns = [
        ConsoleColumn("backbone", lambda r: r["backbone"], 0, numeric=False),
        ConsoleColumn("strategy", lambda r: r["strategy"], 0, numeric=False),
        ConsoleColumn("params M", lambda r: _fmt(r["total_params"] / 1e6, 2), 5),
        ConsoleColumn("+IN head M", lambda r: _fmt(_per_million(r.get("imagenet_params")), 2), 10),
        ConsoleColumn("trainable M", lambda r: _fmt((r["trainable_params"] + r["head_params"]) / 1e6, 3), 1),
        ConsoleColumn("GMACs", lambda r: _fmt(r["gmacs"], 3), 4),  # at the measured size, which the notes say
    ]
    if _two_gmacs(rows):
        columns.append(ConsoleColumn("GMACs@224", lambda r: _fmt(r["imagenet_gmacs"], 2), 8))
    return [
        *columns,
        ConsoleColumn("weights MB", lambda r: _fmt(r["weights_mb"], 1), 7),
        ConsoleColumn("fwd img/s", lambda r: _fmt(r["forward_img_s"], 1), 3),
        ConsoleColumn("train img/s", lambda r: _fmt(r["train_img_s"], 1), 2),
        ConsoleColumn(MEMORY_SHORT[mem], lambda r: _fmt(r.get(mem), 0), 2),
        ConsoleColumn("IN top-1", lambda r: _fmt(r["imagenet_top1"], 2), 6),
        ConsoleColumn("IN top-5", lambda r: _fmt(r["imagenet_top5"], 2), 9),
    ]


def rich_table(rows: Sequence[dict[str, Any]], width: int = 120) -> tuple[Table, list[str]]:
    """The screen table fitted to ``width`` columns, and the headers it had no room for."""
    table, hidden = fit_table(console_columns(rows), rows, width, title="finetune.report")
    return table, [column.header for column in hidden]


def print_table(rows: Sequence[dict[str, Any]], console: Console) -> None:
    """The fitted table, then what it left out and the measuring conditions, wrapped to the console."""
    table, hidden = rich_table(rows, console.width)
    console.print(table)
    lines = [f"not shown at {console.width} columns: {', '.join(hidden)} (report.md and report.csv have them)"]
    mem = _memory_key(rows)
    gmacs = f"GMACs: multiply-adds per image at {rows[0]['image_size']} px"
    if _two_gmacs(rows):
        gmacs += ", GMACs@224 at ImageNet's 224 px"
    notes = f"{gmacs}. {MEMORY_SHORT[mem]}: {MEMORY_LABELS[mem]}. IN: ImageNet. {settings_line(rows)}"
    print_lines(console, [*(lines if hidden else []), notes])


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------


def run(settings: ReportSettings, console: Console) -> dict[str, Path]:
    """Measure every backbone with a progress bar, print the table, write the files."""
    rows: list[dict[str, Any]] = []
    parts = len(settings.backbone) * (1 + len(settings.strategy))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("measuring", total=parts)
        for name in settings.backbone:
            progress.update(task, description=f"measuring {name}")
            rows += measure_backbone(
                name,
                [str(strategy) for strategy in settings.strategy],
                settings.batch_size,
                settings.image_size,
                settings.steps,
                settings.device,
                weights=str(settings.weights),
                warmup=settings.warmup,
                on_progress=lambda text: progress.update(task, advance=1, description=text),
            )
    print_table(rows, console)
    paths = write_report(rows, settings.out.expanduser())
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 with the report written, or 2 with one paragraph saying what to fix."""
    return run_command(ReportSettings, argv, _report, prog=PROG,
                       summary="Measure params, FLOPs, size, memory and speed of each backbone under each strategy.")


def _report(settings: ReportSettings) -> int:
    run(settings, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
