"""Feature cache: run the frozen prefix of a backbone once per image, store its outputs, reuse them.

With a frozen prefix, every epoch would decode every image again and push it through the same
frozen stages to get the same tensors. Here that happens once: outputs are written as
memory-mapped ``.npy`` files (so the cache may exceed RAM) under a folder keyed by everything that
determines them (backbone, weights, frozen stages, transform, dataset files), so a second run or
every job of a sweep reuses them. Under DDP each rank extracts its own shard.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune.errors import SetupError
from finetune.model.backbones import Backbone, imagenet_weights, weights_source

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def weights_identity(backbone_name: str, weights: str | None, seed: int) -> str:
    """What makes two runs' frozen weights equal: the weights enum, the file, or the init seed."""
    source = weights_source(weights)
    if source == "imagenet":
        return str(imagenet_weights(backbone_name))
    if source == "file":
        path = Path(str(weights)).expanduser().resolve()
        stat = path.stat()
        return f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"random-init:seed={seed}"


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the cached tensors."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def frozen_prefix(backbone: Backbone, num_stages: int) -> nn.Sequential:
    """A standalone copy of the first ``num_stages`` stages, in eval mode, for extraction."""
    names = backbone.stage_names[:num_stages]
    return copy.deepcopy(nn.Sequential(*[backbone.stages[n] for n in names])).eval().requires_grad_(False)


@dataclass
class ShardFiles:
    features: Path
    labels: Path

    def complete(self) -> bool:
        return self.features.is_file() and self.labels.is_file()


def shard_files(folder: Path, split: str, rank: int, world: int) -> ShardFiles:
    stem = f"{split}.{rank}of{world}"
    return ShardFiles(folder / f"{stem}.features.npy", folder / f"{stem}.labels.npy")


@torch.inference_mode()
def extract_features(
    prefix: nn.Module,
    dataset: Dataset,
    files: ShardFiles,
    indices: Sequence[int],
    batch_size: int,
    device: torch.device,
    dtype: np.dtype,
    views: int = 1,
    num_workers: int = 0,
    channels_last: bool = False,
) -> int:
    """Write prefix outputs of ``dataset[indices]`` (``views`` passes) to memory-mapped files.

    Files appear under their final names only when complete (temp name + rename), so an
    interrupted extraction is redone, never half-read.
    """
    prefix = prefix.to(device)
    if channels_last:
        prefix = prefix.to(memory_format=torch.channels_last)
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    n = len(subset)
    out: np.memmap | None = None
    labels = np.empty((n,), dtype=np.int64)
    tmp_features = files.features.with_suffix(f".tmp{os.getpid()}.npy")
    try:
        for view in range(views):
            offset = 0
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                h = prefix(x).float().cpu().numpy()
                if out is None:
                    shape = (views, n, *h.shape[1:]) if views > 1 else (n, *h.shape[1:])
                    out = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=dtype, shape=shape)
                target = out[view] if views > 1 else out
                target[offset:offset + len(h)] = h.astype(dtype, copy=False)
                labels[offset:offset + len(h)] = np.asarray(y)
                offset += len(h)
        if out is None:  # empty shard
            out = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=dtype, shape=(0,))
        out.flush()
        del out
        tmp_labels = files.labels.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp_labels, labels)
        os.replace(tmp_labels, files.labels)
        os.replace(tmp_features, files.features)
    finally:
        tmp_features.unlink(missing_ok=True)
    return n


class FeatureDataset(Dataset):
    """Cached prefix outputs (memory-mapped) with labels; with several views, one is drawn per access."""

    def __init__(self, files: ShardFiles) -> None:
        try:
            self.features = np.load(files.features, mmap_mode="r")
            self.labels = np.load(files.labels)
        except (OSError, ValueError, EOFError) as err:  # truncated or overwritten by something else
            raise SetupError(
                f"The feature cache file {files.features.name} (or its labels) in {files.features.parent} is "
                f"damaged ({err}). Delete that folder and run again: the features are extracted anew."
            ) from None
        self.views = self.features.shape[0] if self.features.ndim >= 2 and len(self.labels) and \
            self.features.shape[0] != len(self.labels) else 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one read: the DataLoader's per-sample path costs more than a head step."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.views > 1:
            rows = self.features[np.random.randint(self.views, size=len(idx)), idx]
        else:
            rows = self.features[idx]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)), torch.from_numpy(self.labels[idx])


