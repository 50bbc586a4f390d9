"""Train and eval transforms, derived from the weights' own preprocessing (never retyped)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import InterpolationMode, v2

from finetune.model.backbones import Preprocessing


def _to_normalized_tensor(prep: Preprocessing) -> list:
    import torch

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]


def eval_transform(prep: Preprocessing) -> v2.Compose:
    """Resize + center crop + normalise: the weights' eval protocol (deterministic)."""
    return v2.Compose(
        [v2.Resize(prep.resize_size, interpolation=InterpolationMode(prep.interpolation), antialias=True),
         v2.CenterCrop(prep.crop_size), *_to_normalized_tensor(prep)]
    )


def train_transform(
    prep: Preprocessing, augment: bool, hflip: bool = True, scale: Sequence[float] = (0.08, 1.0)
) -> v2.Compose:
    """RandomResizedCrop (+ flip) when ``augment``; otherwise exactly the eval transform."""
    if not augment:
        return eval_transform(prep)
    steps: list = [v2.RandomResizedCrop(prep.crop_size, scale=tuple(scale),
                                        interpolation=InterpolationMode(prep.interpolation), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalized_tensor(prep))


def describe(transform: v2.Compose) -> str:
    """A stable text of the transform, used in cache keys."""
    return repr(transform)
