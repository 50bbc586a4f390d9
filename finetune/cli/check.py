"""Check an image folder before training: ``python -m finetune.check data=folder data.root=PATH``.

Takes the same ``key=value`` words as the train entry (no Hydra start-up, no run directory), so a
user can paste the data part of a training command. Defaults are the training config's
(:class:`finetune.config.schema.DataConfig`).
Exit 0: usable (unreadable files, if any, would be skipped). Exit 2: the run would stop.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune.cli.args import run_command
from finetune.config.schema import DataConfig, OnBadImage, at_least
from finetune.data.checks import CheckReport, apply_policy, check_image_tree
from finetune.errors import SetupError
from finetune.progress import counted

SHOWN_BAD = 20  # rows of the unreadable-files table; bad_files.txt (out=DIR) has them all
PROG = "python -m finetune.check"


def _default(name: str) -> Any:
    """The training config's default of ``data.<name>`` (DataConfig), so the check and a run cannot disagree."""
    return next(f.default for f in fields(DataConfig) if f.name == name)


@dataclass
class FolderData:
    """The ``data.*`` keys of a training command that decide what the check reads and how strictly."""

    name: str = field(default="folder", metadata={"doc": "only folder (your own image tree) can be checked",
                                                  "metavar": "folder"})
    root: Path = field(default=MISSING, metadata={"doc": "the image tree: class folders, or train/ val/ test/ of them"})
    on_bad_image: OnBadImage = field(default=_default("on_bad_image"), metadata={
        "doc": "unreadable files: skip them (exit 0) or stop (exit 2)"})
    max_pixels: int = field(default=_default("max_pixels"), metadata={
        "doc": "decompression-bomb limit: larger images count as unreadable"})


@dataclass
class CheckOptions:
    """What to check and how strictly; ``data.*`` as in the training command, so its data part can be pasted."""

    ALIASES: ClassVar[dict[str, str]] = {"data": "data.name"}

    data: FolderData = field(default_factory=FolderData)
    out: Path | None = field(default=None, metadata={"doc": "write bad_files.txt and data_check.json into this folder"})
    workers: int | None = field(default=None, metadata={"doc": "decoding threads (null: one per core, at most 8)"})

    def validate(self) -> None:
        if self.data.name != "folder":
            raise SetupError(
                f"data={self.data.name} is a dataset torchvision downloads and verifies itself; only "
                f"data=folder (your own image tree) can be checked ({PROG} --help lists the options)."
            )
        at_least("data.max_pixels", self.data.max_pixels, 1, "pixels per image above which a file counts as a bomb.")
        at_least("workers", self.workers, 1, "e.g. workers=8; null: one per core, at most 8.", optional=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; a ``SetupError`` becomes its message on stderr and exit code 2."""
    return run_command(CheckOptions, argv, check, prog=PROG,
                       summary="Check an image folder before training: exit 0 if a run can use it, 2 if it would stop.")


def check(options: CheckOptions) -> int:
    """Check, print, write the report files if asked, then apply the policy (which may raise)."""
    console = Console(soft_wrap=True)
    out = options.out.expanduser() if options.out is not None else None
    with counted("checking images") as progress:
        report = check_image_tree(options.data.root.expanduser(), options.data.max_pixels, options.workers, progress)
    print_report(console, report)
    if out is not None:
        report.write(out)
        console.print(Text(f"wrote {out / 'bad_files.txt'} and {out / 'data_check.json'}"))
    skipped = apply_policy(report, str(options.data.on_bad_image))
    verdict = f"{len(skipped)} unreadable file(s) will be skipped" if skipped else "the data is clean"
    console.print(Text(f"OK: {verdict}.", style="bold green"))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
