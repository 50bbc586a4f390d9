"""One table over a sweep: every run's summary.json side by side.

``python -m finetune.compare DIR [out=DIR2]`` (``--help`` lists the options) reads
each ``summary.json`` under DIR (a Hydra multirun folder holds one per job), prints a
table and writes ``comparison.csv``, ``comparison.md`` and ``comparison.png`` into
``out`` (default DIR). Only summary.json is read, never checkpoints or logs, so the
comparison is as cheap as listing a directory and works on copied-off results.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING as REQUIRED
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune.cli.args import run_command
from finetune.errors import SetupError
from finetune.run.files import SUMMARY_NAME

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


# ----------------------------------------------------------------------------- console


@dataclass(frozen=True)
class ConsoleColumn:
    """One column of a console table: header, cell text per row, and how much it matters.

    Priority 0 is always shown; higher numbers are dropped first when the terminal is too narrow.
    Text columns wrap (up to ``max_width``); numbers never wrap, so they are never cut.
    """

    header: str
    cell: Callable[[dict[str, Any]], str]
    priority: int = 0
    numeric: bool = True
    max_width: int | None = None


def _make_table(columns: Sequence[ConsoleColumn], rows: Sequence[dict[str, Any]], title: str | None) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(
            column.header,
            justify="right" if column.numeric else "left",
            no_wrap=column.max_width is None,
            overflow="fold",
            max_width=column.max_width,
        )
    for row in rows:
        table.add_row(*(Text(column.cell(row)) for column in columns))  # Text: no markup in values
    return table


def fit_table(
    columns: Sequence[ConsoleColumn], rows: Sequence[dict[str, Any]], width: int, title: str | None = None
) -> tuple[Table, list[ConsoleColumn]]:
    """A table of the columns that fit in ``width``, in their given order, and the columns left out.

    Columns are taken by priority (then order); one that would make the table wider than ``width``
    is left out rather than squeezed, so a number is never folded letter by letter or cut to '1…'.
    """
    probe = Console(width=width, file=io.StringIO())
    unbounded = probe.options.update_width(10**4)
    kept: list[ConsoleColumn] = []
    for column in sorted(columns, key=lambda c: c.priority):  # sorted is stable: ties keep their order
        trial = [c for c in columns if c in kept or c is column]
        if column.priority == 0 or probe.measure(_make_table(trial, rows, title), options=unbounded).maximum <= width:
            kept.append(column)
    shown = [c for c in columns if c in kept]
    spare = width - probe.measure(_make_table(shown, rows, title), options=unbounded).maximum
    if spare > 0:  # room left over: let the first wrapping column use it rather than wrap
        wrapping = next((i for i, c in enumerate(shown) if c.max_width is not None), None)
        if wrapping is not None:
            shown[wrapping] = replace(shown[wrapping], max_width=shown[wrapping].max_width + spare)
    return _make_table(shown, rows, title), [c for c in columns if c not in kept]


def print_lines(console: Console, lines: Sequence[str]) -> None:
    """Plain text (no markup, no highlighting), wrapped at the console's width."""
    for line in lines:
        console.print(Text(line), highlight=False)


_FIELD_WORDS = re.compile(r"^([^=]+)=(.*)$")
_FRACTION_METRICS = ("acc", "top5", "mean_class_acc", "f1_macro")


def override_words(run: str) -> list[str]:
    """A job folder's name split back into Hydra's overrides: 'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]'].

    Hydra names a sweep job ``key=value,key=value`` (conf/hydra/default.yaml); a comma inside
    brackets belongs to a list value. A folder that is not such a name (a job number) is one word;
    '.' (the run directory itself) is none.
    """
    words: list[str] = []
    for part in run.split("/"):
        if part in ("", "."):
            continue
        pieces, depth, start = [], 0, 0
        for i, char in enumerate(part):
            depth += (char in "[{(") - (char in "]})")
            if char == "," and depth <= 0:
                pieces.append(part[start:i])
                start = i + 1
        pieces.append(part[start:])
        first = len(words)
        for piece in pieces:  # 'a=x,y' without brackets: y has no '=', so it is still a's value
            if len(words) > first and "=" not in piece:
                words[-1] += "," + piece
            else:
                words.append(piece)
    return words


