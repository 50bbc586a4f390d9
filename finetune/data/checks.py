"""Check an image-folder tree before training: what is broken, what is merely odd, what stops a run.

A corrupt JPEG found in epoch 3, or a ``val/`` class the model was never trained on, costs a run;
decoding every file once up front costs seconds. ``check_image_tree`` looks and reports,
``apply_policy`` turns the report into a decision (files to skip, or a ``SetupError``), and the
folder dataset lists files with ``list_image_tree`` (as the check does) so both see the same tree:
every real file once, however many symbolic links lead to it, and no link followed round a loop.
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

from finetune.atomic import write_json_atomic, write_text_atomic
from finetune.data.images import JPEG_MAGIC, MAX_ASPECT, MAX_PIXELS, BadImageError, decode_rgb, is_image_file
from finetune.errors import SetupError

SPLITS = ("train", "val", "test")
FLAT = "all"  # split name used for a flat root/<class>/ tree, which the dataset splits itself
ON_BAD_IMAGE = ("skip", "error")
SHOWN = 5  # how many paths a one-paragraph message names before saying "and N more"
CANNOT_READ = "cannot read file"
HASH = "sha256"  # content hash of every file: duplicates, split groups, splits.csv

# Why a symbolic link was not followed (a folder) or not counted (a file already listed).
LOOP = "loops back into a folder above it"
OUTSIDE = "leads outside data.root"
RELISTED = "leads to a file or folder already listed"

# libjpeg, meeting the end marker before a baseline JPEG's data is complete, decodes the missing blocks as all-zero
# coefficients, exact mid-grey, without an error ("premature end of data segment" goes to stderr, unnamed): a cut-off
# file that still ends in FF D9 decodes with a grey band across its stored bottom. GREY_BAND rows of exact GREY_FILL
# along a whole edge (any edge: EXIF may turn the stored bottom) is what the check reports.
GREY_FILL = 128
GREY_BAND = 8


@dataclass(frozen=True)
class BadFile:
    """An image-named file that cannot be decoded, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class SkippedLink:
    """A symbolic link the listing did not follow (folders) or did not count again (files), and why.

    ``target`` is where the link resolves to; for a file already listed, the path it is listed under.
    """

    path: Path
    target: Path
    reason: str  # LOOP, OUTSIDE or RELISTED


@dataclass
class TreeListing:
    """An image tree as both the check and the folder dataset read it: every real file once."""

    layout: str  # as CheckReport.layout
    files: dict[tuple[str, str], list[Path]]  # (split, class) -> image files; empty classes included
    ignored: list[Path] = field(default_factory=list)  # files in class folders without an image extension
    links: list[SkippedLink] = field(default_factory=list)


@dataclass(frozen=True)
class DuplicatePair:
    """Two files with identical bytes in places where that matters.

    ``kind`` is ``"across splits"`` (a test image also trained on: inflated test accuracy),
    ``"across classes"`` (one picture with two labels) or ``"within a class"`` (a copy that weighs
    twice; an automatic split keeps such copies on one side).
    """

    first: Path
    second: Path
    kind: str


