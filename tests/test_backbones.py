"""Every VGG and ResNet builds offline, with the right stages and feature width, and loads state_dict files."""

from __future__ import annotations

import pytest
import torch
import torchvision

from finetune.errors import SetupError
from finetune.model.backbones import (
    RESNET_NAMES,
    RESNET_STAGES,
    VGG_NAMES,
    VGG_STAGES,
    build_backbone,
    load_state_dict_file,
    preprocessing_for,
)

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


@pytest.mark.parametrize("name", VGG_NAMES + RESNET_NAMES)  # the other families: tests/test_families.py
def test_backbone_builds_with_stages_and_feature_width(name: str) -> None:
    backbone = build_backbone(name, "none").eval()
    expected_stages = VGG_STAGES if name.startswith("vgg") else RESNET_STAGES
    assert tuple(backbone.stage_names) == expected_stages
    assert backbone.feature_dim == FEATURE_DIMS.get(name, 4096)
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, backbone.feature_dim)
    # Stages hold every parameter of the torchvision model except its old ImageNet classifier.
    with torch.device("meta"):  # structure only: no init of 133 M parameters
        reference = torchvision.models.get_model(name, weights=None)
    head = reference.fc if name.startswith("resnet") else reference.classifier[6]
    n_ref = sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in head.parameters())
    assert sum(p.numel() for p in backbone.parameters()) == n_ref


