"""Dataset sources: each returns train/val/test splits of (PIL image, label) plus class names.

Transforms are applied later (by the datamodule), so the same split can feed the
augmented path, the eval path and the feature cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from finetune.data.checks import class_folders, image_files
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


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Index lists [rest, part1, part2, ...]: each part a stratified ``fraction`` of the whole."""
    indices = np.arange(len(labels))
    labels = np.asarray(labels)
    parts: list[list[int]] = []
    remaining, remaining_labels = indices, labels
    total = len(labels)
    for frac in fractions:
        if frac <= 0:
            parts.append([])
            continue
        size = max(round(frac * total), len(np.unique(labels)))
        if size >= len(remaining):
            raise SetupError(
                f"Split fraction {frac} leaves no training data ({total} images). Lower "
                f"data.val_fraction / data.test_fraction."
            )
        try:
            rest, part = train_test_split(
                remaining, test_size=size, stratify=remaining_labels, random_state=seed
            )
        except ValueError:  # a class with a single image cannot be stratified
            rest, part = train_test_split(remaining, test_size=size, random_state=seed)
        parts.append(sorted(part.tolist()))
        remaining, remaining_labels = rest, labels[rest]
    return [sorted(remaining.tolist()), *parts]


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


def _list_class_folder(folder: Path) -> dict[str, list[Path]]:
    """Class name -> image files, listed exactly as the data check lists them."""
    return {c: image_files(folder / c) for c in class_folders(folder)}


def load_folder_splits(cfg: Any, skip: set[Path] | None = None) -> Splits:
    """A user's ImageFolder tree: train/ val/ test/ subfolders, or one folder split by fractions."""
    if cfg.root is None or str(cfg.root) in ("", "???"):
        raise SetupError("data=folder needs data.root=/path/to/images (class subfolders inside).")
    root = Path(str(cfg.root)).expanduser().absolute()
    if not root.is_dir():
        raise SetupError(f"data.root='{root}' does not exist or is not a folder.")
    skip = skip or set()

    def keep(paths: list[Path]) -> list[Path]:
        return [p for p in paths if p not in skip]

    if (root / "train").is_dir():
        per_split = {s: _list_class_folder(root / s) for s in ("train", "val", "test") if (root / s).is_dir()}
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
        rest, val_idx, test_idx = stratified_split([y for _, y in train], fractions, int(cfg.split_seed))
        val = samples.get("val") or [train[i] for i in val_idx]
        test = samples.get("test") or [train[i] for i in test_idx]
        train = [train[i] for i in rest]
    else:
        found = _list_class_folder(root)
        classes = sorted(found)
        all_samples = [(p, i) for i, c in enumerate(classes) for p in keep(found[c])]
        rest, val_idx, test_idx = stratified_split(
            [y for _, y in all_samples], [cfg.val_fraction, cfg.test_fraction], int(cfg.split_seed)
        )
        train, val, test = ([all_samples[i] for i in idx] for idx in (rest, val_idx, test_idx))
    if len(classes) < 2:
        raise SetupError(f"data.root='{root}' has {len(classes)} class folder(s); at least 2 are needed.")
    for name, split in (("train", train), ("val", val), ("test", test)):
        if not split:
            raise SetupError(f"The {name} split under '{root}' is empty; add images or change the fractions.")
    fingerprint = "|".join(
        f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}:{y}" for split in (train, val, test) for p, y in split
    )
    return Splits(ImageFileDataset(train), ImageFileDataset(val), ImageFileDataset(test), classes, fingerprint)


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


def load_splits(cfg: Any, **kwargs: Any) -> Splits:
    name = str(cfg.name)
    if name not in SOURCES:
        raise SetupError(f"Unknown data '{name}'. Choose one of: {', '.join(SOURCES)}.")
    return SOURCES[name](cfg, **kwargs)
