"""Dataset sources: each returns train/val/test splits of (PIL image, label) plus class names.

Transforms are applied later (by the datamodule), so the same split can feed the
augmented path, the eval path and the feature cache. ``write_splits_csv`` records which sample
went where (path, split, class, content hash).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from finetune.atomic import write_text_atomic
from finetune.data.checks import SPLITS, list_image_tree, sha256_files
from finetune.data.images import BadImageError, open_rgb
from finetune.errors import SetupError

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    # Identifies the data for cache keys: file lists or a dataset version string.
    fingerprint: str = ""
    skipped: list[str] = field(default_factory=list)
    # file -> SHA-256 of its bytes, where already known (the check's, or hashed to group copies);
    # split_rows() fills in the rest. Kept here, not on the datasets, so DataLoader workers never copy it.
    hashes: dict[Path, str] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ImageListDataset(Dataset):
    """Images held in memory (PIL) with integer labels."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int]) -> None:
        self.images = list(images)
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.images[i], self.labels[i]


class ImageFileDataset(Dataset):
    """Image files on disk; a file that turns bad mid-run is replaced by the next good one.

    Files known to be bad are removed before training by the data check; this only
    guards against files that change or break while the run goes on.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], loader: Callable[[Path], Image.Image] = open_rgb):
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.labels = [y for _, y in self.samples]
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(i + offset) % len(self.samples)]
            try:
                return self.loader(path), label
            except BadImageError as err:
                log.warning("skipping unreadable image %s (%s)", path, err)
        raise SetupError("No readable image is left in this split; run python -m finetune.check on the data.")


def use_decoder(splits: Splits, loader: Callable[[Path], Any]) -> None:
    """Decode the files of every split with ``loader`` (``data.decode``); in-memory sources have no files."""
    for dataset in (splits.train, splits.val, splits.test):
        if isinstance(dataset, ImageFileDataset):
            dataset.loader = loader


class TorchvisionDataset(Dataset):
    """A torchvision dataset (PIL, label) restricted to some indices."""

    def __init__(self, base: Any, indices: Sequence[int] | None = None) -> None:
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.base[self.indices[i]]
        return image.convert("RGB"), int(label)


def dataset_labels(dataset: Dataset) -> list[int]:
    """Labels of a split without decoding its images."""
    if hasattr(dataset, "labels"):
        return [int(y) for y in dataset.labels]
    if isinstance(dataset, TorchvisionDataset):
        targets = getattr(dataset.base, "targets", None) or getattr(dataset.base, "_labels", None)
        if targets is not None:
            return [int(targets[i]) for i in dataset.indices]
    if hasattr(dataset, "base"):
        return dataset_labels(dataset.base)
    return [int(dataset[i][1]) for i in range(len(dataset))]


def class_counts(dataset: Dataset, num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for y in dataset_labels(dataset):
        counts[y] += 1
    return counts


PART_NAMES = ("val", "test")  # what stratified_split's parts are called in its warnings


def stratified_split(
    labels: Sequence[int],
    fractions: Sequence[float],
    seed: int,
    groups: Sequence[Hashable] | None = None,
    names: Sequence[str] | None = None,
) -> list[list[int]]:
    """Index lists [rest, part1, part2, ...]: each part a stratified ``fraction`` of the whole.

    ``groups`` (one key per index, e.g. a content hash) keeps indices with one key on one side: the
    split is made over the groups, each labelled by its first index, then expanded. A class with
    fewer than two groups left cannot give one to a part and keep one: it stays in rest, and a warning
    names it (``names[label]``); the other classes stay stratified. Every class keeps one group in rest.
    """
    labels = np.asarray(labels, dtype=np.int64)
    keys = range(len(labels)) if groups is None else groups
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} groups for {len(labels)} labels")
    unit_of: dict[Hashable, int] = {}
    members: list[list[int]] = []
    for index, key in enumerate(keys):
        unit = unit_of.setdefault(key, len(members))
        if unit == len(members):
            members.append([])
        members[unit].append(index)
    unit_labels = labels[[group[0] for group in members]] if members else labels
    parts = _split_units(unit_labels, fractions, seed, names)
    return [sorted(index for unit in part for index in members[unit]) for part in parts]


def _split_units(labels: np.ndarray, fractions: Sequence[float], seed: int,
                 names: Sequence[str] | None) -> list[list[int]]:
    """stratified_split over units (an image, or a group of copies) that each carry one label."""
    total = len(labels)
    remaining = np.arange(total)
    parts: list[list[int]] = []
    for number, frac in enumerate(fractions):
        if not frac or frac <= 0:
            parts.append([])
            continue
        counts = Counter(labels[remaining].tolist())
        small = sorted(label for label, n in counts.items() if n < 2)
        if small:
            _warn_small(small, PART_NAMES[number] if number < len(PART_NAMES) else f"part {number + 1}", names)
        eligible = remaining[~np.isin(labels[remaining], small)] if small else remaining
        size = max(round(frac * total), len(np.unique(labels[eligible])))
        if size >= len(eligible):
            raise SetupError(
                f"Split fraction {frac} leaves no training data ({total} images). Lower "
                f"data.val_fraction / data.test_fraction."
            )
        try:
            rest, part = train_test_split(eligible, test_size=size, stratify=labels[eligible], random_state=seed)
        except ValueError:  # too few left for train to hold every class: share out by hand
            rest, part = _allocate(eligible, labels, size, seed, frac, total)
        rest, part = _keep_one_in_rest(rest, part, labels)
        parts.append(sorted(part.tolist()))
        remaining = np.concatenate([rest, remaining[np.isin(labels[remaining], small)]]) if small else rest
    return [sorted(remaining.tolist()), *parts]


def _warn_small(small: Sequence[int], part: str, names: Sequence[str] | None) -> None:
    shown = ", ".join(repr(names[label]) if names is not None else str(label) for label in small)
    log.warning(
        "%d class(es) with fewer than 2 distinct images left cannot give any to %s: %s. All their images "
        "stay in train, so %s does not measure them; add images to them, or provide a %s/ folder.",
        len(small), part, shown, part, part,
    )


def _allocate(units: np.ndarray, labels: np.ndarray, size: int, seed: int, frac: float,
              total: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part): ``size`` units, shared out over classes by their share, at least one left per class."""
    rng = np.random.RandomState(seed)
    by_class = {c: rng.permutation(units[labels[units] == c]) for c in np.unique(labels[units]).tolist()}
    room = {c: len(members) - 1 for c, members in by_class.items()}
    if size > sum(room.values()):
        raise SetupError(
            f"Split fraction {frac} leaves too little training data ({total} images, {len(by_class)} classes "
            "that each need one in train). Lower data.val_fraction / data.test_fraction."
        )
    share = {c: size * len(members) / len(units) for c, members in by_class.items()}
    take = {c: min(room[c], int(share[c])) for c in by_class}
    order = sorted(by_class, key=lambda c: (int(share[c]) - share[c], c))  # largest remainder first
    while sum(take.values()) < size:
        for c in order:
            if take[c] < room[c] and sum(take.values()) < size:
                take[c] += 1
    part = np.concatenate([by_class[c][: take[c]] for c in by_class])
    rest = np.concatenate([by_class[c][take[c]:] for c in by_class])
    return rest, part


