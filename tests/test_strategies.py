"""Freeze strategies under a real Lightning Trainer: frozen means bit-identical, BN stats included."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.errors import SetupError
from finetune.model.module import FinetuneModule
from finetune.model.strategies import param_groups, trainable_stages


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _fit_two_steps(module: FinetuneModule) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32) * 2 + 0.5  # far from BN's initial stats: any update would show
    y = torch.randint(0, 4, (8,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2


def _stage_changed(before: dict, after: dict, stage: str) -> tuple[bool, bool]:
    """(any parameter changed, any BN running stat changed) for one stage."""
    keys = [k for k in before if k.startswith(f"backbone.stages.{stage}.")]
    params = [k for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    return (any(not torch.equal(before[k], after[k]) for k in params),
            any(not torch.equal(before[k], after[k]) for k in stats))


@pytest.mark.parametrize(
    ("backbone", "strategy", "unfreeze_last"),
    [
        ("resnet18", "feature_extractor", None),
        ("resnet18", "partial_unfreeze", 2),
        ("resnet18", "full_finetune", None),
        ("vgg11_bn", "feature_extractor", None),
        ("vgg11_bn", "partial_unfreeze", 3),
    ],
)
def test_frozen_stages_are_bit_identical_after_training(backbone: str, strategy: str, unfreeze_last) -> None:
    module = FinetuneModule(backbone, num_classes=4, weights="none", strategy=strategy,
                            unfreeze_last=unfreeze_last, scheduler={"name": "none"},
                            optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    before = _snapshot(module)
    _fit_two_steps(module)
    after = _snapshot(module)
    stages = module.backbone.stage_names
    for stage in stages:
        params_changed, stats_changed = _stage_changed(before, after, stage)
        if stage in module.trainable:
            assert params_changed, f"{stage} should train under {strategy}"
        else:
            assert not params_changed, f"frozen {stage} changed under {strategy}"
            assert not stats_changed, f"BN running stats of frozen {stage} moved under {strategy}"
    head_changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert head_changed
    if strategy == "full_finetune":
        assert module.trainable == stages


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_partial_unfreeze_trains_exactly_last_n_stages(n: int) -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="partial_unfreeze",
                            unfreeze_last=n)
    stages = module.backbone.stage_names
    assert module.trainable == stages[-n:]
    for i, stage in enumerate(stages):
        flags = {p.requires_grad for p in module.backbone.stages[stage].parameters()}
        assert flags == {i >= len(stages) - n}


def test_frozen_bn_stays_in_eval_mode_after_train_call() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="partial_unfreeze",
                            unfreeze_last=1)
    module.train()  # what Lightning calls at every epoch start
    bns = {name: m.training for name, m in module.backbone.named_modules()
           if isinstance(m, torch.nn.BatchNorm2d)}
    assert not any(v for k, v in bns.items() if not k.startswith("stages.layer4"))
    assert all(v for k, v in bns.items() if k.startswith("stages.layer4"))


def test_no_autograd_graph_for_frozen_prefix() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="feature_extractor")
    feats = module.backbone(torch.randn(2, 3, 32, 32))
    assert feats.grad_fn is None and not feats.requires_grad


def test_backbone_lr_is_ratio_of_head_lr() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="partial_unfreeze",
                            unfreeze_last=2, backbone_lr_ratio=0.25)
    groups = param_groups(module.backbone, module.head, lr=0.4, weight_decay=0.05, backbone_lr_ratio=0.25)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(0.4)
    assert lrs["backbone.layer3"] == pytest.approx(0.1) and lrs["backbone.layer4"] == pytest.approx(0.1)
    assert not any(name.startswith(("backbone.stem", "backbone.layer1")) for name in lrs)
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_unfreeze_last_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(SetupError, match=r"1\.\.5"):
        trainable_stages(["stem", "layer1", "layer2", "layer3", "layer4"], "partial_unfreeze", 9)


def test_train_order_comes_from_seed_and_epoch_not_the_global_rng() -> None:
    import torch

    from finetune.data.datamodule import EpochSampler, balanced_sampler

    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    torch.rand(10)  # global RNG use in between changes nothing
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b) and list(EpochSampler(50, seed=4)) != list(EpochSampler(50, seed=3))
    drawn = list(balanced_sampler([0] * 45 + [1] * 5, seed=0))  # with replacement, classes equally often
    assert len(drawn) == 50 and 15 < sum(i >= 45 for i in drawn) < 35
