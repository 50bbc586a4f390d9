"""Check an image-folder tree before training: what is broken, what is merely odd, what stops a run.

A corrupt JPEG found in epoch 3, or a ``val/`` class the model was never trained on, costs a run;
decoding every file once up front costs seconds. ``check_image_tree`` looks and reports,
``apply_policy`` turns the report into a decision (files to skip, or a ``SetupError``), and the
folder dataset lists files with ``class_folders`` / ``image_files`` so both see the same tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.data.images import MAX_PIXELS, BadImageError, decode_rgb, is_image_file
from finetune.errors import SetupError

SPLITS = ("train", "val", "test")
FLAT = "all"  # split name used for a flat root/<class>/ tree, which the dataset splits itself
ON_BAD_IMAGE = ("skip", "error")
SHOWN = 5  # how many paths a one-paragraph message names before saying "and N more"
CANNOT_READ = "cannot read file"


@dataclass(frozen=True)
class BadFile:
    """An image-named file that cannot be decoded, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two files with identical bytes in places where that matters.

    ``kind`` is ``"across splits"`` (a test image also trained on: inflated test accuracy) or
    ``"across classes"`` (one picture with two labels).
    """

    first: Path
    second: Path
    kind: str


@dataclass(frozen=True)
class _FileResult:
    """What decoding one file found; made in worker threads, so it holds plain values only."""

    path: Path
    sha1: str
    mode: str | None
    error: str | None


@dataclass
class CheckReport:
    """Everything ``check_image_tree`` found. Paths are absolute, as ``Path.absolute()`` gives them."""

    root: Path
    layout: str  # "split" (root/train|val|test/<class>), "flat" (root/<class>) or "none"
    images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> readable
    bad: list[BadFile] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files in class folders without an image extension
    stray: list[Path] = field(default_factory=list)  # files or folders outside any class folder
    empty_classes: list[Path] = field(default_factory=list)  # class folders with no readable image
    unknown_classes: list[str] = field(default_factory=list)  # "val/zebra": not a train class
    missing_classes: list[str] = field(default_factory=list)  # "val/cat": train class absent there
    duplicates: list[DuplicatePair] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)  # original mode -> images converted to RGB
    problems: list[str] = field(default_factory=list)  # tree-level structural errors

    def bad_files(self) -> list[Path]:
        """Paths of files that cannot be decoded (the dataset skips or refuses them)."""
        return [bad.path for bad in self.bad]

    def errors(self) -> list[str]:
        """Structural problems that must stop a run, each a sentence that says how to fix it."""
        errors = list(self.problems)
        if self.empty_classes:
            errors.append(
                f"{_count(self.empty_classes, 'class folder')} without a single readable image: "
                f"{_names(map(self._relative, self.empty_classes))}. Every class needs at least one image: "
                "add images or delete the folder."
            )
        if self.unknown_classes:
            errors.append(
                f"{_count(self.unknown_classes, 'class')} in val/test that train does not have: "
                f"{_names(self.unknown_classes)}. A model can only predict classes it was trained on: "
                "add training images for them, or move those folders out of the tree."
            )
        return errors

    def warnings(self) -> list[str]:
        """Things a run survives but the user should know; unreadable files are ``apply_policy``'s."""
        warnings_ = []
        if self.missing_classes:
            warnings_.append(
                f"{_count(self.missing_classes, 'train class')} missing from val/test: "
                f"{_names(self.missing_classes)}; their accuracy there cannot be measured."
            )
        for kind, advice in (
            ("across splits", "the same picture is trained on and evaluated, inflating val/test accuracy"),
            ("across classes", "the same picture carries two labels"),
        ):
            pairs = [pair for pair in self.duplicates if pair.kind == kind]
            if pairs:
                shown = (f"{self._relative(p.first)} = {self._relative(p.second)}" for p in pairs)
                warnings_.append(f"{_count(pairs, 'duplicate file')} {kind} ({advice}): {_names(shown)}.")
        if self.ignored:
            warnings_.append(
                f"{_count(self.ignored, 'file')} without an image extension, ignored: "
                f"{_names(map(self._relative, self.ignored))}."
            )
        if self.stray:
            warnings_.append(
                f"{_count(self.stray, 'entry', 'entries')} outside any class folder, ignored: "
                f"{_names(map(self._relative, self.stray))}."
            )
        return warnings_

    def summary_lines(self) -> list[str]:
        """A few human lines: layout, classes and images per split, conversions."""
        lines = [f"{self.root} ({self.layout} layout)"]
        for split, counts in self.images.items():
            lines.append(f"{split}: {len(counts)} classes, {sum(counts.values())} readable images")
        lines.append(f"unreadable: {len(self.bad)}")
        if self.converted:
            modes = ", ".join(f"{mode} {n}" for mode, n in sorted(self.converted.items()))
            lines.append(f"converted to RGB on load (fine, for information): {modes}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: paths as strings, plus the derived errors and warnings."""
        data = _jsonable(asdict(self))
        data["errors"] = self.errors()
        data["warnings"] = self.warnings()
        return data

    def write(self, run_dir: Path | str) -> None:
        """Write ``bad_files.txt`` (path, tab, reason per line) and ``data_check.json`` to ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        bad_lines = "".join(f"{bad.path}\t{bad.reason}\n" for bad in self.bad)
        _write_atomic(run_dir / "bad_files.txt", bad_lines)
        _write_atomic(run_dir / "data_check.json", json.dumps(self.to_dict(), indent=2) + "\n")

    def _relative(self, path: Path) -> str:
        """A path shown relative to the root: shorter messages, same meaning."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def check_image_tree(
    root: Path | str,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    memo: Path | None = None,
) -> CheckReport:
    """Decode every image under ``root`` once and report what would break or mislead a run.

    ``root`` holds ``train/`` (and optionally ``val/``, ``test/``) with one folder per class, or
    class folders directly. Decoding runs on ``workers`` threads (Pillow and hashlib release the
    GIL); ``progress(done, total)`` is called after each file. With ``memo`` (a JSON file), files
    whose size and modification time match an earlier check are not decoded again: every job of a
    sweep over one dataset then pays for the decoding once.
    """
    root = Path(root).absolute()
    report = CheckReport(root=root, layout=_layout(root))
    if report.layout == "none":
        report.problems.append(_no_tree_problem(root))
        return report
    split_dirs = _split_dirs(root, report)
    files = _list_files(split_dirs, report)
    paths = [path for paths in files.values() for path in paths]
    stamps = {path: _stamp(path) for path in paths} if memo is not None else {}  # before reading, not after
    known = _read_memo(memo, max_pixels, stamps)
    todo = [p for p in paths if p not in known]
    results = {**known, **_decode_all(todo, max_pixels, workers, progress)}
    if memo is not None and todo:
        _write_memo(memo, max_pixels, results, stamps, changed=_changed_since(todo, stamps))
    _tally(files, results, report)
    _compare_classes(report)
    report.duplicates = _duplicates(files, results)
    return report


