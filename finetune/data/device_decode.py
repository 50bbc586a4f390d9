"""``data.decode=device``: JPEGs leave the DataLoader workers undecoded, and the training device decodes each
batch at once (nvjpeg on CUDA, libjpeg on a CPU) and crops, resizes, flips and normalises it there as tensors.

The workers keep the work that needs the file: read it, check its header, and draw the image's random crop and
flip from their own RNG, in the order the CPU transform draws them. A run therefore sees the crops and flips it
would see under ``data.decode=torchvision``; on a CPU the pixels are that path's exactly, on CUDA nvjpeg's IDCT
may differ by a level or two (benchmarks/decode_pipeline.py measures it). Files nvjpeg should not take (other
formats, grayscale, CMYK, EXIF-rotated JPEGs, in-memory datasets) are decoded in the worker as before and only
transformed on the device. A batch is an :class:`EncodedBatch`: Lightning moves anything with a ``.to`` method
by calling it, so the decode happens where Lightning moves every batch, and the feature-cache extraction
calls the same ``.to``.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from finetune.data.datamodule import Transformed
from finetune.errors import SetupError

log = logging.getLogger(__name__)

_SIZE_ONLY = torch.empty(1, 1, 1)  # expanded to an image's shape: what a crop's make_params reads, no pixels


@dataclass(frozen=True)
class DevicePlan:
    """A finetune transform (``train_transform`` / ``eval_transform``) split into what a worker draws (random
    crop box, flip) and what the device applies (the same v2.functional calls the CPU transform makes).

    Plain numbers only (the v2 modules hold tensors): a plan travels with every batch from its worker, and each
    tensor there would cost a shared-memory file descriptor.
    """

    crop: tuple[Any, ...] | None = None  # RandomResizedCrop: (size, scale, ratio, interpolation, antialias)
    flip: float | None = None  # RandomHorizontalFlip's p
    resize: tuple[Any, ...] | None = None  # Resize: (size, interpolation, max_size, antialias)
    center: tuple[int, ...] | None = None  # CenterCrop's size
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @classmethod
    def of(cls, transform: v2.Compose) -> DevicePlan:
        """The plan of one of finetune's transforms: [RandomResizedCrop, (flip)] or [Resize, CenterCrop], then
        ToImage, ToDtype(float32, scale=True), Normalize; anything else is refused (it would run differently)."""
        parts: dict[str, Any] = {}
        for step in transform.transforms:
            kind = type(step)
            if kind is v2.RandomResizedCrop and "crop" not in parts:
                parts["crop"] = (tuple(step.size), tuple(step.scale), tuple(step.ratio), step.interpolation,
                                 step.antialias)
            elif kind is v2.RandomHorizontalFlip and "flip" not in parts:
                parts["flip"] = float(step.p)
            elif kind is v2.Resize and "resize" not in parts:
                size = step.size if isinstance(step.size, int) else tuple(step.size)
                parts["resize"] = (size, step.interpolation, step.max_size, step.antialias)
            elif kind is v2.CenterCrop and "center" not in parts:
                parts["center"] = tuple(step.size)
            elif isinstance(step, v2.Normalize):
                parts["mean"], parts["std"] = tuple(step.mean), tuple(step.std)
            elif not (kind is v2.ToImage or (kind is v2.ToDtype and step.scale)):
                raise ValueError(f"data.decode=device cannot run {step!r} on the device")
        plan = cls(**parts)
        if plan.crop is not None and (plan.resize is not None or plan.center is not None):
            raise ValueError("data.decode=device runs either a random resized crop or resize + centre crop")
        return plan

    def draw(self, height: int, width: int) -> list[int]:
        """This image's random part, drawn in the worker exactly as the CPU transform draws it (the crop's
        numbers, then the flip's): ``[top, left, height, width, flip]``."""
        box = [0, 0, int(height), int(width)]
        if self.crop is not None:
            params = _crop_drawer(self.crop).make_params([_SIZE_ONLY.expand(3, int(height), int(width))])
            box = [params["top"], params["left"], params["height"], params["width"]]
        flip = self.flip is not None and bool(torch.rand(1) < self.flip)  # as _RandomApplyTransform decides
        return [*box, int(flip)]

    def apply(self, image: torch.Tensor, params: Sequence[int]) -> torch.Tensor:
        """One decoded uint8 CHW image on the device, cropped and resized to the model's input (still uint8)."""
        top, left, height, width, flip = (int(p) for p in params)
        if self.crop is not None:
            size, _, _, interpolation, antialias = self.crop
            image = F.resized_crop(image, top, left, height, width, size=list(size), interpolation=interpolation,
                                   antialias=antialias)
        if self.resize is not None:
            size, interpolation, max_size, antialias = self.resize
            image = F.resize(image, size if isinstance(size, int) else list(size), interpolation=interpolation,
                             max_size=max_size, antialias=antialias)
        if self.center is not None:
            image = F.center_crop(image, list(self.center))
        if flip:
            image = F.horizontal_flip(image)
        return image

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """A stacked uint8 NCHW batch as the model's float32 input: scaled to [0, 1], then normalised."""
        return F.normalize(F.to_dtype(images, torch.float32, scale=True), list(self.mean), list(self.std))


