"""Classify images with a trained checkpoint: ``python -m finetune.predict ckpt=PATH images=FILE_OR_FOLDER``.

Images go through the checkpoint's own preprocessing (the resize, crop, mean and std it was
trained with), so a prediction sees the same pixels the test split did. Unreadable files do not
stop the run: they get a row with the reason in the ``error`` column and a line on stderr.
Exit 0 when at least one image was classified, 2 when nothing could be (or the input is wrong).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from finetune.cli.args import run_command
from finetune.config.problems import ConfigProblem
from finetune.config.schema import at_least
from finetune.data.datamodule import resolve_num_workers
from finetune.data.images import IMAGE_EXTENSIONS, BadImageError, image_loader, is_image_file, open_rgb, per_file_decode
from finetune.data.transforms import eval_transform
from finetune.errors import SetupError
from finetune.model.checkpoints import class_names_of, load_module, preprocessing_of
from finetune.model.module import FinetuneModule
from finetune.progress import progress

SHOWN_ROWS = 10  # rows of the on-screen table; the CSV has them all
SHOWN_BAD = 10  # unreadable files listed on stderr
PROG = "python -m finetune.predict"


@dataclass
class PredictOptions:
    """What to classify, with which checkpoint, and where the CSV goes."""

    ckpt: Path = field(default=MISSING, metadata={"doc": "the trained checkpoint (.ckpt)"})
    images: Path = field(default=MISSING, metadata={"doc": "one image file, or a folder searched recursively",
                                                    "metavar": "FILE_OR_FOLDER"})
    topk: int = field(default=5, metadata={"doc": "classes per image, best first (capped at the checkpoint's)"})
    out: Path | None = field(default=None, metadata={"doc": "the CSV: one row per file, unreadable ones included "
                                                            "(default: predictions.csv in the checkpoint's run folder)",
                                                     "metavar": "FILE"})
    batch_size: int = field(default=32, metadata={"doc": "images per forward pass"})
    device: str = field(default="auto", metadata={"doc": "auto (the GPU when there is one), cpu, cuda or cuda:N",
                                                  "metavar": "auto|cpu|cuda"})
    workers: Any = field(default="auto", metadata={"doc": "image-decoding processes: auto (from the machine) or "
                                                          "an integer >= 0", "metavar": "auto|N"})

    def validate(self) -> None:
        at_least("topk", self.topk, 1, "e.g. topk=5.")
        at_least("batch_size", self.batch_size, 1, "e.g. batch_size=32.")
        if self.workers != "auto" and not (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                           and self.workers >= 0):
            raise ConfigProblem("workers", self.workers, "must be auto or an integer >= 0", "e.g. workers=0.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a prediction; a ``SetupError`` becomes its message on stderr and exit code 2."""
    return run_command(PredictOptions, argv, run, prog=PROG,
                       summary="Classify images with a trained checkpoint; writes one CSV row per file.")


def run(options: PredictOptions) -> int:
    """Load, predict, write the CSV, show the first rows; SetupError when no image could be read."""
    module = load_module(options.ckpt.expanduser())
    paths, ignored = list_images(options.images.expanduser())
    rows = predict(module, paths, options.topk, options.batch_size, options.device,
                   resolve_num_workers(options.workers))
    topk = min(options.topk, int(module.hparams["num_classes"]))
    out = options.out.expanduser() if options.out is not None else default_csv(options.ckpt.expanduser())
    try:
        write_csv(rows, out, topk)
    except OSError as err:
        raise SetupError(f"Could not write the predictions to {out} ({err.strerror or err}); give a writable "
                         f"file with out=PATH.") from None
    console = Console(soft_wrap=True)
    console.print(rows_table(rows, out))
    report_problems(rows, ignored, out)
    if not any(row["error"] is None for row in rows):
        raise SetupError(f"None of the {len(rows)} image file(s) could be read; the reasons are in {out}.")
    return 0


def default_csv(ckpt: Path) -> Path:
    """predictions.csv in the checkpoint's run folder (the one holding ``checkpoints/``), never the current one."""
    folder = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return folder / "predictions.csv"


def predict(
    module: FinetuneModule,
    paths: Sequence[str | Path],
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    workers: int = 0,
) -> list[dict[str, Any]]:
    """One dict per path, in order: ``path``, ``classes`` and ``probs`` (best first, ``topk`` long, capped
    at the number of classes) and ``error`` (None, or why the file could not be read).

    ``module`` is an image-fed model (``load_module``'s result); it is moved to ``device`` and set to eval.
    """
    if topk < 1 or batch_size < 1:
        raise SetupError(f"topk={topk} and batch_size={batch_size} must both be at least 1.")
    if module.input_stage != 0:
        raise SetupError("predict needs a module fed with images (input_stage=0), e.g. from load_module(ckpt).")
    target = resolve_device(device)
    names = class_names_of(module)
    k = min(topk, len(names))
    prep = preprocessing_of(module)
    read = image_loader(per_file_decode(prep.decode), prep.resize_size)
    files = ImageFiles([Path(p) for p in paths], eval_transform(prep), read)
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers if len(files) > batch_size else 0,
                        collate_fn=collate, pin_memory=target.type == "cuda")
    rows: list[dict[str, Any]] = [{} for _ in files.paths]
    module.to(target).eval()
    with torch.inference_mode(), progress("predicting", len(files)) as advance:
        for indices, images, failures in loader:
            advance(len(indices) + len(failures))
            for i, reason in failures:
                rows[i] = {"path": str(files.paths[i]), "classes": [], "probs": [], "error": reason}
            if not indices:
                continue
            probs = module(images.to(target, non_blocking=True)).float().softmax(dim=1)
            best = probs.topk(k, dim=1)
            for i, values, classes in zip(indices, best.values.tolist(), best.indices.tolist(), strict=True):
                rows[i] = {"path": str(files.paths[i]), "classes": [names[c] for c in classes], "probs": values,
                           "error": None}
    return rows