class ShardedFeatures(Dataset):
    """Every rank's shard as one dataset (DDP), with the same batched reads."""

    def __init__(self, shards: Sequence[FeatureDataset]) -> None:
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.labels = np.concatenate([s.labels for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        xs, order = [], []
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            xs.append(self.shards[s].__getitems__(idx[where] - self.offsets[s])[0])
            order.append(where)
        x = torch.cat(xs)[torch.from_numpy(np.argsort(np.concatenate(order)))]
        return x, torch.from_numpy(self.labels[idx])


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for datasets that return whole batches from ``__getitems__``."""
    return batch


class FeatureCacheDataModule(pl.LightningDataModule):
    """Serves cached prefix outputs; extracts the missing ones in ``setup`` (each rank its shard).

    ``setup`` runs on every rank after the process group exists, so under DDP each rank
    extracts ``indices[rank::world]`` and then reads every rank's shard after a barrier.
    """

    def __init__(
        self,
        images: dict[str, Dataset],
        prefix: nn.Module | None,
        folder: Path,
        meta: dict[str, Any],
        batch_size: int,
        num_workers: int = 0,
        dtype: str = "float32",
        train_views: int = 1,
        channels_last: bool = False,
        balanced: bool = False,
        extract_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.extract_batch_size = int(extract_batch_size or batch_size)
        self.balanced = balanced
        self.images = images
        self.prefix = prefix
        self.folder = Path(folder)
        self.meta = meta
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dtype = np.dtype(dtype)
        self.train_views = max(1, int(train_views))
        self.channels_last = channels_last
        self.datasets: dict[str, Dataset] = {}
        self.extract_seconds = 0.0
        self.extracted_images = 0

    def _rank_world(self) -> tuple[int, int, Any]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, trainer.strategy

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def prepare(self, rank: int = 0, world: int = 1, strategy: Any = None, device: torch.device | None = None) -> None:
        """Extract whatever shards are missing, then open all shards of every split."""
        device = device or torch.device("cpu")
        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # Extraction must not shift the global RNG (DataLoaders draw seeds from it): a cached run
        # then shuffles and initialises exactly like an uncached one.
        with torch.random.fork_rng(devices=[]):
            self._extract_missing(rank, world, device)
        self.extract_seconds += time.perf_counter() - started
        if rank == 0:
            (self.folder / "meta.json").write_text(json.dumps(self.meta, indent=2, default=str))
        if strategy is not None and world > 1:
            strategy.barrier("feature_cache")
        for split in SPLITS:
            shards = [FeatureDataset(shard_files(self.folder, split, r, world)) for r in range(world)]
            self.datasets[split] = shards[0] if world == 1 else ShardedFeatures(shards)
        self.prefix = None  # a copy made for extraction: not needed any more

    def _extract_missing(self, rank: int, world: int, device: torch.device) -> None:
        for split in SPLITS:
            files = shard_files(self.folder, split, rank, world)
            if not files.complete():
                if self.prefix is None:
                    raise RuntimeError(f"The feature cache {self.folder} lost its '{split}' files after this run "
                                       f"read them; run again to extract them anew.")
                dataset = self.images[split]
                views = self.train_views if split == "train" else 1
                self.extracted_images += extract_features(
                    self.prefix, dataset, files, range(rank, len(dataset), world), self.extract_batch_size, device,
                    self.dtype, views=views, num_workers=self.num_workers, channels_last=self.channels_last,
                ) * views

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        rank, world, strategy = self._rank_world()
        self.prepare(rank, world, strategy, self._device())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        from finetune.data.datamodule import private_generator, train_sampler

        dataset = self.datasets[split]
        # same batches as the image path: same sampler, and a short last train batch dropped there and here
        return DataLoader(dataset, batch_size=self.batch_size,
                          sampler=train_sampler(dataset, self.seed, self.balanced) if shuffle else None,
                          generator=private_generator(self.seed), num_workers=0,
                          pin_memory=torch.cuda.is_available(), collate_fn=keep_batch,
                          drop_last=shuffle and len(dataset) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