def _keep_one_in_rest(rest: np.ndarray, part: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move one unit back to rest for any class the part took completely."""
    lost = set(labels[part].tolist()) - set(labels[rest].tolist())
    if not lost:
        return rest, part
    back = [next(i for i, unit in enumerate(part) if labels[unit] == c) for c in sorted(lost)]
    return np.concatenate([rest, part[back]]), np.delete(part, back)


def load_digits_splits(cfg: Any) -> Splits:
    """scikit-learn's 8x8 digits: a real dataset that ships with the library (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    labels = digits.target.tolist()
    train_idx, val_idx, test_idx = stratified_split(
        labels, [cfg.val_fraction, cfg.test_fraction], int(cfg.split_seed)
    )

    def subset(idx: list[int]) -> ImageListDataset:
        return ImageListDataset([images[i] for i in idx], [labels[i] for i in idx])

    classes = [str(c) for c in digits.target_names]
    fingerprint = f"sklearn-digits:{len(labels)}:{cfg.val_fraction}:{cfg.test_fraction}:{cfg.split_seed}"
    return Splits(subset(train_idx), subset(val_idx), subset(test_idx), classes, fingerprint)


def load_folder_splits(
    cfg: Any, skip: set[Path] | None = None, hashes: Mapping[Path, str] | None = None
) -> Splits:
    """A user's ImageFolder tree: train/ val/ test/ subfolders, or one folder split by fractions.

    Files are listed as the data check lists them (``list_image_tree``: each real file once, no link
    loops). An automatic split keeps byte-identical copies on one side; ``hashes`` (listed path ->
    SHA-256, e.g. ``CheckReport.hashes``) saves reading the files again, and without it only files
    whose size another file shares are read and hashed here.
    """
    if cfg.root is None or str(cfg.root) in ("", "???"):
        raise SetupError("data=folder needs data.root=/path/to/images (class subfolders inside).")
    root = Path(str(cfg.root)).expanduser().absolute()
    if not root.is_dir():
        raise SetupError(f"data.root='{root}' does not exist or is not a folder.")
    skip = skip or set()
    known = {Path(p): h for p, h in (hashes or {}).items() if h}
    listing = list_image_tree(root)
    seed = int(cfg.split_seed)

    def keep(paths: list[Path]) -> list[Path]:
        return [p for p in paths if p not in skip]

    if listing.layout == "split":
        per_split: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS if (root / s).is_dir()}
        for (split, name), paths in listing.files.items():
            per_split[split][name] = paths
        if "train" not in per_split:
            raise SetupError(
                f"data.root='{root}' has {' and '.join(f'{s}/' for s in per_split)} but no train/ folder. Add "
                "train/<class>/ folders, or put all class folders directly under data.root."
            )
        classes = sorted(per_split["train"])
        index = {c: i for i, c in enumerate(classes)}
        missing = {s: sorted(set(d) - set(classes)) for s, d in per_split.items() if set(d) - set(classes)}
        if missing:
            raise SetupError(
                f"Classes {missing} appear in val/test but not in {root / 'train'}: the model "
                f"cannot learn them. Add training images for them or remove those folders."
            )
        samples = {
            s: [(p, index[c]) for c, paths in d.items() for p in keep(paths)] for s, d in per_split.items()
        }
        train = samples["train"]
        fractions = [cfg.val_fraction if "val" not in samples else 0.0,
                     cfg.test_fraction if "test" not in samples else 0.0]
        groups = _content_keys([p for p, _ in train], known) if any((f or 0) > 0 for f in fractions) else None
        rest, val_idx, test_idx = stratified_split([y for _, y in train], fractions, seed, groups, classes)
        val = samples.get("val") or [train[i] for i in val_idx]
        test = samples.get("test") or [train[i] for i in test_idx]
        train = [train[i] for i in rest]
    else:
        found = {name: paths for (_, name), paths in listing.files.items()}
        classes = sorted(found)
        all_samples = [(p, i) for i, c in enumerate(classes) for p in keep(found[c])]
        groups = _content_keys([p for p, _ in all_samples], known)
        rest, val_idx, test_idx = stratified_split(
            [y for _, y in all_samples], [cfg.val_fraction, cfg.test_fraction], seed, groups, classes
        )
        train, val, test = ([all_samples[i] for i in idx] for idx in (rest, val_idx, test_idx))
    if len(classes) < 2:
        raise SetupError(f"data.root='{root}' has {len(classes)} class folder(s); at least 2 are needed.")
    _refuse_small_classes(classes, [y for split in (train, val, test) for _, y in split],
                          getattr(cfg, "min_per_class", None), root)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if not split:
            raise SetupError(f"The {name} split under '{root}' is empty; add images or change the fractions.")
    fingerprint = "|".join(
        f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}:{y}" for split in (train, val, test) for p, y in split
    )
    used = {p: known[p] for split in (train, val, test) for p, _ in split if p in known}
    return Splits(ImageFileDataset(train), ImageFileDataset(val), ImageFileDataset(test), classes, fingerprint,
                  hashes=used)


