"""Recipes: gradual unfreezing (exact, resumable, DDP-safe), layer-wise LR, class weights, LR finder, regularizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.model.module import FinetuneModule
from finetune.model.strategies import param_groups, unfreeze_schedule
from finetune.model.unfreezing import StageUnfreezer
from finetune.run.builders import resolve_class_weights
from finetune.run.train import train
from tests.conftest import kill_resume_and_compare, own_dir, write_image_folder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the in-process trainings; subprocesses get ENV


class _Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.at_epoch_end: list[dict[str, torch.Tensor]] = []
        self.trainable: list[list[str]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.at_epoch_end.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.trainable.append(list(pl_module.trainable))


def _changed(before: dict, after: dict, stage: str) -> tuple[bool, bool]:
    keys = [k for k in before if k.startswith(f"backbone.stages.{stage}.")]
    stats = [k for k in keys if k.endswith(("running_mean", "running_var"))]
    params = [k for k in keys if k not in stats and not k.endswith("num_batches_tracked")]
    return (any(not torch.equal(before[k], after[k]) for k in params),
            any(not torch.equal(before[k], after[k]) for k in stats))


def test_gradual_unfreeze_trains_each_stage_only_after_its_milestone() -> None:
    torch.manual_seed(0)
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="gradual_unfreeze",
                            milestones=[1, 2], optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.01},
                            scheduler={"name": "cosine", "warmup_epochs": 0})
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32) * 2 + 0.5, torch.randint(0, 3, (8,))
    snaps = _Snapshots()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[StageUnfreezer(), snaps])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    assert snaps.trainable == [[], ["layer4"], ["layer4", "layer3"]]
    for epoch, state in enumerate(snaps.at_epoch_end):
        for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
            unfrozen = {"layer4": 1, "layer3": 2}.get(stage, 99) <= epoch
            params, stats = _changed(initial, state, stage)
            assert params == unfrozen, f"epoch {epoch}: {stage} params changed={params}"
            assert stats == unfrozen, f"epoch {epoch}: {stage} BN stats changed={stats}"


def test_layer_decay_sets_each_stage_lr() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="full_finetune")
    groups = param_groups(module.backbone, module.head, lr=1.0, weight_decay=0.1, backbone_lr_ratio=0.1,
                          layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups if not g["name"].endswith("no_decay")}
    assert lrs == {"head": 1.0, "backbone.layer4": 0.5, "backbone.layer3": 0.25, "backbone.layer2": 0.125,
                   "backbone.layer1": 0.0625, "backbone.stem": 0.03125}


def test_group_lr_is_zero_until_milestone_then_warms_up() -> None:
    import types

    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="gradual_unfreeze",
                            milestones=[1], optimizer={"name": "adamw", "lr": 1e-3},
                            scheduler={"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.0})
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=30, max_epochs=3)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    layer4 = next(g for g in optimizer.param_groups if g["name"] == "backbone.layer4")
    seen = []
    for _ in range(12):
        seen.append(layer4["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:10] == [0.0] * 10
    assert 0 < seen[10] < seen[11] <= 1e-4  # its own warmup towards lr x backbone_lr_ratio


def test_freeze_then_finetune_schedule() -> None:
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert unfreeze_schedule(names, "freeze_then_finetune", freeze_epochs=2) == [(0, []), (2, names)]
    with pytest.raises(Exception, match="milestones"):
        unfreeze_schedule(names, "gradual_unfreeze", milestones=[3, 2])


def test_class_weights_auto_from_imbalanced_folder(compose_cfg, tmp_path: Path) -> None:
    from finetune.data.datasets import load_splits

    root = tmp_path / "imbalanced"
    write_image_folder(root / "train", classes=3, per_class=4)
    for i in range(8):  # class_0 gets 12 images, the others 4
        (root / "train" / "class_0" / f"extra_{i}.png").write_bytes((root / "train" / "class_0" /
                                                                     "img_000.png").read_bytes())
    write_image_folder(root / "val", classes=3, per_class=2)
    write_image_folder(root / "test", classes=3, per_class=2)
    cfg = compose_cfg("data=folder", f"data.root={root}")
    splits = load_splits(cfg.data)
    weights = resolve_class_weights("auto", splits)
    assert weights == pytest.approx([20 / (3 * 12), 20 / (3 * 4), 20 / (3 * 4)])
    summary = train(compose_cfg("backbone.weights=none", "data=folder", f"data.root={root}", "data.image_size=32",
                                "trainer.max_epochs=1", "logger=none", "loss.class_weights=auto",
                                "data.balanced_sampler=true", "data.check=false"))
    assert summary["class_counts"]["train"] == [12, 4, 4]
    assert summary["recipe"]["loss"]["class_weights"] == "auto"


def test_lr_find_writes_plot_and_suggestion(compose_cfg) -> None:
    cfg = compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1", "tune.lr_find=true")
    summary = train(cfg)
    assert Path(summary["lr_find"]["plot"]).stat().st_size > 1000
    assert summary["lr_find"]["suggested_lr"] > 0
    assert summary["recipe"]["optimizer"]["lr"] == pytest.approx(1e-3)  # the configured one, for the record


def test_regularizers_run_together(compose_cfg, image_folder: Path) -> None:
    summary = train(compose_cfg(
        "backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
        "data.num_workers=0", "trainer.max_epochs=2", "logger=none", "strategy=partial_unfreeze",
        "strategy.unfreeze_last=1", "data.augment=true", "regularization.mixup_alpha=0.2",
        "regularization.cutmix_alpha=1.0", "regularization.ema_decay=0.9", "regularization.tta_hflip=true",
        "loss.label_smoothing=0.1", "head.type=mlp", "head.dropout=0.2"))
    assert summary["feature_cache"] is None  # augmentation without cached views: images every epoch
    assert 0.0 <= summary["test"]["acc"] <= 1.0 and summary["recipe"]["regularization"]["tta_hflip"]


def _gradual_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "backbone=resnet18", "backbone.weights=none",
            "strategy=gradual_unfreeze", "strategy.milestones=[1,2]", "data=folder", f"data.root={root}",
            "data.image_size=32", "data.batch_size=2", "data.num_workers=0", "data.check=false",
            "data.augment=false", "cache.enabled=false", "trainer.max_epochs=3", "trainer.accelerator=cpu",
            "callbacks.progress_bar=none", f"hydra.run.dir={run_dir}", *extra]


def test_kill_after_milestone_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, per_class=24)  # 29 steps an epoch at batch 2
    # killed right after epoch 2's checkpoint: inside epoch 3, with milestone 1 passed (layer4 training)
    straight_dir, run_dir = kill_resume_and_compare(lambda d, *extra: _gradual_args(root, d, *extra), tmp_path,
                                                    ENV, kill_after_epoch=1)
    sa = json.loads((straight_dir / "summary.json").read_text())
    sb = json.loads((run_dir / "summary.json").read_text())
    assert sa["unfreeze_events"] == sb["unfreeze_events"] == [
        {"epoch": 1, "stages": ["layer4"], "trainable_params": sa["unfreeze_events"][0]["trainable_params"]},
        {"epoch": 2, "stages": ["layer3"], "trainable_params": sa["unfreeze_events"][1]["trainable_params"]},
    ]
    assert sa["params_trainable"] == sb["params_trainable"]


def test_gradual_unfreeze_under_two_process_ddp(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, per_class=8)
    run_dir = tmp_path / "ddp"
    proc = subprocess.run(
        _gradual_args(root, run_dir, "strategy.milestones=[1]", "trainer.max_epochs=2", "trainer=ddp",
                      "trainer.devices=2", "trainer.accelerator=cpu"),
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [e["stages"] for e in summary["unfreeze_events"]] == [["layer4"]]
    assert summary["epochs_run"] == 2


def test_ema_weights_are_what_test_scores(compose_cfg, image_folder) -> None:
    """The best checkpoint's averaged weights (what val picked) are tested, not the raw ones."""
    common = ("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
              "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=2", "logger=none",
              "strategy=partial_unfreeze", "strategy.unfreeze_last=1", "cache.enabled=false")
    raw = train(compose_cfg(*common))
    ema = train(own_dir(compose_cfg(*common, "regularization.ema_decay=0.5"), "ema"))
    assert ema["test"]["loss"] != pytest.approx(raw["test"]["loss"], abs=1e-6)
    best = torch.load(ema["best_checkpoint"], map_location="cpu", weights_only=True)
    last = torch.load(Path(ema["run_dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "averaging_state" in best and "current_model_state" not in best  # averaged weights, no raw copy
    assert "current_model_state" in last  # the raw weights training continues from


def _train_head(fused: str) -> tuple[FinetuneModule, bool | None, list[torch.Tensor]]:
    """A feature_extractor head trained 4 steps; returns it, whether its optimizer was fused, its initial weights."""
    torch.manual_seed(0)
    module = FinetuneModule("resnet18", num_classes=3, weights="none", strategy="feature_extractor",
                            optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "fused": fused})
    initial = [p.detach().clone() for p in module.head.parameters()]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    return module, trainer.optimizers[0].defaults["fused"], initial


def test_fused_optimizer_trains_like_the_default_one() -> None:
    (fused, fused_used, initial), (default, default_used, _) = _train_head("true"), _train_head("false")
    assert fused_used is True and not default_used
    assert _train_head("auto")[1] is True  # auto: fused on a CPU too (one kernel, no Python loop over parameters)
    for a, b, start in zip(fused.head.parameters(), default.head.parameters(), initial, strict=True):
        assert not torch.allclose(a, start)  # it trained
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hook_bookkeeping_skips_module_setattr_but_submodules_still_register(monkeypatch) -> None:
    calls: list[str] = []
    original = torch.nn.Module.__setattr__

    def counting(self, name, value):
        calls.append(name)
        original(self, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting)
    module, _, _ = _train_head("auto")
    assert "_current_fx_name" not in calls  # Lightning sets it ~50 times per step
    module.probe = torch.nn.Linear(2, 2)
    assert "probe.weight" in module.state_dict()
