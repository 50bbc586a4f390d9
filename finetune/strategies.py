"""Freeze strategies: which stages train, how frozen stages behave, LR per param group.

A strategy only sees the backbone's ordered stage list; it knows nothing of the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from finetune.backbones import Backbone
from finetune.errors import SetupError

STRATEGY_NAMES = ("feature_extractor", "partial_unfreeze", "full_finetune", "linear_probe")


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


def param_groups(
    backbone: Backbone,
    head: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_ratio: float,
    no_decay_norm_bias: bool = True,
) -> list[dict]:
    """Optimizer groups: the head at ``lr``, trainable stages at ``lr * backbone_lr_ratio``.

    Like Lightning's BackboneFinetuning, the backbone LR is a ratio of the head LR.
    Groups carry a ``name`` so LR monitors and logs can tell them apart.
    """
    groups: list[dict] = []

    def add(name: str, module: nn.Module, group_lr: float) -> None:
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if no_decay_norm_bias and _no_decay(pname, p) else decay).append(p)
        if decay:
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": f"{name}/no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0})

    add("head", head, lr)
    for stage in backbone.stage_names:
        if stage not in backbone.frozen:
            add(f"backbone.{stage}", backbone.stages[stage], lr * backbone_lr_ratio)
    return groups
