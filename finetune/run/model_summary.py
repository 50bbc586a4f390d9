"""The model summary printed when fit starts: every stage with its parameters and what it does this run.

Lightning's own summary counts the module's current parameters: with the feature cache the frozen
prefix is out of the module (its outputs are read from disk), so it showed the backbone with 0
parameters and 0 FLOPs while summary.json said 11.18 M. This one counts every stage, attached or
held, and says which train, which are frozen, and which are served from the cache.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from torch import nn

from finetune.model.module import FinetuneModule

log = logging.getLogger("finetune")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M" if n >= 10_000 else f"{n:,}"


def stage_rows(module: FinetuneModule) -> list[tuple[str, int, str]]:
    """(stage, parameters, state) for each backbone stage then the head; state: trains, frozen,
    frozen · cached, or frozen · trains from epoch N."""
    held: Any = module.held.stages if module.held is not None else {}
    starts = {stage: epoch for epoch, stages in module.schedule for stage in stages}
    rows = []
    for index, name in enumerate(module.backbone.stage_names):
        stage = held[name] if name in held else module.backbone.stages[name]
        if name in module.trainable:
            state = "trains"
        elif name in starts:
            state = f"frozen · trains from epoch {starts[name]}"
        elif index < module.input_stage:
            state = "frozen · cached"
        else:
            state = "frozen"
        rows.append((name, _count(stage), state))
    rows.append(("head (new)", _count(module.head), "trains"))
    return rows


def summary_text(module: FinetuneModule) -> str:
    """The table as plain text (aligned columns, under 80 characters wide) with the totals."""
    rows = stage_rows(module)
    total = sum(n for _, n, _ in rows)
    trainable = sum(n for _, n, state in rows if state == "trains")
    cached = sum(n for _, n, state in rows if state.endswith("cached"))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{module.backbone.name}: {len(rows) - 1} stages and the new head"]
    lines += [f"  {name:<{width}}  {_millions(n):>10}  {state}" for name, n, state in rows]
    lines.append(f"  total {_millions(total)}, trainable {_millions(trainable)}, frozen {_millions(total - trainable)}")
    if cached:
        lines.append(f"  cached {_millions(cached)}: those stages run once, their outputs are read from the cache")
    return "\n".join(lines)


class StageSummary(pl.Callback):
    """Print :func:`summary_text` once when fit starts (rank 0); the run's Trainer turns Lightning's off."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and isinstance(pl_module, FinetuneModule):
            log.info("%s", summary_text(pl_module))
