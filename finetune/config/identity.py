"""A run's identity: the result-defining part of its config, plus the fingerprint of the data it read.

Resume, the finished-run skip of a sweep re-run, extension by ``trainer.max_epochs`` and the run-dir
claim all compare identities whole and refuse any difference, naming each key with both values. The
schema declares each field's role once (:func:`finetune.config.schema.result` / ``neutral``); nothing
here lists keys by hand except the one change a run may grow by (``trainer.max_epochs``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from finetune.config.schema import NEUTRAL, RESULT, FinetuneConfig
from finetune.config.typed import plain

DATA_KEY = "data.fingerprint"  # the files (or dataset version) a run read, not a config key
EXTENDABLE = "trainer.max_epochs"  # may grow: the run continues from last.ckpt


def roles(node: Any = FinetuneConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> role of every leaf field of the schema (a node's role is inherited by its leaves)."""
    instance = node() if isinstance(node, type) else node
    found: dict[str, str] = {}
    for f in dataclasses.fields(instance):
        role = f.metadata.get("role")
        if role not in (RESULT, NEUTRAL):
            raise TypeError(f"schema field {prefix}{f.name} declares no role: use result(...) or neutral(...)")
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value) and role == RESULT:
            found.update(roles(value, f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = role
    return found


def result_defining(cfg: FinetuneConfig, data_fingerprint: str | None = None) -> dict[str, Any]:
    """``{dotted key: plain value}`` of every result-defining field (paths made absolute), and the data."""
    identity: dict[str, Any] = {}
    _collect(cfg, "", identity)
    identity["backbone.weights"] = _absolute_if_file(identity["backbone.weights"])
    if identity.get("data.root") is not None:
        identity["data.root"] = str(Path(str(identity["data.root"])).expanduser().resolve())
    if data_fingerprint is not None:
        identity[DATA_KEY] = data_fingerprint
    return identity


def _collect(node: Any, prefix: str, out: dict[str, Any]) -> None:
    for f in dataclasses.fields(node):
        if f.metadata.get("role") != RESULT:
            continue
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _collect(value, f"{prefix}{f.name}.", out)
        else:
            out[f"{prefix}{f.name}"] = plain(value)


def _absolute_if_file(weights: Any) -> Any:
    word = str(weights).lower()
    if word in ("imagenet", "none", "null", ""):
        return word or "none"
    return str(Path(str(weights)).expanduser().resolve())


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose values differ; a key only one side has counts too
    (a result-defining key a later version added, or a data fingerprint that was not recorded)."""
    missing = object()
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys
            if not _same(old.get(k, missing), new.get(k, missing))}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def only_extends(diffs: dict[str, tuple[Any, Any]]) -> bool:
    """Only more epochs asked for: a finished or stopped run may continue from its last checkpoint."""
    if set(diffs) != {EXTENDABLE}:
        return False
    old, new = diffs[EXTENDABLE]
    return isinstance(old, int) and isinstance(new, int) and (new > old or new == -1)


def describe(diffs: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """``key: A there, B now; ...`` (a data fingerprint by its first characters)."""
    def short(key: str, value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text[:12] + "..." if key == DATA_KEY and value is not None else text

    shown = [f"{key}: {short(key, old)} there, {short(key, new)} now"
             for key, (old, new) in list(diffs.items())[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(shown) + more
