"""Feature cache: run the frozen prefix of a backbone once per image, store its outputs, reuse them.

With a frozen prefix, every epoch would decode every image again and push it through the same
frozen stages to get the same tensors. Here that happens once: outputs are written as
memory-mapped ``.npy`` files (so the cache may exceed RAM) under a folder keyed by everything that
determines them (backbone, weights, frozen stages, transform, dataset files), so a second run or
every job of a sweep reuses them. Under DDP each rank extracts its own shard.

Each shard (split x rank) is three files: features, labels and a record (``*.shard.json``) of what
its writer wrote (view count, rows, every array's shape and dtype), renamed into place last. On
load every shard is checked against its record and against what this run expects (rows of its
split, views, dtype); a mismatch is a damaged cache, never a guess from the array shapes.
``meta.json`` holds the key parts, the view count and all shard records. Files being written carry
``.tmp-<host>-<pid>`` (:func:`temp_path`); a dead writer's are removed before the next extraction.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
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

from finetune.data.resident import BlockLoader, ResidentFeatures, block_steps, fits, nbytes
from finetune.errors import SetupError
from finetune.model.backbones import Backbone, imagenet_weights, is_timm, weights_source
from finetune.progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RECORD_FORMAT = 1
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
# <final name>.tmp-<host>-<pid>; and the older <stem>.tmp<pid>.npy of earlier versions (same host)
_TEMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)$")
_LEGACY_TEMP = re.compile(r"\.tmp(?P<pid>\d+)\.npy$")


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


# Bump when what extract_features / frozen_prefix compute from the same images changes: the cache key holds it,
# so a cache written by the older code is extracted again instead of being reused.
EXTRACTION_VERSION = 1


def code_identity(backbone_name: str) -> dict[str, Any]:
    """The code that computes the cached tensors: finetune's extraction, and major.minor of the libraries that
    decode, transform and run the prefix (timm's too, for its models).

    A release can change a kernel or a default (torchvision 0.17 turned antialiasing on for tensor resizes;
    timm redefines models between versions): a cache keyed without them was reused as it was. Patch releases
    are left out, so a bug-fix upgrade keeps the cache.
    """
    import importlib

    modules = {"torch": "torch", "torchvision": "torchvision", "pillow": "PIL"}
    if is_timm(backbone_name):
        modules["timm"] = "timm"
    found: dict[str, Any] = {"extraction": EXTRACTION_VERSION}
    for name, module in modules.items():  # the code imported (a fork such as Pillow-SIMD: its own version)
        release = str(getattr(importlib.import_module(module), "__version__", "unknown"))
        found[name] = ".".join(release.split("+")[0].split(".")[:2])
    return found


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the cached tensors."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def frozen_prefix(backbone: Backbone, num_stages: int) -> nn.Sequential:
    """A standalone copy of the first ``num_stages`` stages, in eval mode, for extraction."""
    names = backbone.stage_names[:num_stages]
    return copy.deepcopy(nn.Sequential(*[backbone.stages[n] for n in names])).eval().requires_grad_(False)


def damaged(folder: Path, reason: str) -> SetupError:
    """The one message for a feature cache that does not hold what it should: name the folder to delete."""
    reason = " ".join(str(reason).split())  # one paragraph
    return SetupError(f"damaged feature cache {folder}: {reason}. Delete that folder and run again (the features "
                      f"are extracted anew): rm -r '{folder}'")


def temp_path(final: Path, pid: int | None = None) -> Path:
    """Where ``final`` is written before it is renamed into place: ``<final name>.tmp-<host>-<pid>``."""
    return final.with_name(f"{final.name}.tmp-{_HOST}-{os.getpid() if pid is None else int(pid)}")


def _pid_alive(pid: int) -> bool:
    """False only when no such process exists (a process of another user counts as alive)."""
    if pid <= 0:
        return True  # not a writer's pid: never treat as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files in a cache folder whose writer (this host, by pid) is no longer running.

    Temp files of another host (a cache on a shared filesystem) are never reported: their pid means
    nothing here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in folder.iterdir():
        match = _TEMP.search(path.name)
        if match is not None and match["host"] != _HOST:
            continue
        match = match or _LEGACY_TEMP.search(path.name)
        if match is not None and path.is_file() and not _pid_alive(int(match["pid"])):
            stale.append(path)
    return sorted(stale)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete :func:`stale_temp_files` (a live writer's temp files are left alone); returns what was deleted."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("could not remove the stale feature-cache temp file %s: %s", path, err)
            continue
        removed.append(path)
    if removed:
        log.info("removed %d temp file(s) of interrupted feature extraction in %s", len(removed), folder)
    return removed


@dataclass
class ShardFiles:
    features: Path
    labels: Path

    @property
    def record(self) -> Path:
        """What the writer wrote (views, rows, shapes, dtypes); renamed into place last, so it marks completion."""
        return self.features.with_name(self.features.name.removesuffix(".features.npy") + ".shard.json")

    @property
    def stem(self) -> str:
        return self.features.name.removesuffix(".features.npy")

    def complete(self) -> bool:
        return self.features.is_file() and self.labels.is_file() and self.record.is_file()


def shard_files(folder: Path, split: str, rank: int, world: int) -> ShardFiles:
    stem = f"{split}.{rank}of{world}"
    return ShardFiles(folder / f"{stem}.features.npy", folder / f"{stem}.labels.npy")


@dataclass(frozen=True)
class ShardLayout:
    """What a shard must hold, known from the run before anything is read: rows, views, storage dtype."""

    rows: int
    views: int
    dtype: str


def _dtype_or_none(value: Any) -> np.dtype | None:
    try:
        return np.dtype(str(value))
    except TypeError:
        return None


def read_record(files: ShardFiles) -> dict[str, Any] | None:
    """The shard's record, None when it has none (written by hand or by an older version)."""
    if not files.record.is_file():
        return None
    try:
        record = json.loads(files.record.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        int(record["rows"]), int(record["views"]), list(record["features"]["shape"]), list(record["labels"]["shape"])
        np.dtype(record["features"]["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise damaged(files.record.parent, f"its record {files.record.name} is unreadable ({err})") from None
    return record


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

    Files appear under their final names only when complete (:func:`temp_path` + rename), the shard's
    record last, so an interrupted extraction is redone, never half-read.
    """
    prefix = prefix.to(device)
    if channels_last:
        prefix = prefix.to(memory_format=torch.channels_last)
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=getattr(dataset, "collate", None))
    n = len(subset)
    out: np.memmap | None = None
    labels = np.empty((n,), dtype=np.int64)
    tmp_features, tmp_labels, tmp_record = (temp_path(p) for p in (files.features, files.labels, files.record))
    split = files.stem.split(".")[0]
    try:
        with progress(f"extracting {split} features", n * views) as advance:
            for view in range(views):
                offset = 0
                for batch in loader:
                    x, y = batch if isinstance(batch, list | tuple) else batch.to(device)  # EncodedBatch: decode
                    x = x.to(device, non_blocking=True)
                    if channels_last and x.ndim == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    h = prefix(x).float().cpu().numpy()
                    if out is None:
                        shape = (views, n, *h.shape[1:]) if views > 1 else (n, *h.shape[1:])
                        out = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=dtype, shape=shape)
                    target = out[view] if views > 1 else out
                    target[offset:offset + len(h)] = h.astype(dtype, copy=False)
                    labels[offset:offset + len(h)] = np.asarray(y.cpu())
                    offset += len(h)
                    advance(len(h))
        if out is None:  # empty shard
            out = np.lib.format.open_memmap(tmp_features, mode="w+", dtype=dtype, shape=(0,))
        out.flush()
        record = {
            "format": RECORD_FORMAT, "split": split, "rows": n, "views": views,
            "features": {"shape": list(out.shape), "dtype": str(out.dtype)},
            "labels": {"shape": list(labels.shape), "dtype": str(labels.dtype)},
        }
        del out
        with open(tmp_labels, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, labels)
        tmp_record.write_text(json.dumps(record, indent=2))
        os.replace(tmp_features, files.features)
        os.replace(tmp_labels, files.labels)
        os.replace(tmp_record, files.record)  # last: the shard is complete
    finally:
        for tmp in (tmp_features, tmp_labels, tmp_record):
            tmp.unlink(missing_ok=True)
    return n


class FeatureDataset(Dataset):
    """Cached prefix outputs (memory-mapped) with labels; with several views, one is drawn per access.

    The view count comes from the shard's record (1 for a shard without one, only when no ``expected``
    layout is given), never from the array shapes; every array is checked against the record and
    against ``expected``: a mismatch raises :func:`damaged`.
    """

    def __init__(self, files: ShardFiles, expected: ShardLayout | None = None) -> None:
        folder = files.features.parent
        try:
            self.features = np.load(files.features, mmap_mode="r")
            self.labels = np.load(files.labels)
        except (OSError, ValueError, EOFError) as err:  # truncated or overwritten by something else
            raise damaged(folder, f"{files.features.name} or {files.labels.name} cannot be read ({err})") from None
        record = read_record(files)
        if record is None and expected is not None:
            raise damaged(folder, f"{files.record.name} (the record of shard {files.stem}) is missing")
        self.views = int(record["views"]) if record is not None else 1
        self.rows = int(record["rows"]) if record is not None else len(self.labels)
        problem = self._problem(files, record, expected)
        if problem:
            raise damaged(folder, f"shard {files.stem}: {problem}")

    def _problem(self, files: ShardFiles, record: dict[str, Any] | None, expected: ShardLayout | None) -> str:
        """What does not fit, or ''."""
        features, labels, views, rows = self.features, self.labels, self.views, self.rows
        if expected is not None:
            if views != expected.views:
                return f"it holds {views} view(s), this run uses {expected.views}"
            if rows != expected.rows:
                return f"it holds {rows} image(s), the split has {expected.rows} for this shard"
            if np.dtype(record["features"]["dtype"]) != np.dtype(expected.dtype):
                return f"it stores {record['features']['dtype']}, this run uses {expected.dtype}"
        if record is not None:
            written = record["features"]
            if list(features.shape) != list(written["shape"]) or features.dtype != np.dtype(written["dtype"]):
                return (f"{files.features.name} is {list(features.shape)} {features.dtype}, its writer wrote "
                        f"{written['shape']} {written['dtype']}")
            if list(labels.shape) != list(record["labels"]["shape"]):
                return f"{files.labels.name} is {list(labels.shape)}, its writer wrote {record['labels']['shape']}"
        if views < 1:
            return f"its record says {views} views"
        if labels.ndim != 1 or len(labels) != rows or (len(labels) and labels.dtype.kind not in "iu"):
            return f"{files.labels.name} is {list(labels.shape)} {labels.dtype}, not {rows} integer labels"
        if rows == 0:
            return ""
        lead = (views, rows) if views > 1 else (rows,)
        if tuple(features.shape[:len(lead)]) != lead or features.ndim <= len(lead):
            return f"{files.features.name} is {list(features.shape)}, not {list(lead)} + the feature shape"
        return ""

    @property
    def row_shape(self) -> tuple[int, ...] | None:
        """The shape of one image's features (None for an empty shard)."""
        if self.rows == 0:
            return None
        return tuple(self.features.shape[2:] if self.views > 1 else self.features.shape[1:])

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
        steps_per_block: int = 0,
        resident: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.steps_per_block = int(steps_per_block)  # 0: train batches from a DataLoader, one step each
        self.block_steps = 0  # optimizer steps per block once resident (steps_per_block, under BLOCK_BYTES)
        self.resident_setting = resident
        self.resident: dict[str, ResidentFeatures] = {}  # the splits on the device, when they are there
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
        self._make_folder()
        started = time.perf_counter()
        # Extraction must not shift the global RNG (DataLoaders draw seeds from it): a cached run
        # then shuffles and initialises exactly like an uncached one.
        with torch.random.fork_rng(devices=[]):
            self._extract_missing(rank, world, device)
        self.extract_seconds += time.perf_counter() - started
        if strategy is not None and world > 1:
            strategy.barrier("feature_cache")
        self._check_meta()
        row_shapes: dict[tuple[int, ...], str] = {}
        for split in SPLITS:
            shards = []
            for r in range(world):
                files = shard_files(self.folder, split, r, world)
                shard = FeatureDataset(files, self._layout(split, r, world))
                if shard.row_shape is not None:
                    row_shapes.setdefault(shard.row_shape, files.stem)
                shards.append(shard)
            self.datasets[split] = shards[0] if world == 1 else ShardedFeatures(shards)
        if len(row_shapes) > 1:
            raise damaged(self.folder, "its shards hold features of different shapes ("
                          + ", ".join(f"{stem}: {list(shape)}" for shape, stem in row_shapes.items()) + ")")
        if rank == 0:
            self._write_meta()
        self.prefix = None  # a copy made for extraction: not needed any more

    def _layout(self, split: str, rank: int, world: int) -> ShardLayout:
        """What shard ``rank`` of ``split`` must hold in this run."""
        return ShardLayout(rows=len(range(rank, len(self.images[split]), world)),
                           views=self.train_views if split == "train" else 1, dtype=str(self.dtype))

    def _unusable(self, reason: str) -> SetupError:
        return SetupError(
            f"The feature cache cannot be written: {reason}. The cache folder {self.folder} lies under "
            f"cache.dir ({self.folder.parent}). Set cache.dir=... (or paths.cache_dir, or FINETUNE_CACHE) to a "
            f"writable folder, or cache.enabled=false to train without the cache."
        )

    def _make_folder(self) -> None:
        """mkdir the cache folder; an unusable cache.dir is a SetupError that says why and how to fix it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unusable(self._why_not(err)) from None
        if not self.folder.is_dir():
            raise self._unusable(f"{self.folder} is not a folder")

    def _why_not(self, err: OSError) -> str:
        """The first existing path on the way to the folder, and what is wrong with it."""
        path = self.folder
        while not path.exists() and path != path.parent:
            path = path.parent
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder ({err.strerror or err})"
        if isinstance(err, PermissionError) or (path.is_dir() and not os.access(path, os.W_OK | os.X_OK)):
            return f"no permission to create {self.folder} in {path} ({err.strerror or err})"
        return f"creating {self.folder} failed ({err.strerror or err})"

    def _check_writable(self) -> None:
        try:
            with tempfile.TemporaryFile(dir=self.folder):
                pass
        except OSError as err:
            raise self._unusable(f"{self.folder} is not writable ({err.strerror or err})") from None

    def _meta_content(self) -> dict[str, Any]:
        records = {}
        for path in sorted(self.folder.glob("*.shard.json")):
            stem = path.name.removesuffix(".shard.json")
            record = read_record(ShardFiles(self.folder / f"{stem}.features.npy", self.folder / f"{stem}.labels.npy"))
            if record is not None:
                records[stem] = record
        content = {**self.meta, "views": self.train_views, "dtype": str(self.dtype), "shards": records}
        return json.loads(json.dumps(content, default=str))

    def _check_meta(self) -> None:
        """The cache's own view count and dtype must be this run's (they are part of its key)."""
        path = self.folder / "meta.json"
        if not path.is_file():
            return
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise damaged(self.folder, f"meta.json is unreadable ({err})") from None
        if not isinstance(meta, dict):
            raise damaged(self.folder, "meta.json is not a JSON object")
        if "views" in meta and meta["views"] != self.train_views:
            raise damaged(self.folder, f"meta.json says {meta['views']} view(s), this run uses {self.train_views}")
        if "dtype" in meta and _dtype_or_none(meta["dtype"]) != self.dtype:
            raise damaged(self.folder, f"meta.json says {meta['dtype']}, this run uses {self.dtype}")

    def _write_meta(self) -> None:
        """meta.json: key parts, views, dtype and every shard's record; rewritten only when it changed (a
        read-only shared cache that is complete still serves)."""
        path = self.folder / "meta.json"
        content = self._meta_content()
        try:
            if path.is_file() and json.loads(path.read_text()) == content:
                return
        except (OSError, ValueError):
            pass
        tmp = temp_path(path)
        try:
            tmp.write_text(json.dumps(content, indent=2))
            os.replace(tmp, path)
        except OSError as err:
            log.warning("could not update %s: %s", path, err)
        finally:
            tmp.unlink(missing_ok=True)

    def _extract_missing(self, rank: int, world: int, device: torch.device) -> None:
        missing = [split for split in SPLITS if not shard_files(self.folder, split, rank, world).complete()]
        if missing:
            self._check_writable()
            remove_stale_temp_files(self.folder)
        for split in missing:
            files = shard_files(self.folder, split, rank, world)
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
        if stage in (None, "fit") and self.steps_per_block and world == 1:
            self.resident = self._resident_splits(self._device())

    def _resident_splits(self, device: torch.device) -> dict[str, ResidentFeatures]:
        """Every split on ``device`` (cache.resident); under auto only when they fit, else none (DataLoaders)."""
        shards = {split: self.datasets[split] for split in SPLITS}  # one process: each split is one shard
        if self.resident_setting is False:
            return {}
        size = sum(nbytes(d.features, d.labels) for d in shards.values())
        if self.resident_setting == "auto":
            ok, why = fits(size, device)
            if not ok:
                log.info("feature cache: %s; batches are read from the cache files instead "
                         "(cache.resident=true forces them onto the device)", why)
                return {}
        started = time.perf_counter()
        stores = {split: ResidentFeatures(d.features, d.labels, d.views, device) for split, d in shards.items()}
        self.block_steps = block_steps(self.steps_per_block, self.batch_size, stores["train"].row_bytes)
        log.info("feature cache: %d train, val and test rows (%.1f MiB) on %s, %d optimizer steps per Lightning "
                 "step (%.2f s)", sum(d.rows for d in shards.values()), size / 2**20, device, self.block_steps,
                 time.perf_counter() - started)
        return stores

    def _loader(self, split: str, shuffle: bool) -> DataLoader | BlockLoader:
        """The split's batches: blocks from the device when it is resident, else a DataLoader over the files.

        Either way the image path's batches: same sampler, and a short last train batch dropped there and here.
        """
        from finetune.data.datamodule import private_generator, train_sampler

        dataset = self.datasets[split]
        sampler = train_sampler(dataset, self.seed, self.balanced) if shuffle else None
        drop_last = shuffle and len(dataset) > self.batch_size
        if self.resident:
            return BlockLoader(self.resident[split], sampler, self.batch_size, self.block_steps, drop_last)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          generator=private_generator(self.seed), num_workers=0,
                          pin_memory=torch.cuda.is_available(), collate_fn=keep_batch, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader | BlockLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | BlockLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | BlockLoader:
        return self._loader("test", shuffle=False)
