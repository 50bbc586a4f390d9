"""Every torchvision family cuts into stages that keep the model whole, load its weights and freeze cleanly.

The structural checks run for all models on the meta device (no memory, no init); the numerical ones run for
the smallest model of each family at a small input, against torchvision's own model with the same tensors.
VGG and ResNet have their own tests in tests/test_backbones.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from finetune import config_dir
from finetune.errors import SetupError
from finetune.model import backbones
from finetune.model.backbone_configs import TIMM_CONFIG, config_text
from finetune.model.backbones import (
    BACKBONE_NAMES,
    FAMILIES,
    RESNET_NAMES,
    VGG_NAMES,
    build_backbone,
    check_image_size,
    check_name,
    empty_backbone,
    family,
    imagenet_meta,
    min_image_size,
    preprocessing_for,
    stage_names_of,
    torchvision_keys,
)
from finetune.model.strategies import freeze_stages, param_groups, trainable_stages, unfreeze_schedule

# The smallest model of each family but VGG and ResNet (tests/test_backbones.py); MaxViT takes no input under
# 221 px, which makes it slow on a CPU.
SMALLEST = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vit_b_16")
ON_CPU = [pytest.param(n, marks=pytest.mark.slow) if n == "maxvit_t" else n for n in SMALLEST]
# On the meta device every model is cheap, but 80 add up: one per family (and ResNet's variants) by default.
STRUCTURE = {*SMALLEST, "resnet18", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn"}
EVERY_MODEL = [n if n in STRUCTURE else pytest.param(n, marks=pytest.mark.slow) for n in BACKBONE_NAMES]
STAGES = {
    "alexnet": ("block1", "block2", "block3", "fc6", "fc7"),
    "convnext_tiny": ("stem", "stage1", "stage2", "stage3", "stage4"),
    "densenet121": ("stem", "block1", "block2", "block3", "block4"),
    "efficientnet_b0": ("stem", *(f"stage{i}" for i in range(1, 8))),
    "efficientnet_v2_s": ("stem", *(f"stage{i}" for i in range(1, 7))),
    "googlenet": ("stem", "inception3", "inception4", "inception5"),
    "inception_v3": ("stem", "mixed5", "mixed6", "mixed7"),
    "maxvit_t": ("stem", "stage1", "stage2", "stage3", "stage4"),
    "mnasnet0_5": ("stem", *(f"stage{i}" for i in range(1, 7))),
    "mobilenet_v2": ("stem", *(f"stage{i}" for i in range(1, 8))),
    "mobilenet_v3_small": ("stem", *(f"stage{i}" for i in range(1, 6))),
    "regnet_x_400mf": ("stem", "block1", "block2", "block3", "block4"),
    "shufflenet_v2_x0_5": ("stem", "stage2", "stage3", "stage4"),
    "squeezenet1_1": ("block1", "block2", "block3", "block4"),
    "swin_t": ("patch_embed", "stage1", "stage2", "stage3", "stage4"),
    "swin_v2_t": ("patch_embed", "stage1", "stage2", "stage3", "stage4"),
    "vit_b_16": ("patch_embed", *(f"block{i}" for i in range(1, 13))),
}
FEATURE_DIMS = {"alexnet": 4096, "convnext_tiny": 768, "densenet121": 1024, "efficientnet_b0": 1280,
                "efficientnet_v2_s": 1280, "googlenet": 1024, "inception_v3": 2048, "maxvit_t": 512,
                "mnasnet0_5": 1280, "mobilenet_v2": 1280, "mobilenet_v3_small": 1024, "regnet_x_400mf": 400,
                "shufflenet_v2_x0_5": 1024, "squeezenet1_1": 512, "swin_t": 768, "swin_v2_t": 768, "vit_b_16": 768}
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Inputs of 32 px: handing work between threads costs more than the work (10-100x on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def size_of(name: str) -> int:
    """The input the tests use: the smallest from 32 px up that the model takes."""
    for size in range(max(32, min_image_size(name)), 1024):
        try:
            check_image_size(name, size)
            return size
        except SetupError:
            continue
    raise AssertionError(f"{name} takes no size from 32 to 1023 px")


def head_of(name: str) -> str:
    return FAMILIES[family(name)].head


def reference_model(name: str) -> nn.Module:
    """torchvision's own model as a user would build it, at the test size where the family builds per size."""
    torch.manual_seed(0)
    options = {"vit": {"image_size": size_of(name)}, "maxvit": {"input_size": (size_of(name),) * 2},
               "googlenet": {"init_weights": True}, "inception": {"init_weights": True}}  # (its default, unwarned)
    return torchvision.models.get_model(name, weights=None, **options.get(family(name), {})).eval()


