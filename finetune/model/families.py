"""One rule per torchvision family: how a model is cut into ordered stages ending in pooled features.

Each :class:`Family` in :data:`FAMILIES` says how to cut, where the ImageNet classifier sits (dropped when
loading), which auxiliary heads are not built, which builder options and input sizes apply, and how loaded
tensors are fitted to the model built (ViT's position embeddings). :mod:`finetune.model.backbones` is the
registry that uses them; adding a family means adding one entry here.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings
from torchvision.ops.misc import Conv2dNormActivation

log = logging.getLogger(__name__)

Stages = OrderedDict[str, nn.Module]


# --- small modules for what torchvision does inline in a forward ------------------------------------------


class TransformInput(nn.Module):
    """GoogLeNet's and Inception-v3's ``transform_input``: ImageNet-normalised input to the [-1, 1] scaling
    their ImageNet weights were trained on (torchvision switches it on whenever it loads them).

    On for every weights source, ``none`` too: what a stage computes must not depend on where its tensors came
    from, or a run's checkpoint given as ``backbone.weights`` to the next run would change its function.
    """

    def __init__(self) -> None:
        super().__init__()
        # torchvision's constants, computed as it does (in Python floats): the same float32 values
        self.scale = [std / 0.5 for std in (0.229, 0.224, 0.225)]
        self.shift = [(mean - 0.5) / 0.5 for mean in (0.485, 0.456, 0.406)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor(self.shift, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * scale + shift


class PatchEmbedding(nn.Module):
    """ViT's input side: patches projected, the class token prepended, position embeddings added.

    Holds torchvision's own conv, class token and position embeddings (one tensor, one name in either model);
    unlike torchvision it does not assert the input size, the position embeddings' length does.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ClassToken(nn.Module):
    """The class token's output: ViT's pooled features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


# --- one rule per family: a torchvision model -> its ordered stages ---------------------------------------


def _pooled() -> list[nn.Module]:
    """Global average pooling to (B, C): parameter-free, it rides on the last stage."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]


def _sequential(parts: OrderedDict[str, list[nn.Module]], *tail: nn.Module) -> Stages:
    """Each stage an nn.Sequential of its modules; ``tail`` (pooling, pre-logits) joins the last one."""
    names = list(parts)
    return OrderedDict((n, nn.Sequential(*parts[n], *(tail if n == names[-1] else ()))) for n in names)


def _pre_logits(classifier: nn.Sequential) -> list[nn.Module]:
    """The pretrained layers before the final classifier layer; a Dropout right before it belongs to the
    classifier (the new head has its own ``head.dropout``)."""
    layers = list(classifier)[:-1]
    while layers and isinstance(layers[-1], nn.Dropout):
        layers.pop()
    return layers


def _split_at_pools(features: nn.Sequential) -> OrderedDict[str, list[nn.Module]]:
    """block1, block2, ...: each ends at a max-pool; layers after the last pool are one more block."""
    blocks: OrderedDict[str, list[nn.Module]] = OrderedDict()
    block: list[nn.Module] = []
    for layer in features:
        block.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks[f"block{len(blocks) + 1}"], block = block, []
    if block:
        blocks[f"block{len(blocks) + 1}"] = block
    return blocks


def _resnet_stages(model: nn.Module) -> Stages:
    """ResNet, ResNeXt, Wide ResNet: stem, layer1..layer4."""
    stages: Stages = OrderedDict()
    stages["stem"] = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    for i in range(1, 5):
        stages[f"layer{i}"] = getattr(model, f"layer{i}")
    # The pooling has no parameters; it rides with the last stage.
    stages["layer4"] = nn.Sequential(stages["layer4"], model.avgpool, nn.Flatten(1))
    return stages


def _vgg_stages(model: nn.Module) -> Stages:
    """VGG (block1..block5) and AlexNet (block1..block3): conv blocks split at the max-pools, then the
    pretrained fully connected layers fc6, fc7."""
    blocks = _split_at_pools(model.features)
    stages: Stages = OrderedDict((name, nn.Sequential(*block)) for name, block in blocks.items())
    cls = model.classifier  # VGG: fc6, relu, dropout, fc7, relu, dropout, fc8; AlexNet: dropout first
    stages["fc6"] = nn.Sequential(model.avgpool, nn.Flatten(1), cls[0], cls[1], cls[2])
    stages["fc7"] = nn.Sequential(cls[3], cls[4], cls[5])
    return stages