@functools.lru_cache(maxsize=8)
def _crop_drawer(crop: tuple[Any, ...]) -> v2.RandomResizedCrop:
    """The v2 transform whose ``make_params`` draws the crop box (built once per worker process)."""
    size, scale, ratio, interpolation, antialias = crop
    return v2.RandomResizedCrop(list(size), scale=scale, ratio=ratio, interpolation=interpolation,
                                antialias=antialias)


def as_pixels(image: Any) -> torch.Tensor:
    """A decoded picture (PIL RGB, or a uint8 CHW tensor) as a contiguous uint8 CHW tensor."""
    if isinstance(image, torch.Tensor):
        return image.contiguous()
    return F.pil_to_tensor(image).contiguous()


class EncodedImages(Transformed):
    """(image, label) pairs of another dataset as what the device finishes: JPEG bytes (or pixels, for what the
    worker had to decode) with the image's drawn crop and flip. Its ``collate`` makes the :class:`EncodedBatch`."""

    def __init__(self, base: Dataset, transform: v2.Compose, on_bad_image: str = "skip") -> None:
        super().__init__(base, transform, on_bad_image)
        self.plan = DevicePlan.of(transform)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int], int, str]:  # type: ignore[override]
        from finetune.data.images import EncodedJpeg

        image, label = self.base[i]
        if isinstance(image, EncodedJpeg):
            data, height, width = image.data, image.height, image.width
        else:
            data = as_pixels(image)
            height, width = data.shape[-2:]
        return data, self.plan.draw(height, width), int(label), self._name(i)

    def collate(self, items: Sequence[tuple[torch.Tensor, list[int], int, str]]) -> EncodedBatch:
        table = torch.tensor([[*params, label] for _, params, label, _ in items], dtype=torch.int64)
        return EncodedBatch([data for data, *_ in items], table, [name for *_, name in items], self.plan,
                            self.on_bad_image)