def ignored(name: str, key: str) -> bool:
    """A tensor of the ImageNet classifier or of an aux head: not part of the backbone."""
    rule = FAMILIES[family(name)]
    return key.startswith((f"{rule.head}.", *rule.aux))


# --- every model, on the meta device ------------------------------------------------------------------------


def test_backbone_names_are_torchvision_classification_models_each_with_its_config() -> None:
    assert set(BACKBONE_NAMES) == set(torchvision.models.list_models(module=torchvision.models))
    assert set(VGG_NAMES + RESNET_NAMES) < set(BACKBONE_NAMES)
    folder = config_dir() / "backbone"
    assert {p.stem for p in folder.glob("*.yaml")} == {*BACKBONE_NAMES, TIMM_CONFIG}  # timm.yaml: any timm model
    stale = [name for name in BACKBONE_NAMES if (folder / f"{name}.yaml").read_text() != config_text(name)]
    assert not stale, f"run python -m finetune.model.backbone_configs ({stale[:3]})"
    assert {family(name) for name in BACKBONE_NAMES} == set(FAMILIES)


def test_generator_writes_the_shape_of_the_hand_written_files(tmp_path: Path) -> None:
    from finetune.model.backbone_configs import write_configs

    assert len(write_configs(tmp_path)) == len(BACKBONE_NAMES)
    assert (tmp_path / "vgg16.yaml").read_text().splitlines()[1:] == [
        "name: vgg16", "# imagenet: torchvision's best ImageNet weights (torch hub cache or download)",
        "# none: random init; or a path to a state_dict / checkpoint file", "weights: imagenet"]
    assert write_configs(tmp_path) == []  # a second run changes nothing


@pytest.mark.parametrize("name", EVERY_MODEL)
def test_stages_hold_every_tensor_but_the_imagenet_classifier(name: str) -> None:
    """Each parameter and buffer of torchvision's model, but its classifier (and aux heads), is in one stage,
    under one key map; the feature width is the classifier's input width."""
    backbone = empty_backbone(name)
    assert tuple(backbone.stage_names) == stage_names_of(name)
    assert 4 <= len(backbone.stage_names) <= 33
    at_size = {"image_size": preprocessing_for(name).crop_size} if family(name) == "vit" else {}
    with torch.device("meta"):
        reference = torchvision.models.get_model(name, weights=None, **at_size) if family(name) != "regnet" else None
    keys = torchvision_keys(name)
    assert set(keys) == {f"backbone.{k}" for k in backbone.state_dict()}
    if reference is not None:  # RegNet cannot be built under torch.device("meta"); its keys are checked below
        wanted = {k for k in reference.state_dict() if not ignored(name, k)}
        assert sorted(keys.values()) == sorted(wanted)
        n_kept = sum(p.numel() for key, p in reference.named_parameters() if not ignored(name, key))
        assert sum(p.numel() for p in backbone.parameters()) == n_kept
        head = reference.get_submodule(head_of(name))
        assert backbone.feature_dim == (head.in_features if isinstance(head, nn.Linear) else head.in_channels)
    per_stage = sum(p.numel() for stage in backbone.stages.values() for p in stage.parameters())
    assert per_stage == sum(p.numel() for p in backbone.parameters())  # no parameter in two stages
    with torch.no_grad():
        size = size_of(name)
        out = empty_backbone(name, size).eval()(torch.empty(BATCH, 3, size, size, device="meta"))
    assert out.shape == (BATCH, backbone.feature_dim)


def test_regnet_keys_are_torchvision_keys() -> None:
    reference = torchvision.models.get_model("regnet_x_400mf", weights=None)
    keys = torchvision_keys("regnet_x_400mf")
    assert sorted(keys.values()) == sorted(k for k in reference.state_dict() if not k.startswith("fc."))
    assert keys["backbone.stages.block4.0.block4-0.proj.0.weight"] == "trunk_output.block4.block4-0.proj.0.weight"


