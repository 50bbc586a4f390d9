"""One ``key=value`` parser for the commands beside training (check, predict, export, report, compare).

Each command describes its options as a dataclass: a default and ``metadata={"doc": ...}`` per
field (and a ``"metavar"`` where ``--help`` should show another placeholder than the type). The
command line becomes an instance of it the way the train entry treats overrides: OmegaConf checks
types and the choices of :class:`~finetune.config.schema.Choice` fields,
:func:`finetune.config.problems.explain` words what it refuses as one paragraph, and the
dataclass's ``validate()`` checks ranges. ``--help`` is generated from the same fields, so it
cannot drift from what is accepted.

Two class attributes of an options dataclass widen the syntax: ``POSITIONAL = "root"`` lets one
word without ``=`` set that field (``compare DIR``); ``ALIASES = {"data": "data.name"}`` lets a
short key stand for a longer one (``check data=folder``).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config.problems import ConfigProblem, explain, shown
from finetune.errors import SetupError, report_error

T = TypeVar("T")
HELP_WORDS = ("-h", "--help")
KEY = re.compile(r"[A-Za-z_][\w.]*")  # what a key looks like; anything else (a path) can only be the positional
TEXT_TYPES = (str, Path)  # fields whose value is taken as typed: out=007 or out=on stay folder names


def run_command(schema: type[T], argv: Sequence[str] | None, body: Callable[[T], int], *, prog: str,
                summary: str) -> int:
    """What every command's ``main`` does: help -> 0; parse; ``body``; any SetupError -> one paragraph, exit 2."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    if wants_help(tokens):
        print(usage(schema, prog, summary))
        return 0
    try:
        return body(parse_args(schema, tokens, prog=prog, summary=summary))
    except SetupError as err:
        return report_error(err)


def wants_help(tokens: Sequence[str]) -> bool:
    return any(token in HELP_WORDS for token in tokens)


def parse_args(schema: type[T], tokens: Sequence[str], *, prog: str, summary: str = "") -> T:
    """``tokens`` as a checked ``schema`` instance; a SetupError naming the key for anything refused.

    ``-h``/``--help`` prints :func:`usage` and exits 0 (as argparse does) for callers outside
    :func:`run_command`.
    """
    if wants_help(tokens):
        print(usage(schema, prog, summary))
        raise SystemExit(0)
    positional: str | None = getattr(schema, "POSITIONAL", None)
    aliases: dict[str, str] = getattr(schema, "ALIASES", {})
    word, required = _leaf(schema, positional) if positional else ("", False)
    overrides = OmegaConf.create()
    given: set[str] = set()
    for token in tokens:
        key, sep, raw = token.partition("=")
        key = key.lstrip("+")
        if positional and (not sep or not KEY.fullmatch(key)) and positional not in given:
            key, raw = positional, token
        elif not sep:
            one = f"one {word} and " if positional else ""
            raise SetupError(f"Cannot use {token!r} here: {prog} takes {one}key=value words; the options are "
                             f"{', '.join(option_keys(schema))} ({prog} --help says what each does).")
        key = aliases.get(key, key)
        given.add(key)
        _set(overrides, key, raw, _field_type(schema, key, prog))
    if required and positional not in given:
        raise SetupError(f"Say which {word}: {prog} {word} [key=value ...] ({prog} --help lists the options).")
    try:
        options = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), overrides))
    except OmegaConfBaseException as err:
        raise explain(err) from None
    validate = getattr(options, "validate", None)
    if callable(validate):
        validate()
    return typing.cast(T, options)


def _set(overrides: Any, key: str, raw: str, kind: Any) -> None:
    """Text and choices as typed, lists split at commas (``a,b`` or ``[a,b]``), anything else read as YAML."""
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
    if item is not None and _is_text(item):
        OmegaConf.update(overrides, key, [v.strip() for v in raw.strip().strip("[]").split(",") if v.strip()])
    elif kind is Path and not raw.strip():
        raise ConfigProblem(key, raw, "is empty", "give a path, or leave the key out for its default.")
    elif _is_text(kind) and raw not in ("null", "~"):
        OmegaConf.update(overrides, key, raw)
    else:
        if item is not None and not raw.startswith("["):
            raw = f"[{raw}]"
        overrides.merge_with_dotlist([f"{key}={raw}"])


def _is_text(kind: Any) -> bool:
    return kind in TEXT_TYPES or (isinstance(kind, type) and issubclass(kind, Enum))


def _field_type(schema: type, key: str, prog: str) -> Any:
    """The (non-optional) type of the field ``key`` names; a SetupError listing the options if there is none."""
    node: Any = schema
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        names = {f.name for f in dataclasses.fields(node)} if hints else set()
        if part not in names:
            raise SetupError(f"{key} is not an option of {prog}: check its spelling; the options are "
                             f"{', '.join(option_keys(schema))} ({prog} --help says what each does).")
        node = _unwrap(hints[part])
    return node


def _unwrap(kind: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else Any
    return kind


def _fields(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, Any, dict[str, Any]]]:
    """(dotted key, type, default, metadata) of every leaf option, nested dataclasses flattened."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            default = MISSING
        yield f"{prefix}{f.name}", kind, default, dict(f.metadata)


def _leaf(schema: type, key: str) -> tuple[str, bool]:
    """(what ``--help`` shows for the value of option ``key``, whether it is required)."""
    kind, default, meta = next((kind, default, meta) for name, kind, default, meta in _fields(schema) if name == key)
    return _placeholder(kind, meta.get("metavar", "")), default == MISSING


def option_keys(schema: type) -> list[str]:
    """Every key the command accepts, dotted, in declaration order."""
    return [key for key, *_ in _fields(schema)]


def _placeholder(kind: Any, metavar: str = "") -> str:
    if metavar:
        return metavar
    if typing.get_origin(kind) is list:
        return f"{_placeholder(typing.get_args(kind)[0])}[,...]"
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "|".join(str(member.value) for member in kind)
    return {int: "INT", float: "NUMBER", bool: "true|false", str: "TEXT", Path: "PATH"}.get(kind, "VALUE")


def _shown_default(value: Any) -> str:
    if value == MISSING:
        return "required"
    if isinstance(value, list | tuple):
        return "default: " + (",".join(str(v) for v in value) or "empty")
    return f"default: {shown(value.value if isinstance(value, Enum) else value)}"


def usage(schema: type, prog: str, summary: str) -> str:
    """The ``--help`` text: usage line, summary, then one line per option (value, default, what it is for)."""
    positional: str | None = getattr(schema, "POSITIONAL", None)
    aliases: dict[str, str] = getattr(schema, "ALIASES", {})
    rows, head = [], []
    for key, kind, default, meta in _fields(schema):
        value = _placeholder(kind, meta.get("metavar", ""))
        left = f"{value} (or {key}={value})" if key == positional else f"{key}={value}"
        if default == MISSING:
            head.append(value if key == positional else left)
        rows.append((left, f"{meta.get('doc', '')} ({_shown_default(default)})".strip()))
    width = max(len(left) for left, _ in rows)
    lines = [f"usage: {prog} {' '.join([*head, '[key=value ...]'])}", "", summary, "",
             "options (key=value words; a leading + or ++, as in Hydra overrides, is accepted):"]
    lines += [f"  {left:<{width}}  {doc}" for left, doc in rows]
    lines += [f"  {short}=X is short for {key}=X" for short, key in aliases.items()]
    return "\n".join(lines)
