"""Cached train features held on the training device, served K minibatches at a time.

On cached pooled features a head step costs well under a millisecond, while a DataLoader batch
(sampler, ``__getitems__``, collate, pinning, the copy) and Lightning's ~50 hook calls per batch cost
more than the step itself. Here the train split sits on the device once; each epoch's order (the same
:class:`~finetune.data.datamodule.EpochSampler` the DataLoader would use) goes there once; a
:class:`FeatureBlock` holds ``steps_per_block`` minibatches gathered by one index, and the module takes
that many optimizer steps on it (:meth:`finetune.model.module.FinetuneModule.training_step`). The
minibatches are exactly the DataLoader's: same order, same batch size, same last-batch rule, the same
numpy draws of augmented views per minibatch; so the trained head is bit-identical on CPU.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from finetune.data.datamodule import EpochSampler
from finetune.model.blocks import FeatureBlock

log = logging.getLogger(__name__)

# Of what is free on the device, the share the train features may take under cache.resident=auto.
RESIDENT_SHARE = 0.5
# A block (the minibatches of one Lightning step, gathered on the device) stays under this size: pooled
# features of a small split make one or two blocks an epoch, a frozen prefix's outputs at a large image size
# a few steps each, not gigabytes.
BLOCK_BYTES = 64 * 2**20
# Blocks alive at once: the one training, the one Lightning's loop fetched ahead, one spare.
RING = 3


def block_steps(most: int, batch_size: int, row_bytes: int) -> int:
    """Optimizer steps per block: ``most`` (cache.steps_per_block), fewer where those would pass BLOCK_BYTES."""
    return max(1, min(int(most), BLOCK_BYTES // max(1, int(batch_size) * int(row_bytes))))


class ResidentFeatures:
    """One split's cached features and labels as tensors on ``device`` (in their stored dtype)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, views: int, device: torch.device) -> None:
        self.views = int(views)
        with warnings.catch_warnings():
            # The cache's files are read-only memory maps, and these tensors are only ever read (gathered into
            # blocks): on a CPU they share the map's pages instead of copying them; torch's notice about writing
            # to a read-only array has nothing to warn of here.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            self.features = torch.from_numpy(np.ascontiguousarray(features)).to(device)
            self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(device)
        self.device = device

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[2:] if self.views > 1 else self.features.shape[1:])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as a block holds it (float32)."""
        return 4 * math.prod(self.row_shape)

    def gather(self, index: torch.Tensor, views: np.ndarray | None,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` (a device tensor) as float32, from view ``views[i]`` of row i when there are views;
        written into the first rows of ``out`` when given (no new allocation: on a CPU a fresh block of a few
        MiB costs its page faults, several times the copy)."""
        if self.views > 1:
            view = torch.from_numpy(views).to(self.device, non_blocking=True)
            flat, rows = self.features.flatten(0, 1), view * self.features.shape[1] + index
        else:
            flat, rows = self.features, index
        labels = self.labels[index]
        if out is None:
            return flat.index_select(0, rows).float(), labels
        target = out[:len(rows)]
        if flat.dtype == torch.float32:
            torch.index_select(flat, 0, rows, out=target)
        else:
            target.copy_(flat.index_select(0, rows))
        return target, labels


def nbytes(features: np.ndarray, labels: np.ndarray) -> int:
    return int(features.nbytes) + int(labels.nbytes)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits(size: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``size`` bytes of train features may live on ``device`` (cache.resident=auto), and why not."""
    free = free_memory(device)
    if free is None:
        return True, ""
    if size <= RESIDENT_SHARE * free:
        return True, ""
    return False, (f"the train features take {size / 2**30:.2f} GiB, more than {RESIDENT_SHARE:.0%} of the "
                   f"{free / 2**30:.2f} GiB free on {device}")


class BlockLoader:
    """An epoch of a resident split as :class:`FeatureBlock` s of ``steps_per_block`` minibatches.

    The minibatches are those of ``DataLoader(batch_size, sampler, drop_last)`` over the same split: the
    sampler's order (one-shot skips of a mid-epoch resume included, always whole blocks), cut into
    ``batch_size`` rows, the short last one dropped under ``drop_last``. ``sampler`` is exposed as a
    DataLoader's is, so Lightning calls its ``set_epoch`` and :mod:`finetune.run.resume` positions it.
    Without a sampler (val, test) the rows come in order, all of them.
    """

    def __init__(self, store: ResidentFeatures, sampler: EpochSampler | None, batch_size: int, steps_per_block: int,
                 drop_last: bool) -> None:
        self.store = store
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.steps_per_block = max(1, int(steps_per_block))
        self.drop_last = drop_last
        self.batch_sampler = None  # as a DataLoader with a sampler has it, for Lightning's checks
        self._ring: list[torch.Tensor] = []  # RING block buffers, reused in turn (across epochs)
        self._turn = 0

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """Minibatches per epoch: the optimizer steps the module takes (and the schedule counts)."""
        n = len(self.sampler) if self.sampler is not None else len(self.store.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def samples_per_batch(self) -> int:
        """Samples in one Lightning batch (a block; the last of an epoch may hold fewer)."""
        return self.batch_size * self.steps_per_block

    def __len__(self) -> int:
        return math.ceil(self.optimizer_steps_per_epoch / self.steps_per_block)

    def __iter__(self) -> Iterator[FeatureBlock]:
        if self.sampler is None:  # val / test: in order, as a DataLoader without a sampler
            order = np.arange(len(self.store.labels), dtype=np.int64)
        else:
            order = np.fromiter(iter(self.sampler), dtype=np.int64)
        rows = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        index = torch.from_numpy(order[:rows]).to(self.store.device, non_blocking=True)  # once per epoch
        block_rows = self.samples_per_batch
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            views = None
            if self.store.views > 1:  # one draw per minibatch, as FeatureDataset.__getitems__ makes them
                views = np.concatenate([np.random.randint(self.store.views, size=min(self.batch_size, stop - s))
                                        for s in range(start, stop, self.batch_size)])
            x, y = self.store.gather(index[start:stop], views, out=self._buffer(min(block_rows, rows)))
            yield FeatureBlock(x, y, self.batch_size)

    def _buffer(self, rows: int) -> torch.Tensor:
        """The next of RING float32 buffers of at least ``rows`` rows. A block's tensors stay valid until
        RING - 1 more blocks were drawn: Lightning fetches one ahead, and nothing keeps a batch past its step."""
        slot, self._turn = self._turn % RING, self._turn + 1
        if slot == len(self._ring) or len(self._ring[slot]) < rows:
            buffer = torch.empty((rows, *self.store.row_shape), dtype=torch.float32, device=self.store.device)
            self._ring[slot:slot + 1] = [buffer]
        return self._ring[slot]