@pytest.mark.parametrize("name", ["alexnet", "convnext_tiny", "densenet121", "googlenet", "inception_v3",
                                  "squeezenet1_0", "swin_t", "vgg11"])
def test_min_image_size_is_the_smallest_input_that_runs(name: str) -> None:
    smallest = min_image_size(name)
    backbone = empty_backbone(name).eval()
    with torch.no_grad():
        assert backbone(torch.empty(1, 3, smallest, smallest, device="meta")).shape == (1, backbone.feature_dim)
        with pytest.raises(RuntimeError):
            backbone(torch.empty(1, 3, smallest - 1, smallest - 1, device="meta"))


@pytest.mark.parametrize(("name", "size", "says"), [
    ("inception_v3", 64, r"inception_v3 needs data.image_size >= 75.*nearest size that works is 75 "),
    ("alexnet", 32, r">= 63"),
    ("vit_b_16", 40, r"divisible by 16, its patch size.*are 32 or 48 .*weights' own, 224"),
    ("vit_h_14", 224 + 1, r"divisible by 14.*224 or 238"),
    ("maxvit_t", 64, r"7x7 attention windows.*nearest size that works is 221 "),
    ("maxvit_t", 256, r"are 224 or 445"),
])
def test_image_sizes_a_model_cannot_take_are_refused_naming_sizes_that_work(name: str, size: int, says: str) -> None:
    with pytest.raises(SetupError, match=says):
        check_image_size(name, size)
    with pytest.raises(SetupError, match=says):
        build_backbone(name, "none", image_size=size)


@pytest.mark.parametrize(("name", "size"), [("vit_b_16", 32), ("vit_b_32", 32), ("vit_b_16", 384),
                                            ("maxvit_t", 224), ("maxvit_t", 448), ("inception_v3", 75),
                                            ("swin_t", 32), ("resnet18", 32), ("vit_h_14", None)])
def test_sizes_that_fit_pass_and_build_the_model_for_them(name: str, size: int | None) -> None:
    check_image_size(name, size)
    backbone = empty_backbone(name, size).eval()
    side = size or preprocessing_for(name).crop_size
    with torch.no_grad():
        out = backbone(torch.empty(1, 3, side, side, device="meta"))
    assert out.shape == (1, backbone.feature_dim)


def test_unknown_name_names_families_and_close_matches() -> None:
    with pytest.raises(SetupError) as info:
        check_name("resnet5")
    message = str(info.value)
    assert "Did you mean resnet50" in message and "conf/backbone/" in message
    assert all(word in message for word in ("convnext", "efficientnet", "vit", "swin"))
    assert "wide_resnet101_2" not in message  # families, not 80 names
    with pytest.raises(SetupError, match="Unknown backbone"):
        min_image_size("vgg17")


def test_family_words() -> None:
    assert [family(n) for n in ("resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s", "swin_v2_t",
                                "vit_l_32", "mobilenet_v3_large", "inception_v3")] == [
        "resnet", "resnet", "efficientnet", "swin", "vit", "mobilenet_v3", "inception"]


def test_preprocessing_and_meta_come_from_each_models_weights() -> None:
    prep = preprocessing_for("inception_v3")
    assert (prep.resize_size, prep.crop_size) == (342, 299)
    assert (preprocessing_for("vit_h_14").crop_size, preprocessing_for("efficientnet_b7").crop_size) == (518, 600)
    meta = imagenet_meta("swin_t")
    assert meta["num_params"] == 28288354 and meta["imagenet_top1"] == pytest.approx(81.474)


def test_custom_stage_modules_script() -> None:
    """The export to TorchScript scripts the stages: the modules written here (transform_input, ViT's patch
    embedding and class token) script too and compute the same."""
    for name, size in (("googlenet", 32), ("vit_b_32", 64)):
        backbone = build_backbone(name, "none", image_size=size).eval()
        first, last = backbone.stage_names[0], backbone.stage_names[-1]
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            h = backbone.stages[first](x)
            torch.testing.assert_close(torch.jit.script(backbone.stages[first])(x), h)
            if name == "vit_b_32":
                torch.testing.assert_close(torch.jit.script(backbone.stages[last])(h), backbone.stages[last](h))


# --- the smallest model of each family, on the CPU ----------------------------------------------------------


