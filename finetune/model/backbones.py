"""Backbone registry: any torchvision classification model cut into named stages, plus its weights' meta.

torchvision already knows every model, its weights, their URLs, transforms and ImageNet accuracy; this
module only adds what torchvision lacks: one rule per family (``FAMILIES`` in :mod:`finetune.model.families`)
that cuts a model into ordered stages ending in pooled features, where its ImageNet classifier sits, and
which input sizes it takes. Every parameter of the torchvision model but that classifier lives in exactly one stage.

Frozen stages and normalisation: BatchNorm has running statistics, so ``Backbone.train()`` keeps frozen
stages in eval mode and they never move. LayerNorm (ViT, Swin, ConvNeXt, MaxViT) and GroupNorm keep no
statistics: for them frozen simply means requires_grad False, and nothing moves either.
"""

from __future__ import annotations

import difflib
import logging
import os
import urllib.error
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from finetune.config.schema import TIMM_PREFIX  # timm models: built by finetune.model.timm_backbones
from finetune.errors import SetupError
from finetune.model.families import FAMILIES, MODULE_FAMILY
from finetune.model.frozen_weights import COMPILED_PREFIX, STAGE_KEYS_PREFIX

log = logging.getLogger(__name__)

BACKBONE_NAMES = tuple(torchvision.models.list_models(module=torchvision.models))
VGG_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
VGG_STAGES = ("block1", "block2", "block3", "block4", "block5", "fc6", "fc7")



@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input, read from the weights' own transforms."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # torchvision's InterpolationMode value: bicubic for weights trained so
    decode: str = "pil"  # how files become pixels (data.decode): pil, pil_draft, torchvision or device

    def at_size(self, image_size: int | None) -> Preprocessing:
        """Same crop fraction and normalisation at another crop size (tiny test images)."""
        if image_size is None or image_size == self.crop_size:
            return self
        resize = round(image_size * self.resize_size / self.crop_size)
        return replace(self, resize_size=resize, crop_size=image_size)

    def without_border_crop(self) -> Preprocessing:
        """Resize to the crop size itself: the centre crop then keeps the whole (square) image."""
        return replace(self, resize_size=self.crop_size)


class Backbone(nn.Module):
    """Ordered stages ending in pooled features of width ``feature_dim``.

    ``forward(x, start=k)`` runs stages k..end, which is how cached outputs of a
    frozen prefix re-enter the network. Stages listed in ``frozen`` stay in eval
    mode whatever ``train()`` is called with, so BatchNorm statistics and dropout
    of frozen stages never move.
    """

    def __init__(self, name: str, stages: OrderedDict[str, nn.Module], feature_dim: int) -> None:
        super().__init__()
        self.name = name
        self.stages = nn.ModuleDict(stages)
        self.feature_dim = feature_dim
        self.frozen: tuple[str, ...] = ()

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def num_frozen_prefix(self) -> int:
        """How many leading stages are frozen (the cacheable, no-grad part)."""
        count = 0
        for name in self.stage_names:
            if name not in self.frozen:
                break
            count += 1
        return count

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for name in self.frozen:
            self.stages[name].eval()
        return self

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        names = self.stage_names
        prefix = self.num_frozen_prefix
        if start < prefix:
            # Frozen prefix: no autograd graph is kept for it.
            with torch.no_grad():
                for name in names[start:prefix]:
                    x = self.stages[name](x)
            start = prefix
        for name in names[start:]:
            x = self.stages[name](x)
        return x

    def network(self) -> nn.Module:
        """Image -> pooled features as one plain module, for export: the stages in a row."""
        return nn.Sequential(*self.stages.values())


def is_timm(name: str) -> bool:
    return str(name).startswith(TIMM_PREFIX)


def _timm() -> Any:
    """finetune.model.timm_backbones, imported when a timm model is named (it imports timm, an optional extra)."""
    from finetune.model import timm_backbones

    return timm_backbones


def family(name: str) -> str:
    """The family word of a model (resnet for ResNeXt and Wide ResNet too): the torchvision module that builds
    it, so no name table; picks the stage rule, and e.g. plot colours. Every timm model: ``timm``."""
    check_name(name)
    if is_timm(name):
        return "timm"
    module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return MODULE_FAMILY.get(module, module)


def check_name(name: str) -> None:
    if name in BACKBONE_NAMES:
        return
    if is_timm(name):
        _timm().check_timm_name(name)
        return
    close = difflib.get_close_matches(str(name), BACKBONE_NAMES, n=3, cutoff=0.6)
    hint = f"Did you mean {', '.join(close[:-1])}{' or ' if len(close) > 1 else ''}{close[-1]}? " if close else ""
    raise SetupError(
        f"Unknown backbone '{name}'. {hint}Every torchvision classification model works "
        f"({len(BACKBONE_NAMES)} of them, families: {', '.join(sorted(FAMILIES))}); each has its file in "
        f"conf/backbone/ (or see torchvision.models.list_models()), e.g. backbone=resnet50; a timm model: "
        f"backbone=timm backbone.name=<timm model>."
    )


