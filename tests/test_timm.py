"""timm models as backbones (``backbone=timm backbone.name=...``), offline: a CNN and a ViT, ``weights=none`` or
a file the test writes. Stages from timm's metadata, exact forward, weights files, the refusals, and a run
with a strategy, the cache, checkpoints, predict-style loading and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.config.typed import to_typed
from finetune.errors import SetupError
from finetune.model.backbones import build_backbone, check_image_size, empty_backbone, family, preprocessing_for
from finetune.model.checkpoints import load_module, preprocessing_of
from finetune.model.module import FinetuneModule
from finetune.model.strategies import param_groups
from finetune.run.door import check_model
from finetune.run.train import train
from tests.conftest import export_parity
from tests.test_strategies import _fit_two_steps, _snapshot, _stage_changed

timm = pytest.importorskip("timm")

CNN = "timm/resnet10t"  # BatchNorm, a chain of top-level blocks
VIT = "timm/vit_tiny_patch16_224"  # class token and position embeddings on the root, LayerNorm


def _reference(backbone, x: torch.Tensor) -> torch.Tensor:
    """What timm itself computes for the pooled pre-logits."""
    model = backbone._timm_model
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize(("name", "size", "stages", "width"), [
    (CNN, 32, ["act1", "layer1", "layer2", "layer3", "layer4"], 512),
    (VIT, 32, ["patch_embed", *(f"blocks_{i}" for i in range(12))], 192),
])
def test_timm_models_cut_into_stages_that_compose_to_timms_forward(name, size, stages, width) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, "none", image_size=size).eval()
    assert backbone.stage_names == stages and backbone.feature_dim == width
    assert family(name) == "timm"
    reference = timm.create_model(name.split("/", 1)[1], num_classes=0, **({"img_size": size} if "vit" in name
                                                                          else {}))
    # every tensor of the model without its ImageNet classifier, in exactly one stage
    assert sum(p.numel() for p in backbone.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = backbone(x)
        torch.testing.assert_close(full, _reference(backbone, x), rtol=0, atol=0)
        h = x
        for stage in stages[:2]:  # the cache seam: the rest from a stage's output
            h = backbone.stages[stage](h)
        torch.testing.assert_close(backbone(h, start=2), full)
    assert [s.stage_names for s in (empty_backbone(name, size),)] == [stages]


# one model of popular timm families, cut on the meta device (no memory): number of stages, pooled width
META_CUTS = {"convnext_atto": (4, 320), "efficientnet_b0": (5, 1280), "mobilenetv4_conv_small": (5, 1280),
             "regnety_002": (5, 368), "densenet121": (5, 1024), "swin_tiny_patch4_window7_224": (4, 768),
             "maxvit_tiny_tf_224": (5, 512), "deit_tiny_distilled_patch16_224": (13, 192)}


@pytest.mark.parametrize("model", sorted(META_CUTS))
def test_popular_timm_families_cut_into_stages(model: str) -> None:
    backbone = empty_backbone(f"timm/{model}")
    assert (len(backbone.stage_names), backbone.feature_dim) == META_CUTS[model]


def test_swin_at_another_size_gives_timms_features() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("timm/swin_tiny_patch4_window7_224", "none", image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), _reference(backbone, x), rtol=0, atol=0)


def test_a_forward_that_does_more_between_blocks_is_refused_naming_what_works() -> None:
    with pytest.raises(SetupError, match=r"beit_base_patch16_224 cannot be cut into stages here: its forward_features "
                                         r"does more between its blocks .* timm's VisionTransformer family"):
        empty_backbone("timm/beit_base_patch16_224")


def test_preprocessing_is_the_pretrained_configs_own() -> None:
    prep = preprocessing_for(VIT)
    cfg = timm.models.get_pretrained_cfg(VIT.split("/", 1)[1])
    assert prep.crop_size == cfg.input_size[-1] == 224 and prep.resize_size == int(224 / cfg.crop_pct)
    assert prep.interpolation == cfg.interpolation == "bicubic" and prep.mean == tuple(cfg.mean)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_weights_file_loads_exactly_and_vit_positions_fit_a_new_size(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=7)  # 224 px, another head: dropped
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    same = build_backbone(VIT, str(path))
    assert torch.equal(same.stages["blocks_3"][0].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert torch.equal(same.stages["patch_embed"][0].pos_embed, source.pos_embed)
    small = build_backbone(VIT, str(path), image_size=32)  # 2x2 patches: position embeddings resampled
    assert small.stages["patch_embed"][0].pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(small.stages["blocks_11"][0].mlp.fc2.bias, source.blocks[11].mlp.fc2.bias)


def test_a_file_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(SetupError, match="do not fit timm model resnet10t"):
        build_backbone(CNN, str(path))


def test_pretrained_weights_come_from_the_hub_cache_and_offline_say_where_to_put_them(monkeypatch,
                                                                                   tmp_path: Path) -> None:
    import socket

    import huggingface_hub.constants
    from safetensors.torch import save_file

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(SetupError) as error:  # at once: no retries against a host that does not resolve
        build_backbone(CNN, "imagenet")
    message = str(error.value)
    assert "Hugging Face hub cache" in message and "backbone.weights=" in message and "\n" not in message
    assert "timm/resnet10t.c3_in1k" in message and str(tmp_path / "hub") in message  # the repo, the folder

    # the same repo in the hub cache's layout: loaded from there, still without a network
    torch.manual_seed(3)
    source = timm.create_model("resnet10t")
    snapshot = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (tmp_path / "hub" / "models--timm--resnet10t.c3_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet10t.c3_in1k" / "refs" / "main").write_text("0123abc")
    backbone = build_backbone(CNN, "imagenet")
    assert torch.equal(backbone.stages["layer4"][0][0].conv2.weight, source.layer4[0].conv2.weight)
    assert torch.equal(backbone.stages["act1"][0][0].weight, source.conv1[0].weight)


def test_door_refuses_unknown_models_and_tags_in_one_paragraph(compose_cfg) -> None:
    with pytest.raises(SetupError, match=r"Unknown timm model 'resnet10'\. Did you mean resnet10t"):
        check_model(to_typed(compose_cfg("backbone=timm", "backbone.name=resnet10")))
    with pytest.raises(SetupError, match=r"needs a model: backbone=timm backbone\.name="):
        check_model(to_typed(compose_cfg("backbone=timm", "backbone.name=timm/")))
    with pytest.raises(SetupError, match=r"has no pretrained tag 'nope'\. Its tags: resnet10t\.c3_in1k"):
        check_image_size("timm/resnet10t.nope", None)
    cfg = to_typed(compose_cfg("backbone=timm", "backbone.name=resnet10t"))
    assert cfg.backbone.name == CNN  # one id below the door, as summary.json and checkpoints hold it


def test_layer_decay_and_gradual_unfreeze_follow_timm_stages() -> None:
    module = FinetuneModule(VIT, num_classes=3, weights="none", strategy="gradual_unfreeze", milestones=[1, 2],
                            preprocessing={"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    assert module.trainable == []  # head only until epoch 1, then blocks_11, then blocks_10
    assert [stages for _, stages in module.schedule] == [[], ["blocks_11"], ["blocks_10"]]
    groups = param_groups(module.backbone, module.head, lr=1e-3, weight_decay=0.0, backbone_lr_ratio=1.0,
                          layer_decay=0.5, stages=module.backbone.stage_names)
    lrs = {g["stage"]: g["lr"] for g in groups if g["stage"]}
    assert lrs["blocks_11"] == pytest.approx(1e-3 * 0.5) and lrs["blocks_10"] == pytest.approx(1e-3 * 0.25)
    assert lrs["patch_embed"] < lrs["blocks_0"]


@pytest.mark.parametrize(("strategy", "unfreeze_last"), [("feature_extractor", None), ("partial_unfreeze", 2)])
def test_frozen_timm_stages_are_bit_identical_after_training(strategy: str, unfreeze_last, one_torch_thread) -> None:
    module = FinetuneModule(CNN, num_classes=4, weights="none", strategy=strategy, unfreeze_last=unfreeze_last,
                            scheduler={"name": "none"}, optimizer={"name": "adamw", "lr": 1e-2, "weight_decay": 0.0})
    before = _snapshot(module)
    _fit_two_steps(module)
    after = _snapshot(module)
    for stage in module.backbone.stage_names:
        params_changed, stats_changed = _stage_changed(before, after, stage)
        if stage in module.trainable:
            assert params_changed and stats_changed, f"{stage} should train under {strategy}"
        else:
            assert not params_changed and not stats_changed, f"frozen {stage} moved under {strategy}"


def test_a_timm_run_caches_checkpoints_and_exports(compose_cfg, image_folder: Path, tmp_path: Path,
                                                          one_torch_thread) -> None:
    cfg = compose_cfg("backbone=timm", f"backbone.name={CNN.split('/', 1)[1]}", "backbone.weights=none",
                      "strategy=partial_unfreeze", "strategy.unfreeze_last=1", "data=folder",
                      f"data.root={image_folder}", "data.image_size=32", "data.num_workers=0", "data.batch_size=8",
                      "data.augment=false", "trainer.max_epochs=2", "logger=none")
    summary = train(cfg)
    assert summary["backbone"] == CNN and summary["feature_cache"]  # act1..layer3 cached
    written = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    head = 512 * written["num_classes"] + written["num_classes"]  # the new Linear head
    timm_params = sum(p.numel() for p in timm.create_model("resnet10t", num_classes=0).parameters())
    assert written["params_total"] == timm_params + head
    module = load_module(summary["best_checkpoint"])  # frozen stages come back from their reference
    assert preprocessing_of(module).interpolation == "bicubic"
    size = preprocessing_of(module).crop_size
    diff, tolerance = export_parity(module, size, tmp_path, "torchscript")
    assert diff <= tolerance
    pytest.importorskip("onnxruntime")
    diff, tolerance = export_parity(module, size, tmp_path, "onnx")
    assert diff <= tolerance