@dataclass(frozen=True)
class _FileResult:
    """What decoding one file found; made in worker threads, so it holds plain values only."""

    path: Path
    sha256: str
    mode: str | None
    error: str | None
    grey_edge: bool = False  # a JPEG with an edge band of decoder fill (see GREY_FILL)


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
    links: list[SkippedLink] = field(default_factory=list)  # symbolic links not followed or not counted
    converted: dict[str, int] = field(default_factory=dict)  # original mode -> images converted to RGB
    grey_edges: list[Path] = field(default_factory=list)  # JPEGs that may be cut off (GREY_FILL): used, named
    problems: list[str] = field(default_factory=list)  # tree-level structural errors
    # listed file -> SHA-256 of its bytes (every file that could be read); not written to data_check.json.
    # Pass it to load_folder_splits(hashes=...) so the split groups copies without reading the files again.
    hashes: dict[Path, str] = field(default_factory=dict, repr=False)

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
            ("within a class", "each copy weighs extra in training and in the counts; an automatic split "
             "keeps copies on one side"),
        ):
            pairs = [pair for pair in self.duplicates if pair.kind == kind]
            if pairs:
                shown = (f"{self._relative(p.first)} = {self._relative(p.second)}" for p in pairs)
                warnings_.append(f"{_count(pairs, 'duplicate file')} {kind} ({advice}): {_names(shown)}.")
        for reason, what in (
            (LOOP, "not followed (following one would list the same files again and again, under the wrong class)"),
            (OUTSIDE, "not followed (put those files inside the tree, or link them one by one)"),
            (RELISTED, "counted once"),
        ):
            links = [link for link in self.links if link.reason == reason]
            if links:
                shown = (f"{self._relative(link.path)} -> {self._relative(link.target)}" for link in links)
                warnings_.append(f"{_count(links, 'symbolic link')} {what}, each {reason}: {_names(shown)}.")
        if self.grey_edges:
            warnings_.append(
                f"{_count(self.grey_edges, 'JPEG file')} with a band of exact grey ({GREY_FILL}, {GREY_FILL}, "
                f"{GREY_FILL}) along a whole edge, what a decoder fills in where a JPEG's data stops early (a "
                f"cut-off file that still ends in an end marker decodes without an error): "
                f"{_names(map(self._relative, self.grey_edges))}. Open them: replace the cut-off ones (they train "
                "as half-grey pictures); grey padding that is really there is fine."
            )
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
        del data["hashes"]  # one line per file: the report stays readable
        data["errors"] = self.errors()
        data["warnings"] = self.warnings()
        return data

    def write(self, run_dir: Path | str) -> None:
        """Write ``bad_files.txt`` (path, tab, reason per line) and ``data_check.json`` to ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        bad_lines = "".join(f"{bad.path}\t{bad.reason}\n" for bad in self.bad)
        write_text_atomic(run_dir / "bad_files.txt", bad_lines)
        write_json_atomic(run_dir / "data_check.json", self.to_dict())

    def _relative(self, path: Path) -> str:
        """A path shown relative to the root: shorter messages, same meaning."""
        for root in (self.root, self.root.resolve()):  # link targets are resolved paths
            try:
                return str(path.relative_to(root))
            except ValueError:
                pass
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
    report.hashes = {path: result.sha256 for path, result in results.items() if result.sha256}
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
    """Class names under ``split_dir``, sorted; hidden folders (``.ipynb_checkpoints``) are not classes,
    nor is a link back to ``split_dir`` or a folder above it."""
    return _class_entries(Path(split_dir))[0]


def image_files(class_dir: Path, root: Path | None = None) -> list[Path]:
    """Image-named files anywhere under ``class_dir``, sorted, each real file once.

    Folder links are followed like ImageFolder does, except one that loops back into a folder above
    it or leads outside ``root`` (default: ``class_dir`` itself); a file reached twice through links
    is listed once. Hidden files are left out (unlike ImageFolder): macOS ``._x.jpg`` files are not images.
    """
    class_dir = Path(class_dir)
    root = class_dir if root is None else Path(root)
    entries = [("", "", *found) for found in _walk(class_dir, root, root.resolve(), [])]
    return [entry[2] for entry in _dedupe(entries, []) if is_image_file(entry[2])]


def list_image_tree(root: Path | str) -> TreeListing:
    """The tree under ``root`` exactly as ``check_image_tree`` lists it (used by the folder dataset).

    Split layout when ``root`` has train/, val/ or test/ (split names as in SPLITS), else flat (split
    FLAT). Paths are ``Path(root).absolute()`` / ...; the structural problems are the check's to report.
    """
    root = Path(root).absolute()
    layout = _layout(root)
    if layout == "none":
        return TreeListing(layout, {})
    split_dirs = {FLAT: root} if layout == "flat" else {s: root / s for s in SPLITS if (root / s).is_dir()}
    listing = _list_tree(root, split_dirs)
    listing.layout = layout
    return listing


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (the check's content hash); '' when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path], workers: int | None = None) -> dict[Path, str]:
    """``file_sha256`` of many files on ``workers`` threads (hashlib releases the GIL)."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(file_sha256, paths), strict=True))


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
    listing = _list_tree(report.root, split_dirs)
    report.ignored.extend(listing.ignored)
    report.links.extend(listing.links)
    for split, split_dir in split_dirs.items():
        classes = [name for part, name in listing.files if part == split]
        report.images[split] = {}
        report.stray.extend(
            path for path in sorted(split_dir.iterdir()) if path.is_file() and not _hidden(path.name)
        )
        if len(classes) < 2 and split in ("train", FLAT):
            report.problems.append(_too_few_classes(split_dir, classes))
        elif not classes:
            report.problems.append(
                f"{split_dir} has no class folders. Add <class>/ folders to it, or delete it."
            )
    return listing.files


