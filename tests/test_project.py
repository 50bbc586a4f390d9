"""The project's promises about itself: CI runs the README's test command; the config ships in the wheel."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = _readme_block("Test")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_ci_uses_the_readme_setup_command() -> None:
    setup = _readme_block("Set-up")
    assert setup.startswith("pip install -e")
    assert setup in (ROOT / ".ci" / "run").read_text()


def test_every_config_group_file_is_packaged() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"]["finetune.conf"] == "conf"
    patterns = setuptools["package-data"]["finetune.conf"]
    assert "**/*.yaml" in patterns
    assert {p.parent.name for p in (ROOT / "conf").rglob("*.yaml")} >= {"backbone", "strategy", "data", "trainer"}


def test_every_subpackage_is_in_the_wheel() -> None:
    """A subpackage missing from pyproject's list is missing from the Docker image's non-editable install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "finetune").rglob("__init__.py")}
    assert found <= listed, f"not packaged: {sorted(found - listed)}"