def shared_overrides(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The overrides every job has (in the first job's order): one header line, not one per row."""
    if not rows:
        return []
    others = [set(override_words(row["run"])) for row in rows[1:]]
    return [word for word in override_words(rows[0]["run"]) if all(word in other for other in others)]


def _strategy_cell(row: dict[str, Any]) -> str:
    strategy = row.get("strategy")
    if strategy is None:
        return MISSING
    if strategy == "partial_unfreeze" and row.get("unfreeze_last") is not None:
        return f"{strategy}[{row['unfreeze_last']}]"
    return str(strategy)


def _explained(word: str, row: dict[str, Any], shown: set[str]) -> bool:
    """Whether an override's value is already a cell of the row (backbone=x, strategy=y)."""
    match = _FIELD_WORDS.match(word)
    if match is None:
        return False
    key, value = match.groups()
    key = key.lstrip("+~")
    if key in ("backbone", "strategy"):
        return key in shown and value == str(row.get(key))
    if key == "strategy.unfreeze_last":
        partial = row.get("strategy") == "partial_unfreeze"
        return "strategy" in shown and partial and value == str(row.get("unfreeze_last"))
    return False


def _cell(column: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    return lambda row: MISSING if row.get(column) is None else fmt(row[column])


def _pct(value: Any) -> str:
    """0.9333 -> '93.33': accuracies as percentages take five characters, not six."""
    return f"{100 * value:.2f}" if isinstance(value, int | float) else str(value)


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f}" if isinstance(value, int | float) else str(value)


def console_view(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[ConsoleColumn]]:
    """Header lines and candidate columns of the console table (comparison.md keeps every column).

    What is the same in every job goes into the header lines; a column whose value is the same
    (or missing) in every row is left out; the run column keeps only what differs per job.
    """
    shared = shared_overrides(rows)
    lines = [f"{'all jobs' if len(rows) > 1 else 'run'}: {' '.join(shared)}"] if shared else []

    def varies(cell: Callable[[dict[str, Any]], str]) -> bool:
        return len({cell(row) for row in rows}) > 1

    def known(cell: Callable[[dict[str, Any]], str]) -> bool:
        return any(cell(row) != MISSING for row in rows)

    labels: dict[str, Callable[[dict[str, Any]], str]] = {
        "backbone": _cell("backbone", str),
        "strategy": _strategy_cell,
        "weights": _cell("weights", str),
        "dataset": _cell("dataset", str),
        "device": _cell("device", str),
        "monitor": _cell("monitor", str),
    }
    shown = {name for name, cell in labels.items() if varies(cell)}
    shared_values = {word.split("=", 1)[1] for word in shared if "=" in word}
    same = [
        f"{name}={value}"
        for name, cell in labels.items()
        if name not in shown and (value := cell(rows[0])) != MISSING and value not in shared_values
    ]
    if same:
        lines.append("same in all: " + " ".join(same))

    shared_set = set(shared)

    def run_cell(row: dict[str, Any]) -> str:
        words = override_words(row["run"])
        rest = [w for w in words if w not in shared_set and not _explained(w, row, shown)]
        return " ".join(rest) if rest else "(shared only)" if words else str(row["run"])

    monitors = {str(row.get("monitor")).rsplit("/", 1)[-1] for row in rows}
    fraction = monitors <= set(_FRACTION_METRICS)
    cuda = any(row.get("peak_cuda_bytes") is not None for row in rows)
    candidates = [
        ConsoleColumn("run", run_cell, 0, numeric=False, max_width=36),
        ConsoleColumn("backbone", labels["backbone"], 0, numeric=False),
        ConsoleColumn("strategy", labels["strategy"], 0, numeric=False),
        ConsoleColumn("weights", labels["weights"], 6, numeric=False),
        ConsoleColumn("dataset", labels["dataset"], 6, numeric=False),
        ConsoleColumn("top-1 %", _cell("test_acc", _pct), 0),
        ConsoleColumn("mean cls %", _cell("test_mean_class_acc", _pct), 1),
        ConsoleColumn("F1 %", _cell("test_f1_macro", _pct), 5),
        ConsoleColumn("top-5 %", _cell("test_top5", _pct), 7),
        ConsoleColumn("best val %" if fraction else "best val",
                      _cell("best_val_metric", _pct if fraction else _fmt_float), 2),
        ConsoleColumn("epochs", _cell("epochs_run", str), 8),
        ConsoleColumn("train s", lambda r: _fmt_seconds(s) if (s := training_seconds(r)) is not None else MISSING, 3),
        ConsoleColumn("wall s", _cell("wall_total_s", _fmt_seconds), 7),
        ConsoleColumn("trainable", _cell("params_trainable", _fmt_params), 4),
        ConsoleColumn("CUDA MiB" if cuda else "RSS MiB", _cell("peak_cuda_bytes" if cuda else "peak_cpu_rss_bytes",
                                                               _mib), 8),
        ConsoleColumn("device", labels["device"], 9, numeric=False),
    ]
    columns = []
    for column in candidates:
        if column.header == "run":
            keep = len(rows) > 1 and any(run_cell(row) != "(shared only)" for row in rows)
        elif column.numeric:
            keep = known(column.cell)
        else:
            keep = column.header in shown
        if keep:
            columns.append(column)
    return lines, columns


def render_table(rows: Sequence[dict[str, Any]], width: int = 120) -> tuple[Table, list[str]]:
    """The console table fitted to ``width``, and the headers left out for lack of room."""
    _, columns = console_view(rows)
    table, hidden = fit_table(columns, rows, width, title=f"{len(rows)} run(s)")
    return table, [column.header for column in hidden]


def print_comparison(rows: Sequence[dict[str, Any]], console: Console) -> None:
    """Header lines (what every job shares), the table fitted to the console, and what it left out."""
    lines, _ = console_view(rows)
    table, hidden = render_table(rows, console.width)
    print_lines(console, lines)
    console.print(table)
    if hidden:
        print_lines(console, [f"not shown at {console.width} columns: {', '.join(hidden)} "
                              "(comparison.md and comparison.csv have every column)"])


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
    print_comparison(rows, console)
    print_lines(console, [f"wrote {path}" for path in paths.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
