"""What a run leaves in its directory: the confusion-matrix plot and memory peaks (files: finetune.atomic)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def reset_peak_memory() -> None:
    """Start a new peak: runs in one process (a notebook sweep) then each report their own."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # Linux: writing 5 resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process since the last reset and, on GPU, peak CUDA allocation."""
    rss = _vm_hwm_bytes()
    if rss is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = int(maxrss if sys.platform == "darwin" else maxrss * 1024)
    cuda = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    return {"cpu_rss_bytes": rss, "cuda_max_allocated_bytes": cuda}


class TrainingPeakMemory(pl.Callback):
    """Peak memory of the training phase alone (after feature extraction), besides the run's overall peak.

    On train start it keeps the peaks so far and resets them; on train end it reads the training peak.
    On CUDA that is the peak of tensors allocated, which for training on cached features is the
    trainable part alone.
    """

    def __init__(self) -> None:
        self.before: dict[str, int | None] | None = None
        self.training: dict[str, int | None] | None = None
        self.cuda_at_start: int | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.before = peak_memory()
        self.cuda_at_start = int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
        reset_peak_memory()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # allocated at start: the module and optimizer as training begins (frozen weights too, unless detached)
        self.training = {**peak_memory(), "cuda_allocated_at_start_bytes": self.cuda_at_start}

    def overall(self) -> dict[str, int | None]:
        """The whole run's peaks: the larger of before-training and since (the reset forgot the former)."""
        now = peak_memory()
        if self.before is None:
            return now
        return {k: max((v for v in (self.before.get(k), now.get(k)) if v is not None), default=None) for k in now}


def plot_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix as a PNG (labels hidden when there are many classes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = matrix.float()
    norm = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    size = min(16.0, max(4.0, 0.35 * n + 2))
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)  # draws without pyplot, so a notebook's backend is left alone
    ax = fig.add_subplot()
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
