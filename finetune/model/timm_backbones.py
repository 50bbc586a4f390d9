"""timm models as backbones: ``backbone=timm backbone.name=<model>``, held under the id ``timm/<model>``.

timm knows each model's stage outputs (``feature_info``), its pretrained input protocol (``pretrained_cfg``) and
its pooled pre-logits (``forward_head(pre_logits=True)``). The cut into ordered stages comes from those and from
one forward on the meta device, traced:

- *chain*: where ``forward_features`` feeds each top-level child (containers on the way to a feature module
  flattened one level, as timm's own ``FeatureListNet`` does) the previous one's output, the stages are those
  children, split after each feature module and named after it (ResNet: act1, layer1..layer4; ConvNeXt:
  stages_0..stages_3; EfficientNet: bn1, blocks_1, ...). Most CNNs, Swin, MaxViT-style hierarchies.
- *tokens*: timm's ``VisionTransformer`` (and subclasses such as DeiT): patch_embed (patches, class/register
  tokens and position embeddings, as ``_pos_embed`` adds them), then one stage per block.

Other forwards (relative position biases shared across blocks, ...) are refused with a clear message. The model
object itself is not registered: its modules and root parameters are, once each, in the stages; the pooling
and pre-logits layers ride on the last stage in :class:`TimmHead`.
"""

from __future__ import annotations

import difflib
import math
import socket
import sys
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from finetune.errors import SetupError
from finetune.model.backbones import (
    TIMM_PREFIX,
    Backbone,
    Preprocessing,
    assign_fitting,
    library_keys,
    load_state_dict_file,
    weights_source,
)
from finetune.model.frozen_weights import STAGE_KEYS_PREFIX


def timm_module() -> Any:
    """timm, or the one-paragraph error that says how to get it (an optional extra)."""
    try:
        import timm
    except ImportError:
        raise SetupError("backbone=timm needs the timm package, an optional extra: pip install 'finetune[timm]' "
                         "(or pip install timm). torchvision's models (conf/backbone/) need nothing more.") from None
    return timm


def model_name(name: str) -> str:
    """'timm/resnet18.a1_in1k' -> 'resnet18.a1_in1k' (timm's name, with its pretrained tag if any)."""
    return str(name)[len(TIMM_PREFIX):]


def check_timm_name(name: str) -> None:
    timm = timm_module()
    wanted = model_name(name)
    if not wanted or wanted == "???":
        raise SetupError("backbone=timm needs a model: backbone=timm backbone.name=<timm model>, e.g. "
                         "backbone.name=resnet18 or backbone.name=vit_small_patch16_224.augreg_in21k_ft_in1k "
                         "(timm.list_models() lists them).")
    if timm.is_model(wanted) and pretrained_cfg(name) is not None:
        return
    arch = wanted.split(".", 1)[0]
    if timm.is_model(arch):
        tags = timm.list_pretrained(f"{arch}.*")
        raise SetupError(f"timm model {arch} has no pretrained tag '{wanted.split('.', 1)[1]}'. Its tags: "
                         f"{', '.join(tags[:8]) or 'none'}{' ...' if len(tags) > 8 else ''}; or leave the tag out "
                         f"(backbone.name={arch}) for timm's default.")
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.7)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise SetupError(f"Unknown timm model '{wanted}'.{hint} timm.list_models('*pattern*') lists the "
                     f"{len(timm.list_models())} it has; give one as backbone=timm backbone.name=<model>.")


def pretrained_cfg(name: str) -> Any:
    """timm's pretrained config of the model (its default tag when none is given), or None."""
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(model_name(name), allow_unregistered=False)
    except RuntimeError:
        return None


def timm_preprocessing(name: str) -> Preprocessing:
    """Input size, crop fraction, interpolation and normalisation from the pretrained config, as timm's own
    ``create_transform(**resolve_data_config(...))`` uses them for evaluation (resize floor(size / crop_pct))."""
    check_timm_name(name)
    cfg = pretrained_cfg(name)
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    return Preprocessing(resize_size=math.floor(size / crop_pct), crop_size=size,
                         mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),  # type: ignore
                         interpolation=str(cfg.interpolation or "bicubic"))


def weights_tag(name: str) -> str:
    """Which pretrained weights ``imagenet`` means: timm's hub id (or tag), for the feature cache's identity."""
    cfg = pretrained_cfg(name)
    return str(cfg.hf_hub_id or f"{cfg.architecture}.{cfg.tag}")