def _squeezenet_stages(model: nn.Module) -> Stages:
    """block1..block4, split at the max-pools; the pooled output of ``features`` (512-d) is the feature."""
    return _sequential(_split_at_pools(model.features), *_pooled())


PLAIN_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, Conv2dNormActivation)


def _out_width(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _by_width(layers: Sequence[nn.Module]) -> OrderedDict[str, list[nn.Module]]:
    """stem (the leading plain conv layers), then stage1..stageK: consecutive blocks of one output width
    (torchvision's rows of inverted residuals); the trailing plain layers, the 1x1 conv up to the feature
    width, join the last stage."""
    layers = list(layers)
    is_block = [not isinstance(m, PLAIN_LAYERS) for m in layers]
    first, last = is_block.index(True), len(layers) - is_block[::-1].index(True)
    parts: OrderedDict[str, list[nn.Module]] = OrderedDict(stem=layers[:first])
    width = None
    for block in layers[first:last]:
        if _out_width(block) != width:
            width = _out_width(block)
            parts[f"stage{len(parts)}"] = []
        next(reversed(parts.values())).append(block)
    next(reversed(parts.values())).extend(layers[last:])
    return parts


def _features_stages(model: nn.Module) -> Stages:
    """EfficientNet (v1, v2), MobileNet v2 and v3: ``features`` by width, pooled, then the classifier's
    pretrained layers before its last (MobileNet v3's 1024-wide Linear + Hardswish)."""
    return _sequential(_by_width(model.features), *_pooled(), *_pre_logits(model.classifier))


def _mnasnet_stages(model: nn.Module) -> Stages:
    """MNASNet: ``layers`` by width, as the features rule."""
    return _sequential(_by_width(model.layers), *_pooled(), *_pre_logits(model.classifier))


def _hierarchical(first: str, features: nn.Sequential) -> OrderedDict[str, list[nn.Module]]:
    """features = [stem, blocks, downsample, blocks, ...]: stage1 is the first blocks, each downsample opens
    the next stage (timm's layout)."""
    layers = list(features)
    parts: OrderedDict[str, list[nn.Module]] = OrderedDict([(first, [layers[0]]), ("stage1", [layers[1]])])
    for i in range(2, len(layers), 2):
        parts[f"stage{len(parts)}"] = layers[i:i + 2]
    return parts


def _convnext_stages(model: nn.Module) -> Stages:
    """ConvNeXt: stem, stage1..stage4; the classifier's LayerNorm2d is pretrained and rides on stage4."""
    return _sequential(_hierarchical("stem", model.features), model.avgpool, *_pre_logits(model.classifier))


def _swin_stages(model: nn.Module) -> Stages:
    """Swin v1 and v2 (channels-last inside): patch_embed, stage1..stage4, then the final norm and pooling."""
    return _sequential(_hierarchical("patch_embed", model.features), model.norm, model.permute, model.avgpool,
                       model.flatten)


def _densenet_stages(model: nn.Module) -> Stages:
    """DenseNet: stem, block1..block4 (each dense block with the transition after it), then the final norm,
    ReLU and pooling as DenseNet.forward does them."""
    parts: OrderedDict[str, list[nn.Module]] = OrderedDict(stem=[])
    for name, layer in model.features.named_children():
        if name.startswith("denseblock"):
            parts[f"block{len(parts)}"] = []
        next(reversed(parts.values())).append(layer)
    return _sequential(parts, nn.ReLU(inplace=True), *_pooled())


def _numbered(model: nn.Module, pattern: str, label: str, skip: tuple[str, ...]) -> OrderedDict[str, list[nn.Module]]:
    """Top-level children grouped by the number in their name (inception4a..4e -> inception4): those before
    the first group are the stem (with ``transform_input``), a pool joins the group before it."""
    parts: OrderedDict[str, list[nn.Module]] = OrderedDict(stem=[TransformInput()])
    for name, child in model.named_children():
        if name in skip:
            continue
        match = re.match(pattern, name)
        if match and f"{label}{match[1]}" not in parts:
            parts[f"{label}{match[1]}"] = []
        next(reversed(parts.values())).append(child)
    return parts


def _googlenet_stages(model: nn.Module) -> Stages:
    """GoogLeNet: stem, inception3, inception4, inception5 (aux heads not built)."""
    parts = _numbered(model, r"inception(\d)", "inception", ("aux1", "aux2", "avgpool", "dropout", "fc"))
    return _sequential(parts, model.avgpool, nn.Flatten(1))


def _inception_stages(model: nn.Module) -> Stages:
    """Inception-v3: stem, mixed5, mixed6, mixed7 (aux head not built)."""
    parts = _numbered(model, r"Mixed_(\d)", "mixed", ("AuxLogits", "avgpool", "dropout", "fc"))
    return _sequential(parts, model.avgpool, nn.Flatten(1))


def _shufflenet_stages(model: nn.Module) -> Stages:
    """ShuffleNet v2: stem, stage2, stage3, stage4 (torchvision's names; conv5 rides on stage4)."""
    parts = OrderedDict([("stem", [model.conv1, model.maxpool]), ("stage2", [model.stage2]),
                         ("stage3", [model.stage3]), ("stage4", [model.stage4, model.conv5])])
    return _sequential(parts, *_pooled())


def _regnet_stages(model: nn.Module) -> Stages:
    """RegNet: stem, block1..block4 (torchvision's names)."""
    blocks = model.trunk_output.named_children()
    parts = OrderedDict([("stem", [model.stem]), *((name, [block]) for name, block in blocks)])
    return _sequential(parts, model.avgpool, nn.Flatten(1))


def _maxvit_stages(model: nn.Module) -> Stages:
    """MaxViT: stem, stage1..stage4; the pooled LayerNorm + Linear + Tanh before the classifier ride on stage4."""
    parts = OrderedDict([("stem", [model.stem]), *((f"stage{i + 1}", [block]) for i, block in enumerate(model.blocks))])
    return _sequential(parts, *_pre_logits(model.classifier))


def _vit_stages(model: nn.Module) -> Stages:
    """ViT: patch_embed (with class token and position embeddings), then one stage per encoder layer,
    block1..blockN (the granularity of layer-wise LR decay, and of partial_unfreeze); the final LayerNorm and
    the class token's output ride on the last."""
    parts = OrderedDict([("patch_embed", [PatchEmbedding(model)]),
                         *((f"block{i + 1}", [layer]) for i, layer in enumerate(model.encoder.layers))])
    pre_logits = [m for name, m in model.heads.named_children() if name != "head"]
    return _sequential(parts, model.encoder.ln, ClassToken(), *pre_logits)


# --- which input sizes a family takes ---------------------------------------------------------------------


def _patch_size(name: str) -> int:
    """vit_b_16 -> 16: torchvision names each ViT by its patch size."""
    return int(name.rsplit("_", 1)[1])


def _vit_size_problem(name: str, size: int) -> str | None:
    patch = _patch_size(name)
    if size % patch == 0:
        return None
    return (f"divisible by {patch}, its patch size: its position embeddings exist for a grid of whole patches "
            f"(interpolated to that grid when weights of another size are loaded)")


def _maxvit_size_problem(name: str, size: int) -> str | None:
    shapes, side = [], (size + 1) // 2  # the stem halves, then each of the 4 stages
    for _ in range(4):
        side = (side + 1) // 2
        shapes.append(side)
    if all(s % 7 == 0 for s in shapes):
        return None
    return ("whose feature map at every stage (1/4 to 1/32 of the input) divides into its 7x7 attention windows "
            "and grids")


def _any_size(name: str, size: int) -> str | None:
    return None


def _at_least(minimum: int) -> Callable[[str, int], str | None]:
    def problem(name: str, size: int) -> str | None:
        if size >= minimum:
            return None
        return f">= {minimum}: smaller inputs shrink to nothing before its last stage"

    return problem


# --- builder options --------------------------------------------------------------------------------------


def _no_options(size: int) -> dict[str, Any]:
    return {}


def _without_aux(size: int) -> dict[str, Any]:
    """Aux heads are for training from scratch on ImageNet, not part of the features; torchvision's default
    init (its FutureWarning asks to say so)."""
    return {"aux_logits": False, "init_weights": True}


def _vit_options(size: int) -> dict[str, Any]:
    return {"image_size": size}


def _maxvit_options(size: int) -> dict[str, Any]:
    return {"input_size": (size, size)}


def _as_is(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


def _vit_positions(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Position embeddings of weights for another input size, interpolated to this model's grid (bicubic,
    torchvision's ``interpolate_embeddings``, as timm does when it loads a ViT at a new size)."""
    key = "encoder.pos_embedding"
    if key not in state or state[key].shape == model.encoder.pos_embedding.shape:
        return state
    before = state[key].shape[1] - 1
    state = interpolate_embeddings(model.image_size, model.patch_size,
                                   OrderedDict({**state, key: state[key].float()}))
    side = model.image_size // model.patch_size
    log.info("Position embeddings interpolated from %dx%d to %dx%d patches (image size %d).",
             math.isqrt(before), math.isqrt(before), side, side, model.image_size)
    return state


@dataclass(frozen=True)
class Family:
    """How one torchvision family becomes a Backbone: the one place to add a family.

    ``cut`` gives the ordered stages (pooled features out of the last); ``head`` is the module path of the
    ImageNet classifier, dropped when loading and replaced by the task head (its input width is
    ``feature_dim``); ``aux`` are state_dict prefixes of auxiliary heads that are not built; ``options`` are
    builder arguments at an input size; ``size_problem`` says what an input size lacks (None: it fits);
    ``adapt`` fits loaded tensors to the model built (ViT's position embeddings).
    """

    cut: Callable[[nn.Module], Stages]
    head: str
    size_problem: Callable[[str, int], str | None] = _any_size
    aux: tuple[str, ...] = ()
    options: Callable[[int], dict[str, Any]] = _no_options
    adapt: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _as_is


# Minimum sizes: the smallest square input every model of the family pools to a feature (measured by a
# forward on the meta device; tests/test_families.py checks the minimum works and one pixel less does not).
FAMILIES: dict[str, Family] = {
    "alexnet": Family(_vgg_stages, "classifier.6", _at_least(63)),
    "convnext": Family(_convnext_stages, "classifier.2", _at_least(32)),
    "densenet": Family(_densenet_stages, "classifier", _at_least(29)),
    "efficientnet": Family(_features_stages, "classifier.1"),
    "googlenet": Family(_googlenet_stages, "fc", _at_least(15), aux=("aux1.", "aux2."), options=_without_aux),
    "inception": Family(_inception_stages, "fc", _at_least(75), aux=("AuxLogits.",), options=_without_aux),
    "maxvit": Family(_maxvit_stages, "classifier.5", _maxvit_size_problem, options=_maxvit_options),
    "mnasnet": Family(_mnasnet_stages, "classifier.1"),
    "mobilenet_v2": Family(_features_stages, "classifier.1"),
    "mobilenet_v3": Family(_features_stages, "classifier.3"),
    "regnet": Family(_regnet_stages, "fc"),
    "resnet": Family(_resnet_stages, "fc"),
    "shufflenet_v2": Family(_shufflenet_stages, "fc"),
    "squeezenet": Family(_squeezenet_stages, "classifier.1", _at_least(21)),
    "swin": Family(_swin_stages, "head", _at_least(4)),
    "vgg": Family(_vgg_stages, "classifier.6", _at_least(32)),
    "vit": Family(_vit_stages, "heads.head", _vit_size_problem, options=_vit_options, adapt=_vit_positions),
}
# torchvision's module of a builder -> our family word, where they differ.
MODULE_FAMILY = {"mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3", "shufflenetv2": "shufflenet_v2",
                  "swin_transformer": "swin", "vision_transformer": "vit"}