def _list_tree(root: Path, split_dirs: dict[str, Path]) -> TreeListing:
    """Walk every class folder; a real file reached by several paths is kept once (see ``_dedupe``)."""
    real_root = root.resolve()
    links: list[SkippedLink] = []
    entries: list[_Entry] = []
    classes: list[tuple[str, str]] = []
    for split, split_dir in split_dirs.items():
        names, loops = _class_entries(split_dir)
        links.extend(loops)
        for name in names:
            classes.append((split, name))
            entries.extend((split, name, *found) for found in _walk(split_dir / name, root, real_root, links))
    listing = TreeListing("", {key: [] for key in classes}, links=links)
    for split, name, path, _, _ in _dedupe(entries, links):
        if is_image_file(path):
            listing.files[split, name].append(path)
        else:
            listing.ignored.append(path)
    return listing


def _class_entries(split_dir: Path) -> tuple[list[str], list[SkippedLink]]:
    """Class folder names under ``split_dir``, and links there that point back at it or above it."""
    real = split_dir.resolve()
    names, loops = [], []
    for entry in os.scandir(split_dir):
        if _hidden(entry.name) or not entry.is_dir():
            continue
        if entry.is_symlink():
            target = Path(entry.path).resolve()
            if target == real or real.is_relative_to(target):
                loops.append(SkippedLink(split_dir / entry.name, target, LOOP))
                continue
        names.append(entry.name)
    return sorted(names), sorted(loops, key=lambda link: link.path)


def _walk(folder: Path, root: Path, real_root: Path,
          links: list[SkippedLink]) -> list[tuple[Path, Path | None, bool]]:
    """(listed path, real path, reached through a link) of every file under ``folder``, sorted.

    Folder links are followed unless they loop back into a folder above (``ln -s .. loop`` would list
    the tree again and again, under the wrong class), lead outside the real ``root`` and ``folder``,
    or lead to a folder this walk already went through; those are appended to ``links``. The real
    path of a broken link is None (its read fails, and the check reports it unreadable).
    """
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):  # a link loop Path.resolve() itself refuses
        return []
    try:
        linked = real != real_root / folder.relative_to(root)
    except ValueError:
        linked = True
    bases = (real_root, real)
    visited = {real}
    found: list[tuple[Path, Path | None, bool]] = []
    stack = [(folder, real, linked, (real,))]
    while stack:
        listed_dir, real_dir, linked, chain = stack.pop()
        try:
            with os.scandir(listed_dir) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError:  # as os.walk: an unreadable folder is left out
            continue
        for entry in entries:
            if _hidden(entry.name):
                continue
            path = listed_dir / entry.name
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    visited.add(real_dir / entry.name)
                    stack.append((path, real_dir / entry.name, linked, (*chain, real_dir / entry.name)))
                else:
                    found.append((path, real_dir / entry.name, linked))
                continue
            try:
                target = path.resolve(strict=True)
            except (OSError, RuntimeError):
                found.append((path, None, True))
                continue
            if not target.is_dir():
                found.append((path, target, True))
            elif any(target == seen or seen.is_relative_to(target) for seen in chain):
                links.append(SkippedLink(path, target, LOOP))
            elif not any(target.is_relative_to(base) for base in bases):
                links.append(SkippedLink(path, target, OUTSIDE))
            elif target in visited:
                links.append(SkippedLink(path, target, RELISTED))
            else:
                visited.add(target)
                stack.append((path, target, True, (*chain, target)))
    return sorted(found, key=lambda item: item[0])


_Entry = tuple[str, str, Path, Path | None, bool]  # split, class, listed path, real path, reached via a link