def apply_policy(report: CheckReport, on_bad_image: str) -> frozenset[Path]:
    """Files the dataset must leave out, or a ``SetupError`` when the run must not start.

    Structural errors always raise. Unreadable files raise under ``"error"`` and are returned
    under ``"skip"`` (``len()`` of the result is the count to log). Compare dataset paths with
    ``Path(p).absolute() in skipped``.
    """
    errors = report.errors()
    if errors:
        raise SetupError(
            f"The image folder {report.root} cannot be used: {' '.join(errors)} "
            f"Run `python -m finetune.check data=folder data.root={report.root}` to see the full report."
        )
    if on_bad_image not in ON_BAD_IMAGE:
        raise SetupError(
            f"data.on_bad_image={on_bad_image!r} is not a policy: use data.on_bad_image=skip to leave "
            "unreadable images out, or data.on_bad_image=error to stop when there are any."
        )
    if report.bad and on_bad_image == "error":
        shown = _names(f"{bad.path} ({bad.reason})" for bad in report.bad)
        raise SetupError(
            f"{_count(report.bad, 'unreadable image')} under {report.root}: {shown}. Fix or delete "
            "them, or rerun with data.on_bad_image=skip to train without them (the run lists them in "
            "bad_files.txt)."
        )
    return frozenset(report.bad_files())