class EncodedBatch:
    """One DataLoader batch before decoding; ``.to(device)`` returns the ``(images, labels)`` the model trains on.

    The items (JPEG bytes, or pixels the worker decoded) are packed into one flat uint8 buffer with their shapes,
    and each row of ``table`` is an item's ``[top, left, height, width, flip, label]``: a batch leaves its worker
    as two tensors, as a stacked (images, labels) batch does. (Each tensor crosses the process boundary as a
    shared-memory file descriptor: one per image ran into the open-file limit at batch 256.)
    """

    def __init__(self, images: Sequence[torch.Tensor], table: torch.Tensor, names: list[str], plan: DevicePlan,
                 on_bad_image: str = "skip") -> None:
        self.shapes = [tuple(image.shape) for image in images]
        flat = [image.reshape(-1) for image in images]
        self.buffer = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
        self.table, self.names = table, names
        self.plan, self.on_bad_image = plan, on_bad_image

    @property
    def images(self) -> list[torch.Tensor]:
        """The items as views of the buffer: 1-D JPEG bytes, or uint8 CHW pixels."""
        out, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(self.buffer[start:start + size].view(shape))
            start += size
        return out

    @property
    def params(self) -> torch.Tensor:
        return self.table[:, :5]

    @property
    def labels(self) -> torch.Tensor:
        return self.table[:, 5]

    def __len__(self) -> int:
        return len(self.shapes)

    def pin_memory(self) -> EncodedBatch:
        """For the DataLoader's pin_memory thread: nvjpeg reads the bytes from the host, the pixels copy faster."""
        pinned = copy.copy(self)
        pinned.buffer, pinned.table = self.buffer.pin_memory(), self.table.pin_memory()
        return pinned

    def to(self, device: torch.device | str, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        decoded = decode_images(self.images, self.names, device, non_blocking)
        order = list(range(len(decoded)))
        if any(image is None for image in decoded):
            order = self._replace_bad(decoded, device)
        params = self.params.tolist()
        crops = [self.plan.apply(decoded[i], params[i]) for i in order]  # type: ignore[arg-type]
        labels = self.labels if order == list(range(len(decoded))) else self.labels[order]
        return self.plan.finish(torch.stack(crops)), labels.to(device, non_blocking=non_blocking)

    def _replace_bad(self, decoded: list[torch.Tensor | None], device: torch.device) -> list[int]:
        """Each undecodable image's place goes to the next good one of the batch (with its label and crop), as
        ImageFileDataset hands out the next good file: the batch keeps its size, a feature cache its row count."""
        bad = [i for i, image in enumerate(decoded) if image is None]
        names = ", ".join(self.names[i] for i in bad)
        if self.on_bad_image == "error" or len(bad) == len(decoded):
            raise SetupError(f"{names} could not be decoded on {device}. Fix or delete the file(s), or rerun with "
                             "data.on_bad_image=skip (python -m finetune.check on the data lists every bad file).")
        log.warning("skipping %s: it could not be decoded on %s (the next image of its batch takes its place)",
                    names, device)
        n = len(decoded)
        return [next((i + k) % n for k in range(n) if decoded[(i + k) % n] is not None) for i in range(n)]


def decode_images(images: Sequence[torch.Tensor], names: Sequence[str], device: torch.device,
                  non_blocking: bool = False) -> list[torch.Tensor | None]:
    """uint8 CHW pixels on ``device`` for each item: 1-D items are JPEG bytes, decoded in one batched call (nvjpeg
    on CUDA); 3-D items were decoded by the worker and are only copied. None for a file that cannot be decoded."""
    from finetune.data.images import decode_jpeg_quietly

    out: list[torch.Tensor | None] = [None] * len(images)
    encoded = [i for i, image in enumerate(images) if image.ndim == 1]
    if encoded and device.type == "cuda":
        # torchvision's nvJPEG decode writes on its own stream without waiting for this one, into memory the
        # caching allocator may hand it while queued kernels still read it (pytorch/vision#9606); it syncs the
        # host before returning anyway, so waiting first costs little
        torch.cuda.current_stream(device).synchronize()
    for i, image in enumerate(images):
        if image.ndim != 1:
            out[i] = image.to(device, non_blocking=non_blocking)
    if encoded:
        try:
            batch = decode_jpeg_quietly([images[i] for i in encoded], device=device)
        except Exception as error:  # one bad file fails the batched call (no partial results): one by one
            log.info("batched decode on %s failed (%s: %s); this batch is decoded one file at a time", device,
                     type(error).__name__, str(error)[:200])
            batch = [decode_one(images[i], names[i], device) for i in encoded]
        for i, image in zip(encoded, batch, strict=True):
            out[i] = image
    return out


def decode_one(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor | None:
    """One JPEG the batched call refused: decode_jpeg alone, else Pillow's strict decode, else None (unusable)."""
    from finetune.data.images import BadImageError, decode_jpeg_quietly, decode_rgb

    try:
        return decode_jpeg_quietly(data, device=device)
    except Exception:
        pass
    try:
        image, _ = decode_rgb(data.numpy().tobytes(), name)
    except BadImageError as error:
        log.warning("cannot decode %s (%s)", name, error.reason)
        return None
    return as_pixels(image).to(device)
