"""What a person sees when a run or a sweep ends: the result, where it is, and the next commands.

A rich panel on a terminal; plain ``key: value`` lines without one (logs, CI) or with
``callbacks.progress_bar=none``. Read from summary.json's fields only, so what is shown is what was written.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

TEST_METRICS = (("acc", "top-1"), ("top5", "top-5"), ("mean_class_acc", "mean per-class"), ("f1_macro", "macro F1"))


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


def _mb(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "-"
    cuda = memory.get("cuda_max_allocated_bytes")
    rss = memory.get("cpu_rss_bytes")
    parts = []
    if cuda:
        parts.append(f"{cuda / 2**20:,.0f} MB CUDA")
    if rss:
        parts.append(f"{rss / 2**20:,.0f} MB RSS")
    return ", ".join(parts) or "-"


def result_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of a finished run, in reading order."""
    test = summary.get("test") or {}
    seconds = summary.get("wall_seconds") or {}
    rows = [("run", f"{summary.get('backbone')} · {summary.get('strategy')} · {summary.get('dataset')} "
                    f"({summary.get('num_classes')} classes)")]
    rows.append(("test", "   ".join(f"{label} {_percent(test[key])}" for key, label in TEST_METRICS if key in test)))
    best = summary.get("best_val_metric")
    rows.append(("best val", f"{summary.get('monitor')} = {best:.4f}" if isinstance(best, int | float) else "-"))
    rows.append(("epochs", str(summary.get("epochs_run"))))
    rows.append(("wall time", "   ".join(f"{name.replace('_', ' ')} {float(value):.1f} s"
                                         for name, value in seconds.items())))
    rows.append(("peak memory", _mb(summary.get("peak_memory"))))
    rows.append(("run folder", str(summary.get("run_dir"))))
    if summary.get("best_checkpoint"):
        rows.append(("checkpoint", str(summary["best_checkpoint"])))
    return rows


def next_commands(summary: dict[str, Any]) -> list[str]:
    ckpt = summary.get("best_checkpoint")
    run_dir = summary.get("run_dir")
    commands = []
    if ckpt:
        commands.append(f"python -m finetune.predict ckpt={shlex.quote(str(ckpt))} images=PATH")
        commands.append(f"python -m finetune.export ckpt={shlex.quote(str(ckpt))} format=onnx")
    if run_dir:
        commands.append(f"python -m finetune.compare {shlex.quote(str(Path(run_dir).parent))}")
    return commands


def show_result(summary: dict[str, Any], fancy: bool | None = None) -> None:
    """Print the end of a run on stdout: a panel on a terminal, plain lines elsewhere."""
    fancy = sys.stdout.isatty() if fancy is None else fancy
    rows, commands = result_lines(summary), next_commands(summary)
    if not fancy:
        print("run finished")
        for label, value in rows:
            print(f"  {label}: {value}")
        for command in commands:
            print(f"next: {command}")
        return
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    steps = Text("\n".join(commands), style="cyan", overflow="fold")
    Console(soft_wrap=False).print(Panel(Group(table, Text("\nnext:", style="bold"), steps),
                                         title="finetune: run finished", expand=False))


def best_of_sweep(sweep_dir: Path) -> tuple[dict[str, Any] | None, int]:
    """The job with the best objective (its summary's monitor direction), and how many jobs finished."""
    summaries = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    scored = [s for s in summaries if isinstance(s.get("objective"), int | float)]
    if not scored:
        return None, len(summaries)
    lowest = str(scored[0].get("monitor", "")).endswith("loss")
    best = (min if lowest else max)(scored, key=lambda s: float(s["objective"]))
    return best, len(summaries)


class SweepResult(Callback):
    """Hydra callback (conf/hydra/default.yaml): at the end of a ``-m`` sweep, name the best job and the
    compare command."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        best, count = best_of_sweep(sweep_dir)
        print(f"sweep finished: {count} job(s) with a summary.json under {sweep_dir}")
        if best is not None:
            print(f"best job: {best.get('run_dir')} ({best.get('monitor')} = {float(best['objective']):.4f}, "
                  f"test top-1 {_percent((best.get('test') or {}).get('acc'))})")
        print(f"next: python -m finetune.compare {shlex.quote(str(sweep_dir))}")
