"""One table over a sweep: every run's summary.json side by side.

``python -m finetune.compare DIR [out=DIR2]`` (``--help`` lists the options) reads
each ``summary.json`` under DIR (a Hydra multirun folder holds one per job), prints a
table and writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into
``out`` (default DIR). Only summary.json is read, never checkpoints or logs, so the
comparison is as cheap as listing a directory and works on copied-off results.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING as REQUIRED
from rich.console import Console
from rich.table import Table

from finetune.cli.args import run_command
from finetune.errors import SetupError
from finetune.run.run_dir import SUMMARY_NAME

MISSING = "-"

# Flat column name -> key path inside summary.json. The order is the CSV order.
COLUMNS: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone",),
    "strategy": ("strategy",),
    "unfreeze_last": ("unfreeze_last",),
    "weights": ("weights",),
    "dataset": ("dataset",),
    "params_trainable": ("params_trainable",),
    "params_total": ("params_total",),
    "test_acc": ("test", "acc"),
    "test_top5": ("test", "top5"),
    "test_mean_class_acc": ("test", "mean_class_acc"),
    "test_f1_macro": ("test", "f1_macro"),
    "monitor": ("monitor",),
    "best_val_metric": ("best_val_metric",),
    "epochs_run": ("epochs_run",),
    "wall_total_s": ("wall_seconds", "total"),
    "wall_feature_extraction_s": ("wall_seconds", "feature_extraction"),
    "wall_training_s": ("wall_seconds", "training"),
    "peak_cpu_rss_bytes": ("peak_memory", "cpu_rss_bytes"),
    "peak_cuda_bytes": ("peak_memory", "cuda_max_allocated_bytes"),
    "device": ("device",),
}
FIELDS: tuple[str, ...] = ("run", *COLUMNS)


# ----------------------------------------------------------------------------- reading


def _lookup(summary: dict[str, Any], path: tuple[str, ...]) -> Any:
    """Follow ``path`` into nested dicts; None where any step is missing or not a dict."""
    node: Any = summary
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def flatten_summary(summary: dict[str, Any], run: str) -> dict[str, Any]:
    """One flat row per run, with None for every key the trainer did not write.

    Older or interrupted runs may lack sections; a row with gaps is more useful
    than a comparison that refuses to load.
    """
    row: dict[str, Any] = {"run": run}
    for name, path in COLUMNS.items():
        row[name] = _lookup(summary, path)
    return row


def _natural_key(text: str) -> list[Any]:
    """Sort '2_x' before '10_x', which is the order Hydra numbered the jobs in."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed summary, or None (with a warning) if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        Console(stderr=True).print(f"[yellow]skipping[/yellow] {path}: {err}")
        return None
    if not isinstance(data, dict):
        Console(stderr=True).print(f"[yellow]skipping[/yellow] {path}: not a JSON object")
        return None
    return data