def _dedupe(entries: list[_Entry], links: list[SkippedLink]) -> list[_Entry]:
    """Each real file once: a path without links beats one through a link, else the first listed wins
    (train before val before test, classes and paths sorted). The others go to ``links``."""
    owner: dict[Path, int] = {}
    for index, (_, _, _, real, linked) in enumerate(entries):
        if real is not None:
            first = owner.setdefault(real, index)
            if entries[first][4] and not linked:
                owner[real] = index
    kept = []
    for index, entry in enumerate(entries):
        real = entry[3]
        if real is None or owner[real] == index:
            kept.append(entry)
        else:
            links.append(SkippedLink(entry[2], entries[owner[real]][2], RELISTED))
    return kept


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
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for result in pool.map(lambda path: _decode_one(path, max_pixels), paths):
                results[result.path] = result
                if progress is not None:
                    progress(len(results), len(paths))
    finally:  # stopped (SIGTERM, Ctrl-C): the queued files are not decoded first
        pool.shutdown(wait=True, cancel_futures=True)
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
        if saved.get("rules") != _memo_rules(max_pixels):  # another limit, hash, or a memo from before
            return {}
        entries = saved["files"]
        known = {}
        for path, stamp in stamps.items():
            entry = entries.get(str(path))
            if entry is not None and stamp is not None and entry[:2] == stamp:
                known[path] = _FileResult(path, entry[2], entry[3], entry[4], bool(entry[5]))
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
        str(path): [*stamp, result.sha256, result.mode, result.error, result.grey_edge]
        for path, result in results.items()
        if (stamp := stamps.get(path)) is not None and path not in changed
        and not (result.error or "").startswith(CANNOT_READ)
    }
    try:  # each writer its own temp file: parallel sweep jobs, last rename wins
        write_text_atomic(memo, json.dumps({"rules": _memo_rules(max_pixels), "files": files}))
    except OSError as err:
        raise SetupError(f"cache.dir cannot hold the data check's memo {memo} ({err.strerror or err}): set "
                         f"cache.dir=... (or FINETUNE_CACHE) to a writable folder.") from None


def _memo_rules(max_pixels: int) -> dict[str, Any]:
    """What a remembered result depends on besides the file: a memo made under other rules is not used."""
    return {"max_pixels": max_pixels, "max_aspect": MAX_ASPECT, "hash": HASH, "grey_band": [GREY_FILL, GREY_BAND]}


def _decode_one(path: Path, max_pixels: int) -> _FileResult:
    """Read the bytes once, hash them for duplicates, and decode them fully."""
    try:
        data = path.read_bytes()
    except OSError as error:
        return _FileResult(path, "", None, f"{CANNOT_READ}: {error.strerror or error}")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        image, mode = decode_rgb(data, path, max_pixels)
    except BadImageError as error:
        return _FileResult(path, sha256, None, error.reason)
    return _FileResult(path, sha256, mode, None, data.startswith(JPEG_MAGIC) and grey_edge(image))


def grey_edge(image: Image.Image) -> bool:
    """Whether GREY_BAND rows (or columns) along one whole edge of ``image`` are exactly GREY_FILL in every
    channel: a JPEG's decoder fill where its data stopped early (GREY_FILL)."""
    width, height = image.size
    if width < 2 * GREY_BAND or height < 2 * GREY_BAND:
        return False
    bands = ((0, height - GREY_BAND, width, height), (0, 0, width, GREY_BAND),
             (0, 0, GREY_BAND, height), (width - GREY_BAND, 0, width, height))
    fill = (GREY_FILL, GREY_FILL)
    return any(all(extrema == fill for extrema in image.crop(band).getextrema()) for band in bands)


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
        report.grey_edges.extend(result.path for result in readable if result.grey_edge)
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
    """Identical bytes in two splits, two classes or one class; each file is paired with its group's first.

    The first is taken from the earliest split (train before val before test), so each pair reads
    "this evaluation file is also a training file".
    """
    groups: dict[str, list[tuple[int, str, str, Path]]] = defaultdict(list)
    order = {split: index for index, split in enumerate((*SPLITS, FLAT))}
    for (split, name), paths in files.items():
        for path in paths:
            if results[path].sha256:
                groups[results[path].sha256].append((order[split], split, name, path))
    pairs = []
    for group in groups.values():
        _, first_split, first_class, first = min(group)
        for _, split, name, path in sorted(group)[1:]:
            if split != first_split:
                pairs.append(DuplicatePair(first, path, "across splits"))
            elif name != first_class:
                pairs.append(DuplicatePair(first, path, "across classes"))
            else:
                pairs.append(DuplicatePair(first, path, "within a class"))
    return sorted(pairs, key=lambda pair: (pair.first, pair.second))


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