Reference = Callable[[str], tuple[nn.Module, Path]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """name -> (torchvision's model, its state_dict saved to a file): the random init, the costly part, once."""
    made: dict[str, tuple[nn.Module, Path]] = {}

    def get(name: str) -> tuple[nn.Module, Path]:
        if name not in made:
            model = reference_model(name)
            path = tmp_path_factory.mktemp(name) / "weights.pth"
            torch.save(model.state_dict(), path)
            made[name] = (model, path)
        return made[name]

    return get


@pytest.mark.parametrize("name", ON_CPU)
def test_weights_load_exactly_and_features_give_torchvisions_logits(name: str, reference: Reference) -> None:
    """torchvision's state_dict loads tensor for tensor; its own classifier on our pooled features gives its own
    logits (the cut loses nothing, adds nothing); resuming at stage k from stage k-1's output (the feature
    cache's seam) gives the same features."""
    model, path = reference(name)
    size = size_of(name)
    backbone = build_backbone(name, str(path), image_size=size).eval()
    assert tuple(backbone.stage_names) == STAGES[name] and backbone.feature_dim == FEATURE_DIMS[name]
    own, expected = backbone.state_dict(), model.state_dict()
    for key, torchvision_key in torchvision_keys(name).items():
        assert torch.equal(own[key.removeprefix("backbone.")], expected[torchvision_key]), key

    torch.manual_seed(1)
    x = torch.randn(BATCH, 3, size, size)
    with torch.no_grad():
        features = backbone(x)
        assert features.shape == (BATCH, backbone.feature_dim)
        if family(name) == "squeezenet":  # its classifier is a conv on the map: compare the pooled map
            logits, wanted = features, model.features(x).mean((2, 3))
        else:
            if family(name) in ("googlenet", "inception"):
                model.transform_input = True  # what torchvision sets when it loads ImageNet weights
            logits, wanted = model.get_submodule(head_of(name))(features), model(x)
        torch.testing.assert_close(logits, wanted, rtol=1e-4, atol=1e-4)
        k = len(backbone.stage_names) // 2
        h = x
        for stage in backbone.stage_names[:k]:
            h = backbone.stages[stage](h)
        torch.testing.assert_close(backbone(h, start=k), features)


@pytest.mark.parametrize("name", ON_CPU)
def test_other_heads_and_aux_heads_are_dropped_when_loading(name: str, reference: Reference,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A head for 7 classes (and GoogLeNet's, Inception's aux heads) is not loaded; a missing tensor is refused.

    The edited state_dicts are handed over as the file's content (reading files: tests/test_backbones.py).
    """
    model, _ = reference(name)
    state = dict(model.state_dict())
    head = head_of(name)
    for key in [k for k in state if k.startswith(f"{head}.")]:
        state[key] = torch.zeros(7, *state[key].shape[1:])  # a 7-class head: not ours to load
    monkeypatch.setattr(backbones, "load_state_dict_file", lambda path, name=None: state)
    backbone = build_backbone(name, "seven_classes.pth", image_size=size_of(name))
    assert backbone.feature_dim == FEATURE_DIMS[name]
    del state[next(k for k in state if not ignored(name, k))]
    with pytest.raises(SetupError, match=rf"do not fit backbone '{name}' \(missing 1 tensors"):
        build_backbone(name, "one_missing.pth", image_size=size_of(name))


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_every_strategy_and_layer_decay_step_through_the_family_stages(name: str) -> None:
    """On the meta device: each strategy's schedule names this family's stages, and layer decay gives every
    stage its own LR, falling towards the input, with every parameter in exactly one optimizer group."""
    backbone = empty_backbone(name)
    names = backbone.stage_names
    n = len(names)
    assert unfreeze_schedule(names, "feature_extractor") == [(0, [])]
    assert unfreeze_schedule(names, "full_finetune") == [(0, names)]
    assert unfreeze_schedule(names, "partial_unfreeze", unfreeze_last=2) == [(0, names[-2:])]
    assert unfreeze_schedule(names, "freeze_then_finetune", freeze_epochs=1) == [(0, []), (1, names)]
    gradual = unfreeze_schedule(names, "gradual_unfreeze", milestones=list(range(1, n + 1)))
    assert [stages for _, stages in gradual] == [[], *([s] for s in reversed(names))]
    head = torch.nn.Linear(backbone.feature_dim, 3, device="meta")
    groups = param_groups(backbone, head, lr=1.0, weight_decay=0.0, backbone_lr_ratio=0.1, layer_decay=0.5,
                          stages=names)
    lr = {g["stage"]: g["lr"] for g in groups if g["stage"]}
    assert [lr[s] for s in names] == [0.5 ** (n - i) for i in range(n)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in [*backbone.parameters(), *head.parameters()])


@pytest.mark.parametrize("name", ON_CPU)
def test_frozen_stages_take_no_gradients_and_keep_their_statistics(name: str, reference: Reference) -> None:
    """feature_extractor: nothing in the backbone trains; partial_unfreeze 1: only the last stage does. A train-mode
    forward moves no buffer of a frozen stage (BatchNorm kept in eval by Backbone.train; LayerNorm has none)."""
    _, path = reference(name)
    size = size_of(name)
    backbone = build_backbone(name, str(path), image_size=size)
    names = backbone.stage_names
    freeze_stages(backbone, trainable_stages(names, "feature_extractor"))
    assert not any(p.requires_grad for p in backbone.parameters())

    freeze_stages(backbone, trainable_stages(names, "partial_unfreeze", unfreeze_last=1))
    assert all(p.requires_grad == key.startswith(f"stages.{names[-1]}.") for key, p in backbone.named_parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    assert all(not backbone.stages[s].training for s in names[:-1]) and backbone.stages[names[-1]].training
    backbone(torch.randn(BATCH, 3, size, size)).sum().backward()
    after = backbone.state_dict()
    frozen = [k for k in before if not k.startswith(f"stages.{names[-1]}.")]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(p.grad is None for key, p in backbone.named_parameters() if key in frozen)
    statistics = [k for k in before if k.startswith(f"stages.{names[-1]}.") and k.endswith("running_mean")]
    if statistics:  # the trainable stage's BatchNorm does move: the check above can see a change
        assert any(not torch.equal(before[k], after[k]) for k in statistics)


def test_vit_at_another_size_interpolates_its_position_embeddings(reference: Reference,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights for 32 px (2x2 patches of 16) loaded at 64 px: the 4x4 grid's embeddings as torchvision's
    interpolate_embeddings makes them (what loading 224-px ImageNet weights at another size does); every other
    tensor as saved."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    model, _ = reference("vit_b_16")
    state = model.state_dict()
    monkeypatch.setattr(backbones, "load_state_dict_file", lambda path, name=None: state)
    backbone = build_backbone("vit_b_16", "vit_b_16_at_32px.pth", image_size=64)
    got = backbone.stages["patch_embed"][0].pos_embedding
    assert got.shape == (1, 4 * 4 + 1, 768)
    torch.testing.assert_close(got, interpolate_embeddings(64, 16, state)["encoder.pos_embedding"])
    last_mlp = state["encoder.layers.encoder_layer_11.mlp.0.weight"]
    assert torch.equal(backbone.stages["block12"][0].mlp[0].weight, last_mlp)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 768)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "vit_b_16"])
def test_backbone_tensors_under_finetune_keys_load_back(name: str, reference: Reference,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a finetune checkpoint holds (backbone.stages.<stage>.<rest>) maps back to torchvision's keys."""
    _, path = reference(name)
    source = build_backbone(name, str(path), image_size=size_of(name)).state_dict()
    monkeypatch.setattr(backbones, "load_state_dict_file", lambda path, name=None: {
        f"backbone.{k}": v for k, v in source.items()})
    loaded = build_backbone(name, "finetune_keys.pth", image_size=size_of(name)).state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())


def test_report_shows_torchvision_total_beside_the_backbone_alone() -> None:
    """The study's numbers (VGG-16 138.4 M vs ResNet-50 25.6 M) include the ImageNet classifier; the report
    shows torchvision's total beside the backbone-only count, so both meet."""
    from finetune.cli.report import measure_backbone

    (row,) = measure_backbone("squeezenet1_1", ["feature_extractor"], batch_size=1, image_size=32, steps=1,
                              device="cpu", warmup=0)
    assert row["imagenet_params"] == imagenet_meta("squeezenet1_1")["num_params"] == 1_235_496
    assert row["total_params"] == 1_235_496 - (512 * 1000 + 1000)  # less the 1x1-conv ImageNet classifier
    assert imagenet_meta("vgg16")["num_params"] == 138_357_544 and imagenet_meta("resnet50")["num_params"] == 25_557_032