# --- modules for what timm does in a forward method ---------------------------------------------------------


def _hold(owner: nn.Module, model: nn.Module) -> None:
    """Keep ``model`` as a plain attribute: its modules are registered in the stages, not twice through it."""
    object.__setattr__(owner, "_timm_model", model)


class TimmTokens(nn.Module):
    """A timm VisionTransformer's input side: patch embedding, class/register tokens and position embeddings
    (``_pos_embed``), patch dropout and pre-norm. Registers those modules and the root's token parameters (the
    same tensors the model reads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _hold(self, model)
        for name in ("patch_embed", "pos_drop", "patch_drop", "norm_pre"):
            self.add_module(name, getattr(model, name))
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)

    def train(self, mode: bool = True) -> TimmTokens:
        super().train(mode)
        self._timm_model.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._timm_model
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


class TimmHead(nn.Module):
    """The model's ``forward_head(x, pre_logits=True)``: its pooling and pre-logits layers (ConvNeXt's norm,
    ViT's fc_norm, MobileNetV3's conv_head), without the ImageNet classifier (``reset_classifier(0)``)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        _hold(self, model)
        for name in names:
            self.add_module(name, getattr(model, name))

    def train(self, mode: bool = True) -> TimmHead:
        super().train(mode)
        self._timm_model.training = mode  # forward_head reads the root's flag (e.g. EfficientNet's dropout)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._timm_model.forward_head(x, pre_logits=True)


class TimmNetwork(nn.Module):
    """The whole timm model as one registered module (``forward_features`` then the pooled pre-logits): what
    export scripts and traces, with the same tensors as the stages."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class TimmBackbone(Backbone):
    """A Backbone whose stages hold a timm model's modules; ``network()`` gives that model whole, for export."""

    def __init__(self, name: str, stages: OrderedDict[str, nn.Module], feature_dim: int, model: nn.Module) -> None:
        super().__init__(name, stages, feature_dim)
        _hold(self, model)

    def network(self) -> nn.Module:
        return TimmNetwork(self._timm_model)


# --- the cut ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one timm model is cut, read off a meta-device forward: ``stages`` name -> module paths of the model
    (``tokens`` for TimmTokens), ``head`` the top-level children ``forward_head`` uses, and the pooled width."""

    stages: tuple[tuple[str, tuple[str, ...]], ...]
    head: tuple[str, ...]
    feature_dim: int


def _feature_modules(model: nn.Module) -> list[str]:
    info = model.feature_info
    names = info.module_name() if hasattr(info, "module_name") else [entry["module"] for entry in info]
    return [str(n) for n in names]


def _units(model: nn.Module, features: list[str]) -> list[tuple[str, nn.Module]]:
    """Top-level children in order; a child holding a feature module deeper down is opened one level."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        inner = [f for f in features if f.startswith(f"{name}.")]
        if inner and isinstance(child, nn.Sequential | nn.ModuleList):
            units += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            units.append((name, child))
    return units


def _unsupported(name: str, why: str) -> SetupError:
    return SetupError(f"timm model {model_name(name)} cannot be cut into stages here: {why}. Supported are timm "
                      f"models whose forward_features runs their top-level blocks one after another (most CNNs, "
                      f"Swin, ConvNeXt, EfficientNet, RegNet, ...) and timm's VisionTransformer family; pick "
                      f"one of those, or a torchvision model (conf/backbone/).")