def collect_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Flat rows (see ``FIELDS``) for every summary.json under ``root``, in job order.

    ``run`` is the job directory relative to ``root`` ('.' when root is itself a
    run directory). Raises SetupError if root is missing or holds no summary.
    """
    root = Path(root)
    if not root.is_dir():
        raise SetupError(f"'{root}' is not a directory; pass a run or multirun folder.")
    rows = []
    for path in sorted(root.rglob(SUMMARY_NAME), key=lambda p: _natural_key(p.as_posix())):
        summary = _read_json(path)
        if summary is not None:
            rows.append(flatten_summary(summary, path.parent.relative_to(root).as_posix()))
    if not rows:
        raise SetupError(
            f"No readable {SUMMARY_NAME} under '{root}'. Each finished run writes one into its "
            "run directory; point this at a multirun folder (multirun/DATE/TIME) or a run folder."
        )
    return rows


# ----------------------------------------------------------------------------- formatting


def _fmt_float(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value)


def _fmt_params(value: Any) -> str:
    """11.18M for a backbone, 5.1K for a linear head: a head-only run must not read as 0.00M."""
    if not isinstance(value, int | float):
        return str(value)
    return f"{value / 1e6:.2f}M" if abs(value) >= 1e6 else f"{value / 1e3:.1f}K"


def _fmt_bytes(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, int | float) else str(value)


def _fmt_seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else str(value)


# Human-readable view: header -> (column, formatter). CSV keeps raw numbers instead.
_DISPLAY: dict[str, tuple[str, Callable[[Any], str]]] = {
    "run": ("run", str),
    "backbone": ("backbone", str),
    "strategy": ("strategy", str),
    "weights": ("weights", str),
    "dataset": ("dataset", str),
    "trainable": ("params_trainable", _fmt_params),
    "params": ("params_total", _fmt_params),
    "test acc": ("test_acc", _fmt_float),
    "top5": ("test_top5", _fmt_float),
    "mean class acc": ("test_mean_class_acc", _fmt_float),
    "macro F1": ("test_f1_macro", _fmt_float),
    "best val": ("best_val_metric", _fmt_float),
    "wall s": ("wall_total_s", _fmt_seconds),
    "feat s": ("wall_feature_extraction_s", _fmt_seconds),
    "train s": ("wall_training_s", _fmt_seconds),
    "peak CPU RSS": ("peak_cpu_rss_bytes", _fmt_bytes),
    "peak CUDA": ("peak_cuda_bytes", _fmt_bytes),
}


def display_cells(row: dict[str, Any]) -> list[str]:
    """The row as the table and the Markdown show it: '-' wherever a value is missing."""
    cells = []
    for column, fmt in _DISPLAY.values():
        value = row.get(column)
        cells.append(MISSING if value is None else fmt(value))
    return cells


def render_table(rows: Sequence[dict[str, Any]]) -> Table:
    """A rich table of the display cells, numbers right-aligned."""
    table = Table(title=f"{len(rows)} run(s)", show_lines=False)
    for i, header in enumerate(_DISPLAY):
        table.add_column(header, justify="left" if i < 5 else "right", overflow="fold")
    for row in rows:
        table.add_row(*display_cells(row))
    return table


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub pipe table; '|' inside a value is escaped so it cannot split a cell."""
    headers = list(_DISPLAY)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < 5 else "---:" for i in range(len(headers))) + "|",
    ]
    for row in rows:
        cells = [cell.replace("|", "\\|") for cell in display_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- writing


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Raw values; a missing value is an empty cell, which pandas reads as NaN."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in FIELDS})


def training_seconds(row: dict[str, Any]) -> float | None:
    """Cost of producing the model: feature extraction plus training.

    The feature cache moves a frozen backbone's cost out of the training loop;
    plotting training time alone would hide it. Falls back to total wall time.
    """
    parts = [row.get("wall_feature_extraction_s"), row.get("wall_training_s")]
    known = [p for p in parts if isinstance(p, int | float)]
    if known:
        return float(sum(known))
    total = row.get("wall_total_s")
    return float(total) if isinstance(total, int | float) else None


def point_label(row: dict[str, Any]) -> str:
    """backbone/strategy, plus N for partial_unfreeze so a sweep over N stays readable."""
    label = f"{row.get('backbone') or '?'}/{row.get('strategy') or '?'}"
    if row.get("strategy") == "partial_unfreeze" and row.get("unfreeze_last") is not None:
        label += f"[{row['unfreeze_last']}]"
    return label


def _write_plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Test accuracy against training wall time, one labelled point per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [
        (seconds, row["test_acc"], point_label(row))
        for row in rows
        if (seconds := training_seconds(row)) is not None and isinstance(row.get("test_acc"), int | float)
    ]
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)  # no pyplot: a notebook's plotting backend is left alone
    ax = fig.add_subplot()
    if points:
        for backbone in dict.fromkeys(label.split("/")[0] for _, _, label in points):
            mine = [(x, y) for x, y, label in points if label.split("/")[0] == backbone]
            ax.scatter(*zip(*mine, strict=True), s=36, zorder=3, label=backbone)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.legend(title="backbone", fontsize=8)
        ax.margins(x=0.2, y=0.1)  # room for the labels of the right-most points
        xs = [x for x, _, _ in points]
        positive = [x for x in xs if x > 0]
        if positive and len(positive) == len(xs) and max(xs) / min(positive) > 20:
            ax.set_xscale("log")  # feature extraction vs full fine-tuning spans decades
    else:
        ax.text(0.5, 0.5, "no run has both test acc and wall time", ha="center", transform=ax.transAxes)
    ax.set_xlabel("training wall time, feature extraction included (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs training time")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_comparison(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write comparison.csv / .md / .png into out_dir; returns {'csv'|'md'|'png': path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"comparison.{kind}" for kind in ("csv", "md", "png")}
    _write_csv(rows, paths["csv"])
    paths["md"].write_text(_markdown(rows), encoding="utf-8")
    _write_plot(rows, paths["png"])
    return paths


# ----------------------------------------------------------------------------- CLI


@dataclass
class CompareOptions:
    """Which runs to compare and where the comparison files go."""

    POSITIONAL: ClassVar[str] = "root"

    root: Path = field(default=REQUIRED, metadata={"doc": "run or multirun directory, searched recursively for "
                                                          f"{SUMMARY_NAME}", "metavar": "DIR"})
    out: Path | None = field(default=None, metadata={"doc": "where comparison.csv/.md/.png go (null: DIR)"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a SetupError becomes a one-paragraph message and exit code 2."""
    return run_command(CompareOptions, argv, compare, prog="python -m finetune.compare",
                       summary="Compare the runs of a sweep from their summary.json files.")


def compare(options: CompareOptions) -> int:
    """Collect, write the files, then print the table and where the files went."""
    root = options.root.expanduser()
    rows = collect_summaries(root)
    paths = write_comparison(rows, root if options.out is None else options.out.expanduser())
    console = Console()
    console.print(render_table(rows))
    for path in paths.values():
        console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