def class_folders(split_dir: Path) -> list[str]:
    """Class names under ``split_dir``, sorted; hidden folders (``.ipynb_checkpoints``) are not classes."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not _hidden(entry.name))


def image_files(class_dir: Path) -> list[Path]:
    """Image-named files anywhere under ``class_dir``, sorted, following links like ImageFolder.

    Hidden files are left out (unlike ImageFolder): macOS ``._x.jpg`` files are not images.
    """
    return [path for path in _all_files(class_dir) if is_image_file(path)]


def _layout(root: Path) -> str:
    """``split`` when root has split folders, ``flat`` when it has other folders, else ``none``."""
    if not root.is_dir():
        return "none"
    names = {entry.name for entry in os.scandir(root) if entry.is_dir()}
    if names & set(SPLITS):
        return "split"
    return "flat" if any(not _hidden(name) for name in names) else "none"


def _no_tree_problem(root: Path) -> str:
    """Why ``root`` is no image tree at all, with the layouts it should have."""
    what = "is a folder with no class folders in it" if root.is_dir() else "does not exist or is not a folder"
    return (
        f"data.root={root} {what}. It should hold train/<class>/*.jpg (plus optional val/ and test/), "
        "or <class>/*.jpg directly; if it holds images itself, point data.root at the folder above."
    )


def _split_dirs(root: Path, report: CheckReport) -> dict[str, Path]:
    """Split name -> folder; records stray root entries and a val/test without train."""
    if report.layout == "flat":
        return {FLAT: root}
    splits = {name: root / name for name in SPLITS if (root / name).is_dir()}
    report.stray.extend(
        path for path in sorted(root.iterdir()) if path.name not in splits and not _hidden(path.name)
    )
    if "train" not in splits:
        report.problems.append(
            f"{root} has {' and '.join(f'{name}/' for name in splits)} but no train/ folder. Add "
            "train/<class>/ folders, or put all class folders directly under data.root and let the "
            "run split them by data.val_fraction / data.test_fraction."
        )
    return splits


def _list_files(split_dirs: dict[str, Path], report: CheckReport) -> dict[tuple[str, str], list[Path]]:
    """(split, class) -> image files; every class folder gets an entry, even an empty one."""
    files: dict[tuple[str, str], list[Path]] = {}
    for split, split_dir in split_dirs.items():
        classes = class_folders(split_dir)
        report.images[split] = {}
        report.stray.extend(
            path for path in sorted(split_dir.iterdir()) if path.is_file() and not _hidden(path.name)
        )
        for name in classes:
            every = _all_files(split_dir / name)
            files[split, name] = [path for path in every if is_image_file(path)]
            report.ignored.extend(path for path in every if not is_image_file(path))
        if len(classes) < 2 and split in ("train", FLAT):
            report.problems.append(_too_few_classes(split_dir, classes))
        elif not classes:
            report.problems.append(
                f"{split_dir} has no class folders. Add <class>/ folders to it, or delete it."
            )
    return files


def _too_few_classes(split_dir: Path, classes: Sequence[str]) -> str:
    """A classifier needs two classes; one usually means data.root points one level too deep."""
    found = f"only the class folder {classes[0]!r}" if classes else "no class folders"
    return (
        f"{split_dir} has {found}; a classifier needs at least two. If data.root points at a class "
        "folder, point it at the folder that holds all the class folders."
    )


def _decode_all(
    paths: Sequence[Path],
    max_pixels: int,
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> dict[Path, _FileResult]:
    """Decode every file once; Pillow's bomb warning is silenced because our own limit decides."""
    workers = workers or min(8, os.cpu_count() or 1)
    results: dict[Path, _FileResult] = {}
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for result in pool.map(lambda path: _decode_one(path, max_pixels), paths):
            results[result.path] = result
            if progress is not None:
                progress(len(results), len(paths))
    return results


def _stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_memo(memo: Path | None, max_pixels: int, stamps: dict[Path, list[int] | None]) -> dict[Path, _FileResult]:
    """Earlier results for files unchanged since (same size and mtime); a damaged memo counts as empty."""
    if memo is None or not memo.is_file():
        return {}
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if saved.get("max_pixels") != max_pixels:
            return {}
        entries = saved["files"]
        known = {}
        for path, stamp in stamps.items():
            entry = entries.get(str(path))
            if entry is not None and stamp is not None and entry[:2] == stamp:
                known[path] = _FileResult(path, entry[2], entry[3], entry[4])
        return known
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def _changed_since(paths: Sequence[Path], stamps: dict[Path, list[int] | None]) -> set[Path]:
    """Files whose size or mtime moved while they were checked (still being copied, say)."""
    return {path for path in paths if _stamp(path) != stamps.get(path)}


