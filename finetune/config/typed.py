"""The composed config, once, as typed and checked objects: the line below which no code sees a DictConfig."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config.problems import explain
from finetune.config.schema import FinetuneConfig
from finetune.errors import SetupError


def to_typed(cfg: DictConfig | FinetuneConfig) -> FinetuneConfig:
    """Real dataclass instances (``OmegaConf.to_object``), range and cross-field rules checked."""
    if isinstance(cfg, FinetuneConfig):
        return cfg
    refuse_unknown_keys(cfg)
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise explain(error) from None
    if not isinstance(typed, FinetuneConfig):  # composed without conf/config.yaml's schema
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FinetuneConfig), cfg))
    typed.validate()
    return typed


def refuse_unknown_keys(node: Any, prefix: str = "") -> None:
    """A key the schema lacks, added with ``+`` (Hydra adds those even to typed nodes): refused, not ignored."""
    from omegaconf import DictConfig

    kind = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node.keys() if isinstance(node, DictConfig) else ():
        if known is not None and key not in known:
            raise SetupError(f"{prefix}{key} is not a key finetune knows ({prefix.rstrip('.') or 'the config'} has "
                             f"no such key: a typo, or a key of another option?); check its spelling. python -m "
                             f"finetune --cfg job prints every key with its value.")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            refuse_unknown_keys(child, f"{prefix}{key}.")


def plain(node: Any) -> Any:
    """Dataclasses, enums and tuples as plain dicts, strings and lists (for hparams, YAML, JSON)."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, Enum):
        return node.value
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [plain(v) for v in node]
    return node


def to_yaml(cfg: FinetuneConfig) -> str:
    """The resolved config as resolved_config.yaml holds it."""
    return OmegaConf.to_yaml(OmegaConf.create(plain(cfg)))
