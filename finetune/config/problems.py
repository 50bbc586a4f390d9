"""Config mistakes as one paragraph: the key, the value given, what is wrong and what is allowed.

Our own checks raise :class:`ConfigProblem`; :func:`explain` rewords what OmegaConf and Hydra raise
(a wrong type, an unknown key or choice, a missing value, an unknown group option) the same way.
"""

from __future__ import annotations

import re
from typing import Any

from finetune.errors import SetupError


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class ConfigProblem(SetupError):
    """A config value finetune refuses; exit code 2 like every SetupError."""

    def __init__(self, key: str, value: Any, problem: str, hint: str = "") -> None:
        self.key, self.value = key, value
        tail = f"; {hint}" if hint else "."
        super().__init__(f"{key}={shown(value)} {problem}{tail}")


HELP = "python -m finetune --help lists the groups and their options"


def explain(error: BaseException) -> SetupError:
    """A SetupError saying, in one paragraph, what an OmegaConf/Hydra composition error means."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

    cause = error
    while not isinstance(cause, OmegaConfBaseException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = str(getattr(cause, "full_key", "") or getattr(cause, "key", "") or "")
        first = str(getattr(cause, "msg", "") or str(cause)).splitlines()[0]
        if isinstance(cause, MissingMandatoryValue):
            return SetupError(f"{key} has no value and needs one: add {key}=... to the command line.")
        if isinstance(cause, ConfigKeyError) or "not in struct" in first or re.match(r"Key '.*' not in", first):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            where = f"'{parent}'" if parent else "the top level of the config"
            return SetupError(f"{key or first} is not a key finetune knows ({where} has no such key; a typo, or a "
                              f"key of another option?): check its spelling; {HELP}, and "
                              f"python -m finetune --cfg job prints every key with its value.")
        if isinstance(cause, ValidationError):
            value = getattr(cause, "value", None)
            found = re.search(r"expected one of \[(.*)\]", first)
            if found:
                return SetupError(f"{key}={shown(value)} is not one of the allowed choices: {found.group(1)}.")
            kind = re.search(r"converted to (\w+)", first)
            if not kind and ("ListConfig" in first or "list or tuple" in first):
                return SetupError(f"{key}={shown(value)} has the wrong type: it must be a list, e.g. {key}=[2,4,6].")
            if "Incompatible value 'None'" in first:
                return SetupError(f"{key}=null is not allowed: {key} needs a value.")
            wanted = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false",
                      "String": "a string"}.get(kind.group(1), kind.group(1)) if kind else "another type"
            return SetupError(f"{key}={shown(value)} has the wrong type: it must be {wanted}.")
        return SetupError(f"{key}: {first}.")
    return _hydra(error)


def _hydra(error: BaseException) -> SetupError:
    """Hydra's own refusals (an unknown group option, a bad override), kept to their first paragraph."""
    text = str(error).strip()
    option = re.search(r"Could not find '([^']+)'", text)
    if option:
        group, _, name = option.group(1).rpartition("/")
        choices = re.findall(r"^\t(\S+)$", text, flags=re.M)
        listed = f": choose one of {', '.join(choices)}" if choices else ""
        where = f"{group}={name}" if group else name
        return SetupError(f"{where} is not an option of the config group '{group}'{listed} ({HELP}).")
    head = " ".join(line.strip() for line in text.split("\n\n")[0].splitlines() if line.strip())
    return SetupError(f"{head} ({HELP}).")