class ImageFiles(Dataset):
    """Decoded, preprocessed images by index; a bad file yields its reason instead of raising."""

    def __init__(self, paths: list[Path], transform: Any, loader: Any = open_rgb) -> None:
        self.paths = paths
        self.transform = transform
        self.loader = loader  # the run's own decode (data.decode)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = self.loader(self.paths[i])
        except BadImageError as error:
            return i, None, error.reason
        try:
            return i, self.transform(image), None
        except (OSError, ValueError, RuntimeError, MemoryError) as error:  # one file's failure is its row's
            return i, None, f"could not be preprocessed ({type(error).__name__}: {str(error)[:200]})"


def collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the readable images of a batch; keep the unreadable ones apart with their reasons."""
    good = [(i, image) for i, image, _ in items if image is not None]
    failures = [(i, reason or "unreadable") for i, image, reason in items if image is None]
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, failures


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one. Asking for CUDA without one is an error, not a silent CPU run."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise SetupError(f"device={device} is not a device torch knows; use auto, cpu, cuda or cuda:N.") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device={device}, but torch sees no CUDA GPU here; use device=cpu.")
    return target


def list_images(target: Path) -> tuple[list[Path], list[Path]]:
    """(images, ignored files): one named file is always tried; a folder is searched recursively by extension."""
    if target.is_file():
        return [target], []
    if not target.is_dir():
        raise SetupError(f"images={target} is neither an image file nor a folder.")
    files = sorted(p for p in target.rglob("*") if p.is_file())
    images = [p for p in files if is_image_file(p)]
    if not images:
        raise SetupError(
            f"images={target} holds no image files ({len(files)} other file(s)); the extensions read are "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}."
        )
    return images, [p for p in files if not is_image_file(p)]


def csv_columns(topk: int) -> list[str]:
    return ["path", *[f"{name}_{k}" for k in range(1, topk + 1) for name in ("class", "prob")], "error"]


def write_csv(rows: list[dict[str, Any]], out: Path, topk: int) -> None:
    """path, class_1, prob_1 ... class_k, prob_k, error: one row per file, unreadable ones included."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(topk))
        for row in rows:
            pairs = [(c, f"{p:.6f}") for c, p in zip(row["classes"], row["probs"], strict=True)]
            pairs += [("", "")] * (topk - len(pairs))
            writer.writerow([row["path"], *[v for pair in pairs for v in pair], row["error"] or ""])


def rows_table(rows: list[dict[str, Any]], out: Path) -> Table:
    """The first SHOWN_ROWS rows: top-1 class and probability, the runners-up in one column."""
    predicted = sum(row["error"] is None for row in rows)
    table = Table(caption=f"{predicted} predicted, {len(rows) - predicted} unreadable; every row is in {out}")
    for column in ("file", "class", "prob", "next"):
        table.add_column(column, justify="right" if column == "prob" else "left", overflow="fold")
    for row in rows[:SHOWN_ROWS]:
        if row["error"] is not None:
            table.add_row(Text(row["path"]), Text(row["error"], style="red"), "", "")
            continue
        runners_up = ", ".join(f"{c} {p:.3f}" for c, p in zip(row["classes"][1:], row["probs"][1:], strict=True))
        table.add_row(Text(row["path"]), Text(row["classes"][0]), f"{row['probs'][0]:.3f}", Text(runners_up))
    if len(rows) > SHOWN_ROWS:
        table.add_row(Text(f"... and {len(rows) - SHOWN_ROWS} more"), "", "", "")
    return table


def report_problems(rows: list[dict[str, Any]], ignored: list[Path], out: Path) -> None:
    """Unreadable files (count + the first few with reasons) and skipped non-image files, on stderr."""
    console = Console(stderr=True, soft_wrap=True)
    bad = [row for row in rows if row["error"] is not None]
    if bad:
        console.print(Text(f"{len(bad)} unreadable file(s), not predicted (error column of {out}):", style="yellow"))
        for row in bad[:SHOWN_BAD]:
            console.print(Text(f"  {row['path']}: {row['error']}"))
        if len(bad) > SHOWN_BAD:
            console.print(Text(f"  ... and {len(bad) - SHOWN_BAD} more"))
    if ignored:
        console.print(Text(f"ignored {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}",
                           style="yellow"))


if __name__ == "__main__":
    sys.exit(main())