def _write_memo(memo: Path, max_pixels: int, results: dict[Path, _FileResult],
                stamps: dict[Path, list[int] | None], changed: set[Path]) -> None:
    """Remember results of files that did not change while they were checked. A file that could not be
    read at all (permissions, I/O) is not remembered: that is the environment, not the file."""
    files = {
        str(path): [*stamp, result.sha1, result.mode, result.error]
        for path, result in results.items()
        if (stamp := stamps.get(path)) is not None and path not in changed
        and not (result.error or "").startswith(CANNOT_READ)
    }
    memo.parent.mkdir(parents=True, exist_ok=True)
    temporary = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")  # parallel sweep jobs: last rename wins
    temporary.write_text(json.dumps({"max_pixels": max_pixels, "files": files}), encoding="utf-8")
    temporary.replace(memo)


def _decode_one(path: Path, max_pixels: int) -> _FileResult:
    """Read the bytes once, hash them for duplicates, and decode them fully."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return _FileResult(path, "", None, f"{CANNOT_READ}: {error.strerror or error}")
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        _, mode = decode_rgb(data, path, max_pixels)
    except BadImageError as error:
        return _FileResult(path, sha1, None, error.reason)
    return _FileResult(path, sha1, mode, None)


def _tally(
    files: dict[tuple[str, str], list[Path]], results: dict[Path, _FileResult], report: CheckReport
) -> None:
    """Fill per-class counts, bad files, empty classes and converted modes from the results."""
    converted: Counter[str] = Counter()
    for (split, name), paths in files.items():
        readable = [results[path] for path in paths if results[path].error is None]
        report.bad.extend(BadFile(path, results[path].error or "") for path in paths if results[path].error)
        report.images[split][name] = len(readable)
        converted.update(result.mode for result in readable if result.mode != "RGB")
        if not readable:
            report.empty_classes.append(report.root / _split_part(split) / name)
    report.converted = dict(sorted(converted.items()))


def _split_part(split: str) -> str:
    """The folder a split lives in, relative to the root ('' for a flat tree)."""
    return "" if split == FLAT else split


def _compare_classes(report: CheckReport) -> None:
    """val/test classes must be train classes (error); train classes absent there only warn."""
    train = set(report.images.get("train", {}))
    for split in ("val", "test"):
        if split not in report.images or not train:
            continue
        present = set(report.images[split])
        report.unknown_classes.extend(f"{split}/{name}" for name in sorted(present - train))
        report.missing_classes.extend(f"{split}/{name}" for name in sorted(train - present))


def _duplicates(
    files: dict[tuple[str, str], list[Path]], results: dict[Path, _FileResult]
) -> list[DuplicatePair]:
    """Identical bytes in two splits or two classes; each file is paired with its group's first.

    The first is taken from the earliest split (train before val before test), so each pair reads
    "this evaluation file is also a training file".
    """
    groups: dict[str, list[tuple[int, str, str, Path]]] = defaultdict(list)
    order = {split: index for index, split in enumerate((*SPLITS, FLAT))}
    for (split, name), paths in files.items():
        for path in paths:
            if results[path].sha1:
                groups[results[path].sha1].append((order[split], split, name, path))
    pairs = []
    for group in groups.values():
        _, first_split, first_class, first = min(group)
        for _, split, name, path in sorted(group)[1:]:
            if split != first_split:
                pairs.append(DuplicatePair(first, path, "across splits"))
            elif name != first_class:
                pairs.append(DuplicatePair(first, path, "across classes"))
    return sorted(pairs, key=lambda pair: (pair.first, pair.second))


def _all_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links followed, hidden names skipped), sorted."""
    found = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [name for name in dirs if not _hidden(name)]
        found.extend(Path(parent) / name for name in names if not _hidden(name))
    return sorted(found)


def _hidden(name: str) -> bool:
    """Dot-names are tool droppings, never data: .DS_Store, .ipynb_checkpoints, and macOS's
    ._photo.jpg resource forks, which carry an image extension but no image."""
    return name.startswith(".")


def _count(items: Sized, singular: str, plural: str | None = None) -> str:
    """'1 file' / '3 files' / '2 classes'."""
    n = len(items)
    plural = plural or singular + ("es" if singular.endswith("s") else "s")
    return f"{n} {singular if n == 1 else plural}"


def _names(items: Iterable[str]) -> str:
    """The first SHOWN items, then 'and N more', so a message stays one readable paragraph."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:SHOWN])
    return shown + (f", and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _jsonable(value: Any) -> Any:
    """Paths to strings, recursively, for json.dumps."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