def _refuse_small_classes(classes: Sequence[str], labels: Sequence[int], minimum: int | None, root: Path) -> None:
    """``data.min_per_class``: refuse a tree where some class has fewer usable images than that."""
    if not minimum:
        return
    counts = Counter(labels)
    small = {name: counts.get(i, 0) for i, name in enumerate(classes) if counts.get(i, 0) < minimum}
    if small:
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(small.items()))
        raise SetupError(f"data.min_per_class={minimum}: under '{root}' these classes have fewer usable images: "
                         f"{listed}. Add images, remove those class folders, or lower data.min_per_class.")


def _content_keys(paths: Sequence[Path], known: dict[Path, str]) -> list[str]:
    """One key per file, equal for byte-identical files: the SHA-256 where ``known``, or where the file's
    size is shared by another file (hashed here and added to ``known``); else the path itself, since a
    file of a size no other file has cannot be a copy."""
    missing = [p for p in paths if p not in known]
    if missing:
        sizes = {p: _size(p) for p in paths}
        shared = Counter(sizes.values())
        hashed = sha256_files([p for p in missing if shared[sizes[p]] > 1])
        known.update((p, digest) for p, digest in hashed.items() if digest)
    return [known.get(p) or f"file:{p}" for p in paths]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _missing_download(name: str, root: Path, files: str, err: Exception) -> SetupError:
    return SetupError(
        f"The {name} dataset is not in '{root}' and could not be downloaded ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:150] if str(err) else 'no network'}). Put {files} into that folder "
        f"(or set data.root=...), or train offline on data=digits or your own data=folder data.root=..."
    )


