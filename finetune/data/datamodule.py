"""LightningDataModule over prepared splits: transforms applied lazily, loaders sized from the machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.errors import SetupError

log = logging.getLogger(__name__)


def resolve_num_workers(value: Any) -> int:
    """'auto': one worker per core up to 8, keeping one core for the training loop."""
    if value in (None, "auto"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    return int(value)


class EpochSampler(Sampler[int]):
    """Train order drawn from (seed, epoch) alone, never from the global RNG.

    With the global RNG, how many numbers the loaders draw (one per iterator, and persistent
    workers create fewer iterators) decided the shuffle of later epochs, so a cached run and an
    uncached one, or runs with different ``num_workers``, saw different batches. Lightning calls
    ``set_epoch`` at the start of every epoch, also after a resume. ``weights``: draw with
    replacement in proportion to them (class balancing) instead of permuting.

    ``start_at`` lets a run resumed mid-epoch continue the same order where it stopped: batch j of
    an epoch is samples [j * batch_size, (j + 1) * batch_size) of the order, so skipping the first
    k * batch_size samples yields exactly batches k.. (also with ``drop_last``). ``__len__`` stays
    the epoch's full length: Lightning counts the epoch's batches from it, done ones included.
    """

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None) -> None:
        self.size = int(size)
        self.seed = int(seed)
        self.weights = weights
        self.epoch = 0
        self.skip = 0  # samples left out of the next iteration only (one-shot)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.skip = 0  # a pending skip belongs to the epoch it was set for
        self.epoch = int(epoch)

    def start_at(self, epoch: int, skip: int) -> None:
        """Make the next iteration epoch ``epoch``'s order without its first ``skip`` samples."""
        if not 0 <= skip <= self.size:
            raise ValueError(f"cannot skip {skip} of an epoch of {self.size} samples")
        self.epoch = int(epoch)
        self.skip = int(skip)

    def __len__(self) -> int:
        return self.size

    def order(self) -> list[int]:
        """This epoch's full order (what ``skip`` counts from)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator).tolist()
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()

    def __iter__(self):  # type: ignore[override]
        skip, self.skip = self.skip, 0
        return iter(self.order()[skip:])


def balanced_sampler(labels: list[int], seed: int = 0) -> EpochSampler:
    """Draws every class equally often (weights = 1 / class count), with replacement."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.double)
    return EpochSampler(len(labels), seed, weights)


def train_sampler(dataset: Dataset, seed: int, balanced: bool) -> EpochSampler:
    from finetune.data.datasets import dataset_labels

    return balanced_sampler(dataset_labels(dataset), seed) if balanced else EpochSampler(len(dataset), seed)


def private_generator(seed: int) -> torch.Generator:
    """For a DataLoader's worker base seeds: creating iterators then leaves the global RNG alone."""
    return torch.Generator().manual_seed(int(seed))


# What one image's transform may raise (a decoded picture the resize cannot take, memory for one huge
# image): that image's fault, never the run's. A TypeError or similar is a bug and still propagates.
TRANSFORM_FAILURES = (OSError, ValueError, RuntimeError, MemoryError)


class Transformed(Dataset):
    """Applies a transform to (image, label) pairs of another dataset.

    An image whose transform fails is, under ``on_bad_image="skip"``, logged and replaced by the next one
    (as :class:`~finetune.data.datasets.ImageFileDataset` does for a file that stops decoding); under
    ``"error"`` it stops the run with a SetupError naming the file.
    """

    def __init__(self, base: Dataset, transform: Callable, on_bad_image: str = "skip") -> None:
        self.base = base
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _name(self, i: int) -> str:
        samples = getattr(self.base, "samples", None)
        return str(samples[i][0]) if samples is not None else f"image #{i}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for offset in range(n):
            j = (i + offset) % n
            image, label = self.base[j]
            try:
                return self.transform(image), label
            except TRANSFORM_FAILURES as err:
                reason = f"{type(err).__name__}: {str(err)[:200]}"
                if self.on_bad_image == "error":
                    raise SetupError(f"{self._name(j)} could not be transformed ({reason}). Fix or delete it, or "
                                     f"rerun with data.on_bad_image=skip to train without it.") from None
                log.warning("skipping %s: its transform failed (%s)", self._name(j), reason)
        raise SetupError("No image of this split can be transformed; run python -m finetune.check on the data.")


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
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.balanced = balanced
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=train_sampler(dataset, self.seed, self.balanced) if shuffle else None,
            generator=private_generator(self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a last train batch of one image breaks BatchNorm in train mode (and is noise anyway)
            drop_last=shuffle and len(dataset) > self.batch_size,
            collate_fn=getattr(dataset, "collate", None),  # data.decode=device: undecoded batches (EncodedBatch)
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """As Lightning's, plus the precision's input cast for an undecoded batch (data.decode=device): Lightning
        casts before the move, inside tensors and collections only, and such a batch is pixels only after it."""
        from finetune.data.device_decode import EncodedBatch

        moved = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if isinstance(batch, EncodedBatch) and self.trainer is not None:
            moved = self.trainer.precision_plugin.convert_input(moved)
        return moved

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
