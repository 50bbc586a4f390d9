"""Freeze strategies: which stages train, how frozen stages behave, LR per param group.

A strategy only sees the backbone's ordered stage list; it knows nothing of the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from finetune.errors import SetupError
from finetune.model.backbones import Backbone

STRATEGY_NAMES = (
    "feature_extractor", "partial_unfreeze", "full_finetune", "linear_probe", "gradual_unfreeze",
    "freeze_then_finetune",
)
SCHEDULED = ("gradual_unfreeze", "freeze_then_finetune")


def trainable_stages(
    stage_names: Sequence[str], strategy: str, unfreeze_last: int | None = None
) -> list[str]:
    """Names of the stages that train under ``strategy`` (always a suffix of the list)."""
    n = len(stage_names)
    if strategy in ("feature_extractor", "linear_probe"):
        return []
    if strategy == "full_finetune":
        return list(stage_names)
    if strategy == "partial_unfreeze":
        if unfreeze_last is None or not 1 <= int(unfreeze_last) <= n:
            raise SetupError(
                f"strategy.unfreeze_last={unfreeze_last} is out of range: this backbone has {n} "
                f"stages ({', '.join(stage_names)}), so use 1..{n} (or strategy=feature_extractor "
                f"for 0, strategy=full_finetune for all)."
            )
        return list(stage_names[n - int(unfreeze_last):])
    raise SetupError(f"Unknown strategy '{strategy}'. Choose one of: {', '.join(STRATEGY_NAMES)}.")


def unfreeze_schedule(
    stage_names: Sequence[str], strategy: str, unfreeze_last: int | None = None,
    milestones: Sequence[int] | None = None, freeze_epochs: int | None = None,
) -> list[tuple[int, list[str]]]:
    """When each stage starts training: [(epoch, stages that start then), ...], epochs ascending.

    Fixed strategies have one event at epoch 0. gradual_unfreeze (ULMFiT) starts as a feature
    extractor and adds one stage per milestone, from the head side; freeze_then_finetune (fastai's
    fine_tune) trains the head for ``freeze_epochs``, then every stage.
    """
    n = len(stage_names)
    if strategy == "gradual_unfreeze":
        epochs = [int(e) for e in (milestones or [])]
        if not epochs or epochs != sorted(set(epochs)) or epochs[0] < 1:
            raise SetupError(
                f"strategy.milestones={list(milestones or [])} must be increasing epochs >= 1, one per stage "
                f"to unfreeze from the head side (e.g. strategy.milestones=[2,4,6])."
            )
        if len(epochs) > n:
            raise SetupError(f"strategy.milestones has {len(epochs)} epochs but this backbone has only {n} stages "
                             f"({', '.join(stage_names)}).")
        return [(0, []), *((e, [stage_names[n - 1 - i]]) for i, e in enumerate(epochs))]
    if strategy == "freeze_then_finetune":
        if freeze_epochs is None or int(freeze_epochs) < 1:
            raise SetupError(f"strategy.freeze_epochs={freeze_epochs} must be >= 1 (epochs of head-only training).")
        return [(0, []), (int(freeze_epochs), list(stage_names))]
    return [(0, trainable_stages(stage_names, strategy, unfreeze_last))]


def trainable_at(schedule: Sequence[tuple[int, Sequence[str]]], epoch: int) -> list[str]:
    """Stages trainable during ``epoch`` under a schedule from ``unfreeze_schedule``."""
    return [stage for start, stages in schedule if start <= epoch for stage in stages]


def freeze_stages(backbone: Backbone, trainable: Iterable[str]) -> None:
    """Freeze every stage not in ``trainable``: no gradients, BatchNorm/dropout kept in eval."""
    trainable = set(trainable)
    unknown = trainable - set(backbone.stage_names)
    if unknown:
        raise SetupError(f"Unknown stages {sorted(unknown)}; this backbone has {backbone.stage_names}.")
    frozen = tuple(name for name in backbone.stage_names if name not in trainable)
    for name in backbone.stage_names:
        for p in backbone.stages[name].parameters():
            p.requires_grad_(name in trainable)
    backbone.frozen = frozen
    backbone.train(backbone.training)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-D tensors) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def stage_lr(stage_names: Sequence[str], stage: str, lr: float, backbone_lr_ratio: float,
             layer_decay: float | None = None) -> float:
    """Head LR x ratio, or with layer-wise decay head LR x decay^(distance from the head)."""
    if layer_decay is None:
        return lr * backbone_lr_ratio
    distance = len(stage_names) - list(stage_names).index(stage)
    return lr * float(layer_decay) ** distance


def param_groups(
    backbone: Backbone,
    head: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_ratio: float,
    no_decay_norm_bias: bool = True,
    layer_decay: float | None = None,
    stages: Sequence[str] | None = None,
) -> list[dict]:
    """Optimizer groups: the head at ``lr``, each trainable stage at its ``stage_lr``.

    Like Lightning's BackboneFinetuning, the backbone LR is a ratio of the head LR (or decays
    layer-wise). ``stages`` (default: the trainable ones) may include stages that unfreeze later:
    their group exists from the start, so the optimizer's layout never changes and a checkpoint
    restores into it. Groups carry a ``name`` (and ``stage``) for LR monitors and schedules.
    """
    groups: list[dict] = []

    def add(name: str, module: nn.Module, group_lr: float, stage: str | None, every: bool) -> None:
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if not (p.requires_grad or every):
                continue
            (no_decay if no_decay_norm_bias and _no_decay(pname, p) else decay).append(p)
        if decay:
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay,
                           "stage": stage})
        if no_decay:
            groups.append({"name": f"{name}/no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0,
                           "stage": stage})

    add("head", head, lr, None, every=False)
    names = backbone.stage_names
    wanted = [s for s in names if s not in backbone.frozen] if stages is None else list(stages)
    for stage in names:
        if stage in wanted:
            add(f"backbone.{stage}", backbone.stages[stage], stage_lr(names, stage, lr, backbone_lr_ratio,
                                                                       layer_decay), stage, every=True)
    return groups