def check_image_size(name: str, image_size: int | None) -> None:
    """Refuse an input size the model cannot take, in one paragraph naming sizes that work; no model is built,
    so the config door can call it. ``None`` (the weights' own size) always fits."""
    check_name(name)
    if is_timm(name):
        _timm().check_timm_image_size(name, image_size)
        return
    if image_size is None:
        return
    size = int(image_size)
    problem = FAMILIES[family(name)].size_problem(name, size)
    if problem is None:
        return
    below = next((s for s in range(size - 1, 0, -1) if _fits(name, s)), None)
    above = next(s for s in range(size + 1, 8 * size + 4096) if _fits(name, s))
    nearest = [str(s) for s in (below, above) if s is not None]
    works = f"sizes that work are {' or '.join(nearest)}" if len(nearest) > 1 else f"size that works is {nearest[0]}"
    raise SetupError(
        f"Backbone {name} needs data.image_size {problem}; got data.image_size={size}. The nearest {works} "
        f"(data.image_size=null uses the weights' own, "
        f"{preprocessing_for(name).crop_size}); or choose another backbone."
    )


def _fits(name: str, size: int) -> bool:
    return FAMILIES[family(name)].size_problem(name, size) is None


def min_image_size(name: str) -> int:
    """The smallest square input ``name`` takes (for ViT: one patch; MaxViT: see ``check_image_size``)."""
    check_name(name)
    if is_timm(name):
        raise SetupError(f"{name}: the smallest input size of a timm model is not known without trying; "
                         f"check_image_size says whether one size fits.")
    return next(s for s in range(1, 4096) if _fits(name, s))


def stage_names_of(name: str) -> tuple[str, ...]:
    """The ordered stage names of a backbone, without building it (config checks at the door)."""
    check_name(name)
    return _stage_names(name)


@cache
def _stage_names(name: str) -> tuple[str, ...]:
    return tuple(empty_backbone(name).stage_names)


def imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    """torchvision's best ImageNet weights for this model (the DEFAULT entry); for a timm model, the hub id of
    its pretrained tag (what ``imagenet`` loads)."""
    check_name(name)
    if is_timm(name):
        return _timm().weights_tag(name)
    return torchvision.models.get_model_weights(name).DEFAULT


def preprocessing_for(name: str) -> Preprocessing:
    """Resize, crop, mean and std from the ImageNet weights' own transforms.

    Used for every weights source: a file or ``none`` still expects ImageNet-style input. A timm model's come
    from its pretrained config (interpolation too: bicubic for most).
    """
    if is_timm(name):
        return _timm().timm_preprocessing(name)
    t = imagenet_weights(name).transforms()
    return Preprocessing(
        resize_size=int(t.resize_size[0]),
        crop_size=int(t.crop_size[0]),
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=str(t.interpolation.value),
    )


def weights_source(weights: str | None) -> str:
    """'imagenet', 'none' or 'file': how summary.json names where weights came from."""
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return "none"
    if str(weights).lower() == "imagenet":
        return "imagenet"
    return "file"


