"""Check an image folder before training: ``python -m finetune.check data=folder data.root=PATH``.

Takes the same ``key=value`` words as the train entry (no Hydra start-up, no run directory), so a
user can paste the data part of a training command. Defaults come from ``conf/data/folder.yaml``.
Exit 0: usable (unreadable files, if any, would be skipped). Exit 2: the run would stop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from finetune.data.checks import ON_BAD_IMAGE, CheckReport, apply_policy, check_image_tree
from finetune.data.images import MAX_PIXELS
from finetune.errors import SetupError, report_error

USAGE = (
    "usage: python -m finetune.check data=folder data.root=PATH [data.on_bad_image=skip|error] "
    "[data.max_pixels=N] [out=DIR] [workers=N]"
)
KEYS = ("data", "data.root", "data.on_bad_image", "data.max_pixels", "out", "workers")
DEFAULT_ON_BAD_IMAGE = "error"  # used only when conf/data/folder.yaml does not name one
SHOWN_BAD = 20  # rows of the unreadable-files table; bad_files.txt (out=DIR) has them all


@dataclass(frozen=True)
class CheckOptions:
    """What to check and how strictly, resolved from the command line and folder.yaml."""

    root: Path
    on_bad_image: str
    max_pixels: int
    out: Path | None
    workers: int | None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; a ``SetupError`` becomes its message on stderr and exit code 2."""
    try:
        return check(parse_options(sys.argv[1:] if argv is None else argv))
    except SetupError as error:
        return report_error(error)


def check(options: CheckOptions) -> int:
    """Check, print, write the report files if asked, then apply the policy (which may raise)."""
    console = Console(soft_wrap=True)
    with _progress() as progress:
        report = check_image_tree(options.root, options.max_pixels, options.workers, progress)
    print_report(console, report)
    if options.out is not None:
        report.write(options.out)
        console.print(Text(f"wrote {options.out / 'bad_files.txt'} and {options.out / 'data_check.json'}"))
    skipped = apply_policy(report, options.on_bad_image)
    verdict = f"{len(skipped)} unreadable file(s) will be skipped" if skipped else "the data is clean"
    console.print(Text(f"OK: {verdict}.", style="bold green"))
    return 0


def parse_options(tokens: Sequence[str]) -> CheckOptions:
    """``key=value`` words (Hydra's ``+``/``++`` prefixes allowed) over folder.yaml's defaults."""
    if any(token in ("-h", "--help") for token in tokens):
        print(USAGE)
        raise SystemExit(0)
    values = _parse_tokens(tokens)
    if values.get("data", "folder") != "folder":
        raise SetupError(
            f"data={values['data']} is a dataset torchvision downloads and verifies itself; only "
            f"data=folder (your own image tree) can be checked. {USAGE}"
        )
    defaults = _folder_defaults()
    root = values.get("data.root") or defaults.get("root")
    if not root or root == "???":
        raise SetupError(f"Say which folder to check with data.root=PATH. {USAGE}")
    on_bad_image = values.get("data.on_bad_image") or defaults.get("on_bad_image") or DEFAULT_ON_BAD_IMAGE
    if on_bad_image not in ON_BAD_IMAGE:
        raise SetupError(f"data.on_bad_image={on_bad_image} is not one of: {', '.join(ON_BAD_IMAGE)}.")
    out = values.get("out")
    max_pixels = values.get("data.max_pixels") or defaults.get("max_pixels")
    return CheckOptions(
        root=Path(str(root)).expanduser(),
        on_bad_image=str(on_bad_image),
        max_pixels=_positive_int("data.max_pixels", max_pixels) or MAX_PIXELS,
        out=Path(out).expanduser() if out else None,
        workers=_positive_int("workers", values.get("workers")),
    )


def print_report(console: Console, report: CheckReport) -> None:
    """The per-split table, the unreadable files, conversions and warnings."""
    console.print(_split_table(report))
    if report.bad:
        console.print(_bad_table(report))
    if report.converted:
        modes = ", ".join(f"{mode}: {n}" for mode, n in report.converted.items())
        console.print(Text(f"Converted to RGB on load (for information): {modes}", style="cyan"))
    for warning in report.warnings():
        console.print(Text(f"warning: {warning}", style="yellow"))


def _split_table(report: CheckReport) -> Table:
    """One row per split: classes, readable images, smallest class (imbalance shows at once)."""
    table = Table(title=f"{report.root} ({report.layout} layout)")
    for column in ("split", "classes", "readable images", "smallest class"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, counts in report.images.items():
        smallest = min(counts.items(), key=lambda item: item[1]) if counts else ("-", 0)
        table.add_row(split, str(len(counts)), str(sum(counts.values())), f"{smallest[0]} ({smallest[1]})")
    table.caption = f"unreadable files: {len(report.bad)}"
    return table


def _bad_table(report: CheckReport) -> Table:
    """The first SHOWN_BAD unreadable files with their reasons."""
    more = len(report.bad) - SHOWN_BAD
    table = Table(title="unreadable files", caption=f"and {more} more" if more > 0 else None)
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for bad in report.bad[:SHOWN_BAD]:
        table.add_row(Text(str(bad.path)), Text(bad.reason))
    return table


@contextmanager
def _progress() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal, nothing in logs; yields the callback the check calls."""
    if not sys.stderr.isatty():
        yield None
        return
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("decoding images", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _parse_tokens(tokens: Sequence[str]) -> dict[str, str]:
    """``key=value`` words into a dict; unknown keys are an error, not silently ignored."""
    values = {}
    for token in tokens:
        key, sep, value = token.lstrip("+").partition("=")
        if not sep or key not in KEYS:
            raise SetupError(f"Cannot use {token!r} here; the keys are {', '.join(KEYS)}. {USAGE}")
        values[key] = value
    return values


def _folder_defaults() -> dict[str, object]:
    """``conf/data/folder.yaml`` (in the repo, or inside the installed package) as a dict."""
    here = Path(__file__).resolve().parent
    for conf in (here / "conf", here.parent / "conf"):
        path = conf / "data" / "folder.yaml"
        if path.is_file():
            return dict(OmegaConf.to_container(OmegaConf.load(path)))  # type: ignore[arg-type]
    return {}


def _positive_int(key: str, value: object) -> int | None:
    """``value`` as an int above zero, or None when absent."""
    if value in (None, ""):
        return None
    try:
        number = int(str(value).replace("_", ""))
    except ValueError:
        number = 0
    if number <= 0:
        raise SetupError(f"{key}={value} must be a whole number above zero.")
    return number


if __name__ == "__main__":
    sys.exit(main())