def test_stage_outputs_compose_to_forward() -> None:
    """forward(x, start=k) on stage k-1's output equals the full forward: the cache seam is exact."""
    backbone = build_backbone("resnet18", "none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = backbone(x)
        h = x
        for name in backbone.stage_names[:3]:
            h = backbone.stages[name](h)
        resumed = backbone(h, start=3)
    torch.testing.assert_close(full, resumed)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_state_dict_file_loads_exactly(tmp_path, name: str) -> None:
    torch.manual_seed(1)
    source = torchvision.models.get_model(name, weights=None, num_classes=7)  # head differs: ignored
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone(name, str(path))
    expected = {k: v for k, v in source.state_dict().items()}
    if name.startswith("resnet"):
        assert torch.equal(backbone.stages["stem"][0].weight, expected["conv1.weight"])
        assert torch.equal(backbone.stages["layer4"][0][1].bn2.running_var, expected["layer4.1.bn2.running_var"])
    else:
        assert torch.equal(backbone.stages["block1"][0].weight, expected["features.0.weight"])
        assert torch.equal(backbone.stages["fc7"][0].weight, expected["classifier.3.weight"])
    loaded = sum(p.numel() for p in backbone.parameters())
    assert loaded > 0


def test_state_dict_from_other_backbone_is_refused(tmp_path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(SetupError, match="do not fit backbone 'resnet18'"):
        build_backbone("resnet18", str(path))


def test_pickle_needing_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": torchvision.models.resnet18(weights=None)}, path)  # a pickled nn.Module
    with pytest.raises(SetupError, match="weights_only=True"):
        load_state_dict_file(path)


def test_missing_weights_file_is_a_clear_error() -> None:
    with pytest.raises(SetupError, match="neither 'imagenet', 'none' nor an existing file"):
        build_backbone("resnet18", "/nonexistent/weights.pth")


def test_offline_imagenet_weights_error_names_file_and_folder(monkeypatch, tmp_path) -> None:
    import urllib.error

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub" / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(SetupError) as info:
        build_backbone("resnet50", "imagenet")
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "hub" / "checkpoints") in message
    assert "backbone.weights=none" in message


def test_preprocessing_comes_from_weights_meta() -> None:
    prep = preprocessing_for("resnet50")
    assert (prep.resize_size, prep.crop_size) == (232, 224)
    small = prep.at_size(32)
    assert small.crop_size == 32 and small.resize_size == 33


def test_imagenet_weights_placed_in_hub_cache_load_offline(monkeypatch, tmp_path) -> None:
    """What the offline message tells users to do works: the file in the hub cache is used, no network."""
    import os
    import urllib.error

    from finetune.model.backbones import imagenet_weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    target = tmp_path / "hub" / "checkpoints" / os.path.basename(imagenet_weights("resnet18").url)
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    backbone = build_backbone("resnet18", "imagenet")
    assert torch.equal(backbone.stages["layer3"][1].conv2.weight, reference.layer3[1].conv2.weight)


# --- finetune checkpoints as backbone.weights -------------------------------------------------------------

# One epoch of two steps with the last stage trainable: layer4 moves away from its source.
TINY_RUN = ("data.image_size=32", "logger=none", "trainer.max_epochs=1", "data.val_fraction=0.1",
            "data.test_fraction=0.1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            "+trainer.limit_test_batches=1", "strategy=partial_unfreeze", "strategy.unfreeze_last=1",
            "cache.enabled=false", "data.augment=false")


def write_weights(path, seed: int):
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def train_checkpoint(compose_cfg, out, *overrides: str):
    from omegaconf import open_dict

    from finetune.run.train import train

    cfg = compose_cfg(*TINY_RUN, *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def module_keys(backbone) -> dict[str, torch.Tensor]:
    """A built Backbone's tensors under FinetuneModule's keys (backbone.stages.<stage>.<rest>)."""
    return {f"backbone.{k}": v for k, v in backbone.state_dict().items()}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("weights", ["file", "none"])
def test_finetune_checkpoint_with_every_stage_loads_as_backbone_weights(compose_cfg, tmp_path, caplog,
                                                                         weights: str) -> None:
    """All stages stored (checkpoint_frozen_stages=store, or a random init): the backbone is the checkpoint's."""
    import logging

    if weights == "file":  # with EMA: the averaged weights (the checkpoint's state_dict) are the ones used
        source = write_weights(tmp_path / "frozen.pth", seed=1)
        ckpt = train_checkpoint(compose_cfg, tmp_path / "run", f"backbone.weights={source}",
                                "checkpoint_frozen_stages=store", "regularization.ema_decay=0.5")
    else:
        ckpt = train_checkpoint(compose_cfg, tmp_path / "run", "backbone.weights=none")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    from finetune.model.frozen_weights import RECORD_KEY

    assert RECORD_KEY not in saved
    expected = {k: v for k, v in saved["state_dict"].items() if k.startswith("backbone.")}
    assert len(expected) == 120  # resnet18's, without its ImageNet fc

    caplog.set_level(logging.INFO, logger="finetune.model.backbones")
    backbone = build_backbone("resnet18", str(ckpt))
    assert_same_tensors(module_keys(backbone), expected)
    assert "classifier head" in caplog.text and "not used" in caplog.text

    if weights == "file":
        raw = saved["current_model_state"]  # the EMA's raw weights: trained further than the average
        assert any(not torch.equal(raw[k], expected[k]) for k in expected if ".layer4." in k)
        original = torchvision.models.resnet18(weights=None)
        original.load_state_dict(torch.load(source, weights_only=True))
        assert not torch.equal(backbone.stages["layer4"][0][1].bn2.running_var, original.layer4[1].bn2.running_var)
        assert torch.equal(backbone.stages["stem"][0].weight, original.conv1.weight)  # frozen: as the file


def test_slim_finetune_checkpoint_is_completed_from_its_frozen_weights_source(compose_cfg, tmp_path) -> None:
    """Frozen stages left out of the checkpoint are rebuilt from their source, as load_module does."""
    from finetune.model.checkpoints import load_module
    from finetune.model.frozen_weights import RECORD_KEY

    source = write_weights(tmp_path / "frozen.pth", seed=1)
    ckpt = train_checkpoint(compose_cfg, tmp_path / "run", f"backbone.weights={source}")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved[RECORD_KEY]["stages"] == ["stem", "layer1", "layer2", "layer3"]
    stored = {k: v for k, v in saved["state_dict"].items() if k.startswith("backbone.")}
    assert stored and all(k.startswith("backbone.stages.layer4.") for k in stored)

    got = module_keys(build_backbone("resnet18", str(ckpt)))
    # the full backbone: frozen stages from the weights file, the trained stage from the checkpoint
    from_file = module_keys(build_backbone("resnet18", str(source)))
    expected = {key: stored.get(key, value) for key, value in from_file.items()}
    assert_same_tensors(got, expected)
    assert_same_tensors(got, module_keys(load_module(ckpt).backbone))

    write_weights(source, seed=2)  # same name, other tensors: the fingerprint refuses them
    with pytest.raises(SetupError, match=r"as backbone.weights: .*differ.*Restore the weights"):
        build_backbone("resnet18", str(ckpt))
    source.unlink()
    with pytest.raises(SetupError, match=r"does not hold its frozen stages \(stem, layer1, layer2, layer3\).*"
                                         r"does not exist.*checkpoint_frozen_stages=store"):
        build_backbone("resnet18", str(ckpt))


def test_finetune_checkpoint_of_another_backbone_is_refused(tmp_path) -> None:
    from finetune.model.module import FinetuneModule

    module = FinetuneModule("resnet18", num_classes=3, weights="none")
    path = tmp_path / "resnet18.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(SetupError, match=r"finetune checkpoint of backbone 'resnet18'.*builds backbone 'resnet34'.*"
                                         r"backbone=resnet18"):
        build_backbone("resnet34", str(path))
    assert_same_tensors(module_keys(build_backbone("resnet18", str(path))), module_keys(module.backbone))


def test_finetune_checkpoint_with_class_weights_loads_only_its_backbone(tmp_path) -> None:
    """A weighted loss stores its class weights in the state_dict: not a backbone tensor, not an error."""
    from finetune.model.module import FinetuneModule

    module = FinetuneModule("resnet18", num_classes=3, weights="none", class_weights=[1.0, 2.0, 0.5])
    assert "criterion.weight" in module.state_dict()
    path = tmp_path / "weighted.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    assert_same_tensors(module_keys(build_backbone("resnet18", str(path))), module_keys(module.backbone))


def test_interpolation_is_the_weights_own() -> None:
    """Bicubic where torchvision's transforms for the weights say so, in training and evaluation alike."""
    from torchvision.transforms import InterpolationMode

    from finetune.data.transforms import eval_transform, train_transform

    assert preprocessing_for("resnet18").interpolation == "bilinear"
    prep = preprocessing_for("swin_t")
    assert prep.interpolation == torchvision.models.Swin_T_Weights.DEFAULT.transforms().interpolation.value
    assert prep.interpolation == "bicubic" and prep.at_size(64).without_border_crop().interpolation == "bicubic"
    assert eval_transform(prep).transforms[0].interpolation == InterpolationMode.BICUBIC
    assert train_transform(prep, augment=True).transforms[0].interpolation == InterpolationMode.BICUBIC