def _download_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    weights = imagenet_weights(name)
    file_name = os.path.basename(weights.url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        cached = folder / file_name
        if cached.exists():
            raise SetupError(
                f"The cached ImageNet weights for {name} at {cached} could not be read ({err}). "
                f"Delete the file and run again, or download {weights.url} by hand to that path."
            ) from None
        raise SetupError(
            f"ImageNet weights for {name} are not cached and could not be downloaded ({err}). "
            f"Put the file '{file_name}' (from {weights.url}) into the folder '{folder}' "
            f"(the torch hub cache; set TORCH_HOME to move it), or run without them with "
            f"backbone.weights=none, or give a state_dict file with backbone.weights=/path/to/file.pth."
        ) from None


def load_state_dict_file(path: str | os.PathLike, name: str | None = None) -> dict[str, torch.Tensor]:
    """A torchvision state_dict, or a Lightning checkpoint of ours, loaded without pickled code.

    A finetune checkpoint (``checkpoints/*.ckpt`` of a run) gives its backbone's tensors, completed as
    :func:`finetune_checkpoint_state` says; ``name``, the backbone being built, must be the one it holds.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(
            f"backbone.weights='{path}' is neither 'imagenet', 'none' nor an existing file. "
            f"Give the path of a state_dict (.pth, .safetensors) or checkpoint (.ckpt) file."
        )
    if path.suffix == ".safetensors":  # tensors only by construction (the hub's format, timm's weights)
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SetupError(
            f"Refused to load '{path}': it is not a plain tensor file loadable with "
            f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Only "
            f"state_dicts and checkpoints are accepted, never pickles that run code; re-save it "
            f"with torch.save(model.state_dict(), path)."
        ) from None
    if is_finetune_checkpoint(obj):
        if _checkpoint_reader is None:
            raise SetupError(f"backbone.weights='{path}' is a finetune checkpoint; import finetune.model.checkpoints "
                             f"first (it reads them).")
        obj = _checkpoint_reader(path, obj, name)
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SetupError(f"'{path}' holds no state_dict (a dict of tensors).")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SetupError(f"'{path}' is a safetensors file: pip install safetensors (timm's extra brings it).") from None
    try:
        return load_file(str(path))
    except Exception as err:
        raise SetupError(f"'{path}' is not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from None


# How a finetune checkpoint given as backbone.weights becomes backbone tensors: set by
# finetune.model.checkpoints, which sits above this registry (it builds whole modules), so the
# registry never imports the code that trains (timm's pretrained_filter_fn, the same seam).
CheckpointReader = Callable[[Path, dict[str, Any], "str | None"], dict[str, torch.Tensor]]
_checkpoint_reader: CheckpointReader | None = None


def register_checkpoint_reader(reader: CheckpointReader) -> None:
    global _checkpoint_reader
    _checkpoint_reader = reader


def is_finetune_checkpoint(obj: Any) -> bool:
    """A Lightning checkpoint whose hyper_parameters name a backbone: one written by a finetune run."""
    return (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
            and isinstance(obj.get("hyper_parameters"), dict) and "backbone" in obj["hyper_parameters"])


def strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys without ``prefix`` when every key has it (DataParallel's module., torch.compile's _orig_mod.)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_into(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load backbone weights; the old ImageNet classifier (and aux heads) may differ or lack.

    A FinetuneModule's state_dict (a finetune checkpoint's) is taken under torchvision's keys; its
    head, trained for another run's classes, is dropped.
    """
    rule = FAMILIES[family(name)]
    state = library_keys(state, name, source)
    # Module versions (MNASNet reads its own): the file's when its keys are as saved, else the model's.
    metadata = getattr(state, "_metadata", None)
    assign_fitting(model, rule.adapt(model, state), (f"{rule.head}.", *rule.aux), metadata,
                   f"The weights from {source} do not fit backbone '{name}'",
                   f"Check that the file was saved from a torchvision {name}, or pick the matching backbone=...")


def library_keys(state: dict[str, torch.Tensor], name: str, source: str) -> dict[str, torch.Tensor]:
    """A state_dict under the library's own keys: DataParallel's, Lightning's and torch.compile's prefixes
    stripped, a finetune checkpoint's ``backbone.stages.*`` keys renamed (its head dropped, as this run builds
    its own)."""
    state = strip_prefix(state, "module.")
    state = strip_prefix(state, "model.")
    state = strip_prefix(state, COMPILED_PREFIX)
    if not any(k.startswith(STAGE_KEYS_PREFIX) for k in state):
        return state
    renamed = torchvision_keys(name)
    other = [k for k in state if not k.startswith(STAGE_KEYS_PREFIX)]
    if other:  # the head (trained for another run's classes), a weighted loss's class weights, ...
        log.info("%s: %d tensors outside the backbone (the classifier head, e.g. %s) are not used: this run "
                 "builds its own classifier head.", source, len(other), other[0])
    return {renamed.get(k, k): v for k, v in state.items() if k.startswith(STAGE_KEYS_PREFIX)}


def assign_fitting(model: nn.Module, state: dict[str, torch.Tensor], ignored: tuple[str, ...], metadata: Any,
                   what: str, hint: str) -> None:
    """Every tensor of ``model`` but those under ``ignored`` (the ImageNet classifier, aux heads) taken from
    ``state``, as float32 where floating; any missing, extra or misshapen tensor refused in one paragraph
    (``what (detail). hint``). The model may be on the meta device: the tensors become its tensors."""
    own = model.state_dict()
    wanted = {k for k in own if not k.startswith(ignored)}
    missing = sorted(wanted - state.keys())
    unexpected = sorted(k for k in state.keys() - own.keys() if not k.startswith(ignored))
    mismatched = sorted(k for k in wanted & state.keys() if state[k].shape != own[k].shape)
    if missing or mismatched or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"missing {len(missing)} tensors, e.g. {missing[:3]}" if missing else "",
                f"{len(unexpected)} tensors the model lacks, e.g. {unexpected[:3]}" if unexpected else "",
                f"{len(mismatched)} shape mismatches, e.g. {mismatched[0]}: file "
                f"{tuple(state[mismatched[0]].shape)} vs model {tuple(own[mismatched[0]].shape)}"
                if mismatched
                else "",
            )
            if part
        )
        raise SetupError(f"{what} ({detail}). {hint}")
    # The model was built on the meta device: the loaded tensors become its tensors (float32, as built).
    loaded = OrderedDict((k, state[k].float() if state[k].is_floating_point() else state[k]) for k in sorted(wanted))
    loaded._metadata = metadata or own._metadata  # type: ignore[attr-defined]
    model.load_state_dict(loaded, strict=False, assign=True)