def _trace(name: str, model: nn.Module, size: int) -> Plan:
    """One forward on the meta device, recording which unit gets which tensor."""
    features = _feature_modules(model)
    units = _units(model, features)
    calls: list[tuple[str, Any, Any]] = []
    hooks = [module.register_forward_hook(lambda m, args, out, path=path: calls.append((path, args, out)))
             for path, module in units]
    x = torch.empty(2, 3, size, size, device="meta")
    try:
        with torch.no_grad():
            out = model.forward_features(x)
            in_features = len(calls)
            pooled = model.forward_head(out, pre_logits=True)
    except Exception as error:
        raise SetupError(f"timm model {model_name(name)} does not run at {size} px ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}). Choose another "
                         f"data.image_size (data.image_size=null uses its own, "
                         f"{pretrained_cfg(name).input_size[-1]}).") from None
    finally:
        for hook in hooks:
            hook.remove()
    feature_dim = int(pooled.shape[-1])
    if pooled.dim() != 2:
        raise _unsupported(name, f"its pre-logits are {tuple(pooled.shape)}, not (batch, features)")
    ran = calls[:in_features]
    head = tuple(dict.fromkeys(path.split(".")[0] for path, _, _ in calls[in_features:]))
    paths = [path for path, _, _ in ran]
    chained = (ran and len(set(paths)) == len(paths) and ran[0][1][0] is x and ran[-1][2] is out
               and all(ran[i][1][0] is ran[i - 1][2] for i in range(1, len(ran))))
    unused = [p for p, _ in units if p not in paths and p.split(".")[0] not in head]
    if chained:
        groups = _split(paths, [f for f in features if any(f == p or f.startswith(f"{p}.") for p in paths)])
        return Plan(tuple(groups.items()), head + tuple(p for p in unused if "." not in p), feature_dim)
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
        stages = [("patch_embed", ("tokens",)), *((f"blocks_{i}", (p,)) for i, p in enumerate(blocks))]
        last, members = stages[-1]
        stages[-1] = (last, (*members, "norm"))
        return Plan(tuple(stages), head, feature_dim)
    raise _unsupported(name, "its forward_features does more between its blocks than pass one's output to the next")


def _split(paths: list[str], features: list[str]) -> OrderedDict[str, tuple[str, ...]]:
    """Units in order, a stage closing at each feature module (named after it); later units join the last."""
    groups: OrderedDict[str, tuple[str, ...]] = OrderedDict()
    current: list[str] = []
    pending = list(features)
    for path in paths:
        current.append(path)
        if pending and (pending[0] == path or pending[0].startswith(f"{path}.")):
            groups[pending.pop(0).replace(".", "_")] = tuple(current)
            current = []
            while pending and (pending[0] == path or pending[0].startswith(f"{path}.")):
                pending.pop(0)  # two feature modules inside one unit: one stage
    if current:
        if not groups:
            groups["features"] = ()
        last = next(reversed(groups))
        groups[last] = (*groups[last], *current)
    return groups


def _size(name: str, image_size: int | None) -> int:
    return int(image_size) if image_size is not None else int(pretrained_cfg(name).input_size[-1])


def _create(name: str, image_size: int | None, empty: bool, pretrained: bool = False, file: str | None = None
            ) -> nn.Module:
    """timm.create_model at the input size (models with a fixed input size are built for it); ``file``: the
    pretrained weights, already local."""
    timm = timm_module()
    options: dict[str, Any] = {}
    if image_size is not None and pretrained_cfg(name).fixed_input_size:
        options["img_size"] = int(image_size)
    if file is not None:
        options["pretrained_cfg_overlay"] = {"file": file}
    if not empty:
        return timm.create_model(model_name(name), pretrained=pretrained, **options)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return timm.create_model(model_name(name), pretrained=False, **options)


@cache
def plan_for(name: str, image_size: int | None) -> Plan:
    check_timm_name(name)
    model = _create(name, image_size, empty=True)
    model.reset_classifier(0)
    return _trace(name, model.eval(), _size(name, image_size))


def check_timm_image_size(name: str, image_size: int | None) -> None:
    plan_for(name, None if image_size is None else int(image_size))


def _cut(name: str, model: nn.Module, plan: Plan) -> TimmBackbone:
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    for stage, paths in plan.stages:
        stages[stage] = nn.Sequential(*(TimmTokens(model) if p == "tokens" else model.get_submodule(p)
                                        for p in paths))
    last = next(reversed(stages))
    stages[last] = nn.Sequential(*stages[last], TimmHead(model, list(plan.head)))
    backbone = TimmBackbone(name, stages, plan.feature_dim, model)
    _check_every_tensor_once(name, model, backbone)
    return backbone


def _check_every_tensor_once(name: str, model: nn.Module, backbone: nn.Module) -> None:
    """Every parameter and buffer of the model (non-persistent ones too) is held by the stages, and nothing else."""
    held = {id(t) for t in [*backbone.parameters(), *backbone.buffers()]}
    own = [*model.named_parameters(), *model.named_buffers()]
    lost = [k for k, t in own if id(t) not in held]
    if lost or held != {id(t) for _, t in own}:
        raise _unsupported(name, f"{len(lost)} of its tensors (e.g. {lost[:2]}) are not in a stage")


def timm_empty_backbone(name: str, image_size: int | None = None) -> TimmBackbone:
    plan = plan_for(name, None if image_size is None else int(image_size))
    model = _create(name, image_size, empty=True)
    model.reset_classifier(0)
    return _cut(name, model.eval(), plan)


