"""LightningDataModule over prepared splits: transforms applied lazily, loaders sized from the machine."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler


def resolve_num_workers(value: Any) -> int:
    """'auto': one worker per core up to 8, keeping one core for the training loop."""
    if value in (None, "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    return int(value)


def balanced_sampler(labels: list[int]) -> WeightedRandomSampler:
    """Draws every class equally often (weights = 1 / class count), with replacement."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)


class Transformed(Dataset):
    """Applies a transform to (image, label) pairs of another dataset."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test loaders for already built datasets (images or cached features)."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset,
        batch_size: int,
        num_workers: Any = "auto",
        pin_memory: bool | None = None,
        balanced: bool = False,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.balanced = balanced
        self.batch_size = int(batch_size)
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        from finetune.data.datasets import dataset_labels

        sampler = balanced_sampler(dataset_labels(dataset)) if shuffle and self.balanced else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a last train batch of one image breaks BatchNorm in train mode (and is noise anyway)
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