@contextmanager
def _tensors_on_meta() -> Iterator[None]:
    """Parameters and buffers go to the meta device as modules register them: no memory, no init.

    ``with torch.device("meta")`` would do for most builders, but RegNet computes its block widths with
    tensors and reads them back, which meta tensors cannot. The RNG is forked: a build that loads weights
    leaves the global generator as it found it, for the head.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta  # type: ignore
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore


def _torchvision_model(name: str, image_size: int | None, empty: bool) -> nn.Module:
    """torchvision's model, at ``image_size`` where its family builds per size (ViT, MaxViT); ``empty``: on the
    meta device, for weights to be loaded into or for structure alone."""
    size = int(image_size) if image_size is not None else preprocessing_for(name).crop_size
    options = FAMILIES[family(name)].options(size)
    if not empty:
        return torchvision.models.get_model(name, weights=None, **options)
    with _tensors_on_meta():
        return torchvision.models.get_model(name, weights=None, **options)


def _cut(name: str, model: nn.Module) -> Backbone:
    rule = FAMILIES[family(name)]
    head = model.get_submodule(rule.head)
    feature_dim = head.in_features if isinstance(head, nn.Linear) else head.in_channels
    return Backbone(name, rule.cut(model), int(feature_dim))


def torchvision_keys(name: str) -> dict[str, str]:
    """finetune's key of every backbone tensor (``backbone.stages.<stage>.<rest>``) -> torchvision's key.

    Read off the stages themselves: they hold torchvision's own modules, so each tensor has one name
    in either model (e.g. ``backbone.stages.stem.0.weight`` -> ``conv1.weight``, ``backbone.stages.fc7.0.bias``
    -> ``classifier.3.bias``). Built on the meta device: no memory, no init. A timm model: timm's keys.
    """
    if is_timm(name):
        return _timm().timm_keys(name)
    model = _torchvision_model(name, None, empty=True)
    own = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
    stages = _cut(name, model).stages
    return {f"{STAGE_KEYS_PREFIX}{key}": own[id(t)] for key, t in stages.state_dict(keep_vars=True).items()}


def empty_backbone(name: str, image_size: int | None = None) -> Backbone:
    """The backbone's structure on the meta device, without storage: stage names, FLOP counts at any size."""
    check_name(name)
    check_image_size(name, image_size)
    if is_timm(name):
        return _timm().timm_empty_backbone(name, image_size)
    return _cut(name, _torchvision_model(name, image_size, empty=True))


def build_backbone(name: str, weights: str | None = "imagenet", image_size: int | None = None) -> Backbone:
    """Build ``name`` with weights 'imagenet', 'none' or a path, cut into its stages.

    ``image_size`` matters to ViT (position embeddings for that grid, interpolated from the weights') and MaxViT
    (attention partitions); other families take any size. ``None``: the weights' own.
    """
    check_name(name)
    check_image_size(name, image_size)
    if is_timm(name):
        return _timm().timm_build_backbone(name, weights, image_size)
    source = weights_source(weights)
    # Loaded weights replace every tensor: skip the random init (~1.5 s for VGG-16 on a CPU core).
    model = _torchvision_model(name, image_size, empty=source != "none")
    if source == "imagenet":
        _load_into(model, name, _download_imagenet_state_dict(name), "torchvision's ImageNet weights")
    elif source == "file":
        _load_into(model, name, load_state_dict_file(str(weights), name), f"'{weights}'")
    return _cut(name, model)


def imagenet_meta(name: str) -> dict[str, Any]:
    """ImageNet accuracy, params and GFLOPs as torchvision's weights meta states them."""
    if is_timm(name):
        return _timm().timm_meta(name)
    meta = imagenet_weights(name).meta
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    return {
        "imagenet_top1": metrics.get("acc@1"),
        "imagenet_top5": metrics.get("acc@5"),
        "num_params": meta.get("num_params"),
        "gflops": meta.get("_ops"),
        "file_size_mb": meta.get("_file_size"),
    }
