"""Frozen stages: out of checkpoints when their source can rebuild them, off the device while cached.

A stage frozen for the whole run never changes. When its weights come from a source that can give
them again (torchvision's ImageNet file, a weights file), a checkpoint need not carry them: without
this every epoch rewrote the whole frozen backbone into ``last.ckpt`` and the best checkpoint (0.5 GB
for VGG-16), the largest fixed cost of a run on cached features. The checkpoint instead records which
stages it leaves out, their source and a fingerprint of their tensors; loading rebuilds them from the
source and refuses one whose tensors differ. ``checkpoint_frozen_stages=store`` keeps them in.

While a run trains on cached outputs of the frozen prefix, that prefix is not needed at all: it is
held outside the module (:class:`HeldStages`), so Lightning does not move it to the device, DDP does
not see it, and peak device memory is that of the trainable part alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

RECORD_KEY = "finetune_frozen_stages"
MODES = ("reference", "store")
# torch.compile's wrapper prefixes every state_dict key with this.
COMPILED_PREFIX = "_orig_mod."
# How a FinetuneModule's state_dict names backbone tensors: backbone.stages.<stage>.<key in the stage>
STAGE_KEYS_PREFIX = "backbone.stages."
SAMPLES_PER_TENSOR = 1024


def stage_of(key: str, stages: Iterable[str]) -> str | None:
    """The backbone stage a state_dict key belongs to, among ``stages`` (None if another part)."""
    key = key.removeprefix(COMPILED_PREFIX)
    for stage in stages:
        if key.startswith(f"{STAGE_KEYS_PREFIX}{stage}."):
            return stage
    return None


def pop_stages(state: dict[str, Any], stages: Iterable[str]) -> dict[str, Any]:
    """Remove and return the tensors of ``stages`` from a state_dict (keys unchanged)."""
    stages = list(stages)
    taken = {k: v for k, v in state.items() if stage_of(k, stages) is not None}
    for key in taken:
        del state[key]
    return taken


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A cheap hash of a set of tensors: names, shapes and ~1k evenly spaced values of each.

    Enough to tell one weights file from another (or from a retrained one) without hashing 0.5 GB.
    Modules take it when built, from the source's tensors, before any cast to bf16 or fp16.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors, key=lambda k: k.removeprefix(COMPILED_PREFIX)):
        t = tensors[key].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64).contiguous()
        digest.update(f"{key.removeprefix(COMPILED_PREFIX)}|{tuple(t.shape)}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


class DetachedStage(nn.Module):
    """Stands in for a frozen stage whose outputs come from the feature cache: no tensors, never runs."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"Stage '{self.name}' is detached while the module trains on its cached outputs; feed cached "
            f"features (input_stage) or call attach_frozen_prefix() first."
        )


class HeldStages:
    """Frozen stages taken out of the module: not a submodule, and shared (not copied) by deepcopy.

    Lightning's EMA keeps a deepcopy of the module; sharing keeps the frozen weights in memory once.
    """

    def __init__(self, stages: dict[str, nn.Module]) -> None:
        self.stages = stages

    def __deepcopy__(self, memo: dict[int, Any]) -> HeldStages:
        return self

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors (module keys) into the held stages; every held tensor must be given."""
        for name, stage in self.stages.items():
            prefix = f"{STAGE_KEYS_PREFIX}{name}."
            stage.load_state_dict({k.removeprefix(COMPILED_PREFIX).removeprefix(prefix): v
                                   for k, v in state.items() if stage_of(k, [name])}, strict=True)


def weight_dicts(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint's state dicts: ``state_dict`` and, with Lightning's EMA, ``current_model_state``."""
    return [state for key in ("state_dict", "current_model_state") if isinstance(state := checkpoint.get(key), dict)]