def timm_keys(name: str) -> dict[str, str]:
    """finetune's key of every backbone tensor -> timm's key (as :func:`torchvision_keys` does for torchvision)."""
    model = _create(name, None, empty=True)
    model.reset_classifier(0)
    own = {id(t): key for key, t in model.state_dict(keep_vars=True).items()}
    stages = _cut(name, model, plan_for(name, None)).stages
    return {f"{STAGE_KEYS_PREFIX}{key}": own[id(t)] for key, t in stages.state_dict(keep_vars=True).items()}


def _classifier_prefixes(name: str) -> tuple[str, ...]:
    classifier = pretrained_cfg(name).classifier or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order


def pretrained_file(name: str) -> str:
    """The tag's weights file: from the Hugging Face hub cache, else downloaded into it.

    Offline (the hub's host does not resolve) the error comes at once, not after huggingface_hub's retries.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cfg = pretrained_cfg(name)
    if not cfg.hf_hub_id:
        raise SetupError(f"timm model {model_name(name)}'s pretrained tag has no Hugging Face hub repo (only "
                         f"{cfg.url or 'no address'}); download its weights by hand and give them with "
                         f"backbone.weights=/path/to/file, or use backbone.weights=none.")
    for filename in HUB_FILES:
        cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
        if isinstance(cached, str):
            return cached
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(name, RuntimeError("HF_HUB_OFFLINE is set"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as error:
        raise _hub_error(name, error) from None
    last: Exception | None = None
    for filename in HUB_FILES:
        try:
            return str(hf_hub_download(cfg.hf_hub_id, filename))
        except Exception as error:  # the repo lacks this file, or the network failed: try the next, then say so
            last = error
    raise _hub_error(name, last or RuntimeError("no weights file"))


def _hub_error(name: str, error: Exception) -> SetupError:
    from huggingface_hub.constants import HF_HUB_CACHE

    cfg = pretrained_cfg(name)
    where = f"the Hugging Face hub repo {cfg.hf_hub_id}" if cfg.hf_hub_id else f"{cfg.url or 'timm'}"
    return SetupError(
        f"Pretrained weights for timm model {model_name(name)} are not in the Hugging Face hub cache and could not "
        f"be downloaded ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}). "
        f"Download {where} on a machine with internet into the hub cache '{HF_HUB_CACHE}' (set HF_HOME to move "
        f"it), or give the weights file with backbone.weights=/path/to/model.safetensors (or .pth), or train "
        f"without them with backbone.weights=none."
    )


def _load_file(name: str, model: nn.Module, path: str) -> None:
    """A state_dict file (or a finetune checkpoint) into the meta-built model, through the model module's own
    ``checkpoint_filter_fn`` (original checkpoints converted, position embeddings resampled to this size)."""
    state = library_keys(load_state_dict_file(path, name), name, f"'{path}'")
    fix = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fix is not None:
        state = fix(state, model)
    assign_fitting(model, state, _classifier_prefixes(name), None,
                   f"The weights in '{path}' do not fit timm model {model_name(name)}",
                   f"Check that the file was saved from this timm model "
                   f"(timm.create_model('{model_name(name)}').state_dict()).")


def timm_build_backbone(name: str, weights: str | None = "imagenet", image_size: int | None = None) -> TimmBackbone:
    plan = plan_for(name, None if image_size is None else int(image_size))
    source = weights_source(weights)
    if source == "imagenet":
        file = pretrained_file(name)
        try:  # timm's own loader (its filter and label-space rules), from the local file: no network
            model = _create(name, image_size, empty=False, pretrained=True, file=file)
        except Exception as error:
            raise SetupError(f"timm could not load its pretrained weights for {model_name(name)} from '{file}' "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). "
                             f"Delete the file and run again to download it afresh, or use backbone.weights=none."
                             ) from None
    elif source == "file":
        model = _create(name, image_size, empty=True)
        _load_file(name, model, str(weights))
    else:
        model = _create(name, image_size, empty=False)
    model.reset_classifier(0)
    model.train()
    return _cut(name, model, plan)


def timm_meta(name: str) -> dict[str, Any]:
    """What the report shows beside its own measurements: timm ships no ImageNet accuracy table in the package."""
    model = _create(name, None, empty=True)
    return {"imagenet_top1": None, "imagenet_top5": None, "num_params": sum(p.numel() for p in model.parameters()),
            "gflops": None, "file_size_mb": None}

