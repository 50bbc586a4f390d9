"""The batch of several optimizer steps that the module takes in one Lightning step (cache.resident).

Defined with the module that consumes it (:meth:`finetune.model.module.FinetuneModule.training_step`);
:mod:`finetune.data.resident` makes them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class FeatureBlock(NamedTuple):
    """Consecutive minibatches of one epoch's order, gathered on the device: ``x[i*b:(i+1)*b]`` is step i.

    A NamedTuple, so Lightning's precision plugin (bf16-true) and device transfer convert its tensors.
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int

    @property
    def steps(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def minibatch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]
