"""The import layers follow DESIGN.md's data flow: a lower layer never imports an upper one.

atomic, errors, progress / finetune's root < config < model < data < run < cli < entry points (``__main__``, the
``python -m finetune.X`` shims). Every import is counted, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import finetune

PACKAGE = Path(finetune.__file__).parent
LAYERS = ["base", "config", "model", "data", "run", "cli", "entry"]


def layer_of(module: str) -> str:
    """finetune.config.schema -> config; finetune.errors -> base; finetune.__main__ / shims -> entry."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("atomic", "errors", "progress"):
        return "base"
    if parts[1] in LAYERS:
        return parts[1]
    return "entry"


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            names = [node.module] if node.module != "finetune" else [f"finetune.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("finetune"))
    return found


def test_no_lower_layer_imports_an_upper_one() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("finetune", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        own = LAYERS.index(layer_of(module))
        for target in imports_of(path):
            if target == "finetune.config_dir" or target == "finetune":
                continue
            if LAYERS.index(layer_of(target)) > own:
                wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_contract_sees_a_violation() -> None:
    source = PACKAGE / "model" / "backbones.py"
    assert layer_of("finetune.model.backbones") == "model"
    assert "finetune.errors" in imports_of(source)
    assert LAYERS.index(layer_of("finetune.run.train")) > LAYERS.index(layer_of("finetune.model.module"))
