"""Beyond VGG and ResNet: export parity per family, and a cached run equal to an uncached one.

One model per family at the smallest practical size, ``weights=none``. Export goes through the same
``inference_network`` and exporters ``python -m finetune.export`` uses, and is compared with the module's
own logits as the CLI does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.model.backbones import min_image_size, preprocessing_for
from finetune.model.module import FinetuneModule
from finetune.run.train import train
from tests.conftest import export_parity

# one per family; size: the smallest each takes that is >= 32 (ViT: a multiple of its patch). The default
# run exports the light ones; the rest (seconds to minutes each on 2 CPU cores) run with -m slow.
LIGHT = ["mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_1"]
HEAVY = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "swin_t",
         "vit_b_16"]
FAMILY_MODELS = [*LIGHT, *(pytest.param(name, marks=pytest.mark.slow) for name in HEAVY)]


def small_module(name: str) -> tuple[FinetuneModule, int]:
    size = max(32, min_image_size(name))
    size += -size % 16 if name.startswith("vit") else 0
    prep = preprocessing_for(name).at_size(size)
    torch.manual_seed(0)
    module = FinetuneModule(name, num_classes=3, weights="none", strategy="partial_unfreeze", unfreeze_last=1,
                            preprocessing={"resize_size": prep.resize_size, "crop_size": prep.crop_size,
                                           "mean": list(prep.mean), "std": list(prep.std)})
    return module.eval(), size


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_torchscript_export_gives_the_modules_logits(name: str, tmp_path: Path) -> None:
    module, size = small_module(name)
    diff, tolerance = export_parity(module, size, tmp_path, "torchscript")
    assert diff <= tolerance, f"{name}: max abs diff {diff:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("name", ["squeezenet1_1", *(pytest.param(name, marks=pytest.mark.slow) for name in
                                                    ("efficientnet_b0", "mobilenet_v3_small", "swin_t", "vit_b_16"))])
def test_onnx_export_gives_the_modules_logits(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    module, size = small_module(name)
    diff, tolerance = export_parity(module, size, tmp_path, "onnx")
    assert diff <= tolerance, f"{name}: max abs diff {diff:.3g} > {tolerance:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "vit_b_16"])
def test_cached_run_equals_uncached_run(compose_cfg, image_folder: Path, name: str) -> None:
    """A BatchNorm family and a LayerNorm one: the feature cache changes the speed, not the result."""
    common = (f"backbone={name}", "backbone.weights=none", "data=folder", f"data.root={image_folder}",
              "data.image_size=32", "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=2", "logger=none",
              "speed.channels_last=false")
    cached = train(compose_cfg(*common))
    assert cached["feature_cache"]
    cfg = compose_cfg(*common, "cache.enabled=false")
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / "uncached")
    uncached = train(cfg)
    assert not uncached["feature_cache"]
    for key in ("acc", "loss"):
        assert cached["test"][key] == pytest.approx(uncached["test"][key], abs=1e-4), key
