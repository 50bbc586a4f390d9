"""Feature cache: same results as the uncached path, reused across runs, keyed, sharded, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from finetune.data.features import FeatureCacheDataModule, FeatureDataset, shard_files
from finetune.run.train import train
from tests.conftest import own_dir, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("backbone.weights=none", "data.image_size=32", "logger=none", "trainer.max_epochs=2",
        "data.val_fraction=0.1", "data.test_fraction=0.1")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, ...]:
    """A small image folder for what does not need digits' 1,797 images: batch 8, so several steps an epoch."""
    root = write_image_folder(tmp_path_factory.mktemp("features-data") / "images", classes=3, per_class=16)
    return ("data=folder", f"data.root={root}", "data.batch_size=8", "data.num_workers=0")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> str:
    """One feature cache for this module's digits runs: a later run with the same key reads, not extracts."""
    return str(tmp_path_factory.mktemp("digits-cache"))


def _shared_cache(cfg, cache_dir: str):
    with open_dict(cfg):
        cfg.paths.cache_dir = cache_dir
    return cfg


def test_cached_run_equals_uncached_run_and_is_reused(compose_cfg, small) -> None:
    tiny = (*TINY, *small)
    cached = train(compose_cfg(*tiny, "strategy=feature_extractor"))
    assert cached["feature_cache"] is not None and cached["wall_seconds"]["feature_extraction"] > 0
    folder = Path(cached["feature_cache"])
    features = np.load(next(folder.glob("train.0of1.features.npy")), mmap_mode="r")
    assert isinstance(features, np.memmap) and features.shape[1] == 512

    again = train(own_dir(compose_cfg(*tiny, "strategy=feature_extractor"), "again"))
    assert again["feature_cache"] == cached["feature_cache"]
    assert again["wall_seconds"]["feature_extraction"] < 0.05  # nothing extracted the second time

    cached_head = torch.load(cached["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    # a persistent loader worker on the image path: the batches must not depend on it
    uncached = train(own_dir(compose_cfg(*tiny, "strategy=feature_extractor", "cache.enabled=false",
                                        "data.num_workers=1"), "uncached"))
    assert uncached["feature_cache"] is None
    # Extraction uses the training path's layout, so on CPU the features, and so the whole run, are identical.
    assert uncached["test"] == cached["test"] == again["test"]
    uncached_head = torch.load(uncached["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    for key in ("head.1.weight", "head.1.bias"):
        assert torch.equal(cached_head[key], uncached_head[key])


def test_cache_key_changes_with_what_determines_the_features(compose_cfg, small, monkeypatch) -> None:
    import torchvision

    from finetune.data import features

    tiny = (*TINY, *small)
    base = train(compose_cfg(*tiny, "trainer.max_epochs=1"))
    other_size = train(own_dir(compose_cfg(*tiny, "trainer.max_epochs=1", "data.image_size=48"), "size"))
    other_seed = train(own_dir(compose_cfg(*tiny, "trainer.max_epochs=1", "seed=7"), "seed"))  # random init differs
    # the code that computes the features: finetune's extraction (and torch, torchvision, Pillow releases)
    monkeypatch.setattr(features, "EXTRACTION_VERSION", features.EXTRACTION_VERSION + 1)
    other_code = train(own_dir(compose_cfg(*tiny, "trainer.max_epochs=1"), "code"))
    folders = {run["feature_cache"] for run in (base, other_size, other_seed, other_code)}
    assert len(folders) == 4
    meta = json.loads((Path(base["feature_cache"]) / "meta.json").read_text())
    assert meta["frozen_stages"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert meta["code"]["torchvision"] == ".".join(torchvision.__version__.split(".")[:2])
    assert set(meta["code"]) == {"extraction", "torch", "torchvision", "pillow"}  # timm only for its models


def test_partial_unfreeze_caches_the_last_frozen_stage(compose_cfg) -> None:
    summary = train(compose_cfg(*TINY, "strategy=partial_unfreeze", "strategy.unfreeze_last=1",
                                "data.augment=false"))
    features = np.load(Path(summary["feature_cache"]) / "train.0of1.features.npy", mmap_mode="r")
    assert features.shape[1:] == (256, 2, 2)  # layer3 output at 32 px
    assert summary["trainable_stages"] == ["layer4"] and summary["test"]["acc"] > 0.3


def test_augmentation_turns_cache_off_unless_views_are_cached(compose_cfg, small) -> None:
    tiny = (*TINY, *small)
    off = train(compose_cfg(*tiny, "trainer.max_epochs=1", "data.augment=true"))
    assert off["feature_cache"] is None
    on = train(own_dir(compose_cfg(*tiny, "trainer.max_epochs=1", "data.augment=true", "cache.views=2"), "views"))
    features = np.load(Path(on["feature_cache"]) / "train.0of1.features.npy", mmap_mode="r")
    assert features.shape[0] == 2 and features.shape[2] == 512
    assert not np.array_equal(features[0], features[1])  # two different augmented views


def test_fp16_storage_keeps_accuracy(compose_cfg, digits_cache: str) -> None:
    # on digits: 180 test images make a 0.03 accuracy margin mean something
    half = train(compose_cfg(*TINY, "trainer.max_epochs=1", "cache.dtype=float16"))
    features = np.load(Path(half["feature_cache"]) / "val.0of1.features.npy", mmap_mode="r")
    assert features.dtype == np.float16
    full = train(_shared_cache(own_dir(compose_cfg(*TINY, "trainer.max_epochs=1"), "full"), digits_cache))
    assert half["feature_cache"] != full["feature_cache"]
    assert half["test"]["acc"] == pytest.approx(full["test"]["acc"], abs=0.03)


def test_each_rank_extracts_its_shard(tmp_path: Path) -> None:
    images = {s: torch.utils.data.TensorDataset(torch.randn(7, 3, 8, 8), torch.arange(7)) for s in
              ("train", "val", "test")}
    prefix = torch.nn.Sequential(torch.nn.Flatten(1))
    for rank in (0, 1):
        dm = FeatureCacheDataModule(images, prefix, tmp_path, {}, batch_size=3)
        dm._extract_missing(rank, 2, torch.device("cpu"))
    rank0 = FeatureDataset(shard_files(tmp_path, "train", 0, 2))
    rank1 = FeatureDataset(shard_files(tmp_path, "train", 1, 2))
    assert rank0.labels.tolist() == [0, 2, 4, 6] and rank1.labels.tolist() == [1, 3, 5]
    torch.testing.assert_close(rank1[0][0], images["train"][1][0].flatten())


def test_linear_probe_protocol(compose_cfg, digits_cache: str) -> None:
    # the same frozen features as test_fp16's float32 run: read from the shared cache when that one ran first
    summary = train(_shared_cache(compose_cfg(*TINY, "strategy=linear_probe", "strategy.c_num=3"), digits_cache))
    assert summary["epochs_run"] == 0 and summary["monitor"] == "val/mean_class_acc"
    assert summary["test"]["mean_class_acc"] > 0.5
    assert len(summary["linear_probe"]["val_mean_class_acc"]) == 3
    assert Path(summary["best_checkpoint"]).is_file()


def test_linear_probe_head_reproduces_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from finetune.model.module import FinetuneModule
    from finetune.run.linear_probe import fold_into_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 512)).astype(np.float32) * 3 + 1
    y = np.arange(60) % 3
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=500).fit(scaler.transform(x), y)
    module = FinetuneModule("resnet18", num_classes=3, weights="none")
    fold_into_head(module, scaler, clf)
    logits = module.head(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logits, clf.decision_function(scaler.transform(x)), rtol=1e-3, atol=1e-3)