def load_flowers102_splits(cfg: Any) -> Splits:
    """Oxford Flowers-102 with its official train/val/test split."""
    from torchvision.datasets import Flowers102

    root = Path(str(cfg.root)).expanduser()
    try:
        parts = {s: Flowers102(str(root), split=s, download=bool(cfg.download)) for s in ("train", "val", "test")}
    except (RuntimeError, OSError) as err:
        raise _missing_download(
            "Flowers-102", root / "flowers-102", "102flowers.tgz (extracted to jpg/), imagelabels.mat and setid.mat",
            err,
        ) from None
    classes = list(getattr(parts["train"], "classes", [])) or [f"class_{i:03d}" for i in range(102)]
    return Splits(*(TorchvisionDataset(parts[s]) for s in ("train", "val", "test")), classes,
                  fingerprint="torchvision-flowers102-official")


def load_cifar10_splits(cfg: Any) -> Splits:
    """CIFAR-10; val is a stratified slice of the official train split."""
    from torchvision.datasets import CIFAR10

    root = Path(str(cfg.root)).expanduser()
    try:
        train = CIFAR10(str(root), train=True, download=bool(cfg.download))
        test = CIFAR10(str(root), train=False, download=bool(cfg.download))
    except (RuntimeError, OSError) as err:
        raise _missing_download("CIFAR-10", root, "cifar-10-python.tar.gz (extracted)", err) from None
    rest, val_idx = stratified_split(train.targets, [cfg.val_fraction], int(cfg.split_seed))
    return Splits(TorchvisionDataset(train, rest), TorchvisionDataset(train, val_idx), TorchvisionDataset(test),
                  list(train.classes), fingerprint=f"torchvision-cifar10:{cfg.val_fraction}:{cfg.split_seed}")


SOURCES: dict[str, Callable[..., Splits]] = {
    "digits": load_digits_splits,
    "folder": load_folder_splits,
    "flowers102": load_flowers102_splits,
    "cifar10": load_cifar10_splits,
}


SPLIT_COLUMNS = ("path", "split", "label", "sha256")


def split_rows(splits: Splits) -> list[dict[str, str]]:
    """One row per sample of train, val and test, in dataset order, with the keys in SPLIT_COLUMNS.

    ``path`` is the image file (as listed: absolute), or the sample's index for in-memory and
    torchvision datasets (the index into the torchvision dataset, not into the split); ``label`` is
    the class name; ``sha256`` is of the file's bytes (files whose hash the check or the split knew are
    not read again; the others are read here and remembered in ``splits.hashes``), of the pixels for
    in-memory images, and '' for torchvision datasets.
    """
    rows: list[dict[str, str]] = []
    for split in ("train", "val", "test"):
        dataset = getattr(splits, split)
        if isinstance(dataset, ImageFileDataset):
            paths = [p for p, _ in dataset.samples]
            splits.hashes.update(sha256_files([p for p in dict.fromkeys(paths) if not splits.hashes.get(p)]))
            entries = [(str(p), splits.hashes.get(p, "")) for p in paths]
        elif isinstance(dataset, ImageListDataset):
            entries = [(str(i), _pixels_sha256(image)) for i, image in enumerate(dataset.images)]
        elif isinstance(dataset, TorchvisionDataset):
            entries = [(str(i), "") for i in dataset.indices]
        else:
            entries = [(str(i), "") for i in range(len(dataset))]
        labels = dataset_labels(dataset)
        rows.extend(
            dict(zip(SPLIT_COLUMNS, (path, split, splits.classes[label], digest), strict=True))
            for (path, digest), label in zip(entries, labels, strict=True)
        )
    return rows


def write_splits_csv(splits: Splits, path: Path | str) -> Path:
    """Write ``split_rows(splits)`` as CSV (header SPLIT_COLUMNS) to ``path``, atomically; returns the path."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SPLIT_COLUMNS)
    writer.writeheader()
    writer.writerows(split_rows(splits))
    return write_text_atomic(path, text.getvalue())


def _pixels_sha256(image: Image.Image) -> str:
    """SHA-256 of an in-memory image's mode, size and pixels: equal pictures, equal hashes."""
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_splits(cfg: Any, **kwargs: Any) -> Splits:
    name = str(cfg.name)
    if name not in SOURCES:
        raise SetupError(f"Unknown data '{name}'. Choose one of: {', '.join(SOURCES)}.")
    return SOURCES[name](cfg, **kwargs)
