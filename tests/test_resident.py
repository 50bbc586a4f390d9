"""Resident cached features (cache.resident): blocks of optimizer steps train exactly what per-step batches train."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from torch.utils.data import DataLoader

from finetune.config.typed import to_typed
from finetune.data.datamodule import EpochSampler
from finetune.data.features import keep_batch
from finetune.data.resident import RING, BlockLoader, ResidentFeatures, block_steps
from finetune.errors import SetupError
from finetune.run.builders import decide_blocks
from finetune.run.train import train
from tests.conftest import own_dir, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("resident-data") / "images", classes=3, per_class=20)


def _run(compose_cfg, folder: Path, name: str, *extra: str, bar: str = "none") -> tuple[dict, dict, str]:
    strategy = () if any(e.startswith("strategy=") for e in extra) else ("strategy=feature_extractor",)
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={folder}", "data.image_size=32",
                      "data.batch_size=4", "data.num_workers=0", *strategy, "trainer.max_epochs=3",
                      "trainer.log_every_n_steps=3", "logger=csv", *extra)
    with open_dict(cfg):
        cfg.callbacks.progress_bar = bar  # the user's default bar (rich) on one run: it counts blocks then
    summary = train(own_dir(cfg, name))
    run = Path(summary["run_dir"])
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return summary, last, next(run.rglob("metrics.csv")).read_text()


@pytest.mark.parametrize("extra", [
    # EMA, Mixup on features, 2 cached augmented views (numpy draws per minibatch), class-balanced order
    ("regularization.ema_decay=0.9", "regularization.mixup_alpha=0.2", "data.augment=true", "cache.views=2",
     "data.balanced_sampler=true"),
    # a limit inside a block, no scheduler
    ("trainer.max_steps=7", "scheduler.name=none"),
    # cached frozen prefix of partial unfreezing: spatial maps, trainable stages with BatchNorm in train mode
    ("strategy=partial_unfreeze", "strategy.unfreeze_last=1", "data.augment=false"),
    # gradual unfreezing: a stage joins the optimizer at the milestone epoch, inside the cached run
    ("strategy=gradual_unfreeze", "strategy.milestones=[1]", "data.augment=false"),
    # gradient clipping (by norm, and by value), tight enough to clip every step
    ("trainer.gradient_clip_val=0.01",),
    ("trainer.gradient_clip_val=0.001", "trainer.gradient_clip_algorithm=value"),
], ids=["ema-mixup-views-balanced", "max_steps", "partial_unfreeze", "gradual_unfreeze", "clip-norm", "clip-value"])
def test_blocks_train_what_batches_read_per_step_train(compose_cfg, folder: Path, monkeypatch, caplog,
                                                       extra: tuple[str, ...]) -> None:
    per_step = _run(compose_cfg, folder, "per_step", *extra, "cache.resident=false")
    with caplog.at_level(logging.INFO, logger="finetune"):
        # 12 steps an epoch in blocks of 5 (5, 5, 2); the loggers' steps still count optimizer steps
        blocks = _run(compose_cfg, folder, "blocks", *extra, "cache.steps_per_block=5", bar="rich")
    assert "5 optimizer steps per Lightning step" in caplog.text
    monkeypatch.setattr("finetune.data.resident.free_memory", lambda device: 1024)  # auto: no room on the device
    with caplog.at_level(logging.INFO, logger="finetune"):
        no_room = _run(compose_cfg, folder, "no_room", *extra, "cache.steps_per_block=5")
    assert "batches are read from the cache files instead" in caplog.text

    assert per_step[0]["cached_batches"] == no_room[0]["cached_batches"] == {"resident": False,
                                                                              "optimizer_steps_per_batch": 1}
    assert blocks[0]["cached_batches"] == {"resident": True, "optimizer_steps_per_batch": 5}
    for summary, last, metrics in (blocks, no_room):
        assert summary["global_steps"] == per_step[0]["global_steps"]
        assert summary["test"] == per_step[0]["test"]
        assert metrics == per_step[2]  # every logged value at the same step: step loss, epoch means, val, LR
        for key, value in per_step[1]["state_dict"].items():
            assert torch.equal(value, last["state_dict"][key]), key
        moments = [(a, b) for sa, sb in zip(per_step[1]["optimizer_states"][0]["state"].values(),
                                            last["optimizer_states"][0]["state"].values(), strict=True)
                   for a, b in zip(sa.values(), sb.values(), strict=True)]
        assert moments and all(torch.equal(a, b) for a, b in moments)
        assert last["lr_schedulers"] == per_step[1]["lr_schedulers"]
        assert last["loops"]["fit_loop"]["epoch_loop.state_dict"] == per_step[1]["loops"]["fit_loop"][
            "epoch_loop.state_dict"]  # the loggers' step counter


@pytest.mark.parametrize("views", [1, 3])
def test_block_loader_yields_the_dataloaders_minibatches(views: int) -> None:
    """Same order, same rows, same view draws, the short last batch dropped; a positioned sampler skips blocks."""
    from finetune.data.features import FeatureDataset

    rows, batch = 23, 4
    features = np.random.default_rng(0).standard_normal((views, rows, 6) if views > 1 else (rows, 6))
    features = features.astype(np.float16)  # stored half: both paths hand out float32
    labels = np.arange(rows) % 3
    dataset = FeatureDataset.__new__(FeatureDataset)
    dataset.features, dataset.labels, dataset.views, dataset.rows = features, labels, views, rows
    sampler = EpochSampler(rows, seed=7)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=keep_batch, drop_last=True)
    blocks = BlockLoader(ResidentFeatures(features, labels, views, torch.device("cpu")), sampler, batch, 2, True)
    assert (len(blocks), blocks.optimizer_steps_per_epoch, blocks.samples_per_batch) == (3, 5, 8)
    sampler.set_epoch(3)
    np.random.seed(1)
    expected = list(loader)
    np.random.seed(1)
    got = [block.minibatch(i) for block in blocks for i in range(block.steps)]
    assert len(got) == len(expected) == 5
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert x.dtype == ex.dtype == torch.float32 and torch.equal(x, ex) and torch.equal(y, ey)
    sampler.start_at(3, 2 * blocks.samples_per_batch)  # a resume after 2 blocks: the rest of the epoch
    np.random.seed(1)
    rest = [block.minibatch(i) for block in blocks for i in range(block.steps)]
    assert [y.tolist() for _, y in rest] == [y.tolist() for _, y in expected[4:]]


def test_blocks_reuse_ring_buffers_without_touching_the_blocks_in_use() -> None:
    """Blocks are gathered into RING reused buffers, not fresh memory each: over more blocks than buffers and
    across epochs each block holds its own rows while it trains and while the loop holds the next one."""
    rows, batch, steps = 40, 2, 2
    features = np.random.default_rng(0).standard_normal((rows, 3)).astype(np.float32)
    labels = np.arange(rows) % 4
    sampler = EpochSampler(rows, seed=1)
    loader = BlockLoader(ResidentFeatures(features, labels, 1, torch.device("cpu")), sampler, batch, steps, True)
    buffers = set()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = np.fromiter(iter(sampler), dtype=np.int64)
        expected = [torch.from_numpy(features[order[i:i + batch * steps]]) for i in range(0, rows, batch * steps)]
        previous = None
        for k, block in enumerate(loader):  # 10 blocks an epoch
            assert torch.equal(block.x, expected[k]) and torch.equal(block.y, torch.from_numpy(labels[order[
                k * batch * steps:(k + 1) * batch * steps]]))
            if previous is not None:
                assert torch.equal(previous.x, expected[k - 1])  # drawn before this one: still intact
            previous = block
            buffers.add(block.x.data_ptr())
    assert len(buffers) == RING


def test_blocks_stay_under_block_bytes(compose_cfg, folder: Path, monkeypatch, caplog) -> None:
    """cache.steps_per_block is the most steps a block takes; fewer where the block would pass BLOCK_BYTES."""
    assert block_steps(256, 32, 512 * 4) == 256  # pooled 512-d features: 64 KiB a minibatch
    assert block_steps(256, 32, 1024 * 14 * 14 * 4) == 2  # resnet50's layer3 outputs at 224 px: 24.5 MiB a minibatch
    assert block_steps(256, 512, 1024 * 14 * 14 * 4) == 1  # never fewer than one step
    assert block_steps(8, 32, 512 * 4) == 8
    monkeypatch.setattr("finetune.data.resident.BLOCK_BYTES", 3 * 4 * 512 * 4)  # 3 minibatches of 4 pooled rows
    with caplog.at_level(logging.INFO, logger="finetune"):
        summary, _, _ = _run(compose_cfg, folder, "capped", "trainer.max_epochs=1", "cache.views=0")
    assert "3 optimizer steps per Lightning step" in caplog.text
    assert summary["cached_batches"] == {"resident": True, "optimizer_steps_per_batch": 3}


def test_runs_that_cannot_take_blocks_say_why(compose_cfg) -> None:
    def decide(*overrides: str) -> tuple[int, str]:
        return decide_blocks(to_typed(compose_cfg("trainer.accelerator=cpu", *overrides)))

    assert decide() == (256, "")
    assert decide("cache.steps_per_block=8") == (8, "")
    assert decide("cache.resident=false") == (0, "")
    assert decide("trainer.gradient_clip_val=1.0") == (256, "")  # the module clips before each step itself
    for override, why in [("trainer.gradient_clip_val=1.0 trainer.precision=16-mixed", "a gradient scaler"),
                          ("trainer.accumulate_grad_batches=2", "accumulate_grad_batches"),
                          ("tune.lr_find=true", "tune.lr_find is on"),
                          ("trainer.devices=2", "not a single process"),
                          ("trainer.strategy=ddp", "not a single process"),
                          ("trainer.val_check_interval=0.5", "val_check_interval")]:
        steps, note = decide(*override.split())
        assert steps == 0 and why in note and "one optimizer step per batch" in note, (override, note)
    with pytest.raises(SetupError, match=r"cache\.resident=true cannot .* trainer\.gradient_clip_val is set"):
        decide("cache.resident=true", "trainer.gradient_clip_val=1.0", "trainer.precision=16-mixed")


def test_a_nan_loss_inside_a_block_names_its_own_step(compose_cfg, folder: Path, monkeypatch) -> None:
    from finetune.model.module import FinetuneModule
    from finetune.run.resume import TrainingDiverged

    original = FinetuneModule._train_loss

    def poisoned(self, x, y):
        logits, loss = original(self, x, y)
        return logits, loss * float("nan") if self.trainer.global_step == 13 else loss  # step 2 of epoch 1's block 1

    monkeypatch.setattr(FinetuneModule, "_train_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at global step 13 \(epoch 1\)"):
        _run(compose_cfg, folder, "nan", "cache.steps_per_block=5")
