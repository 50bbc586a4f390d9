"""conf/backbone/<name>.yaml for every torchvision classification model: ``python -m finetune.model.backbone_configs``.

The files are data derived from ``BACKBONE_NAMES`` (torchvision's own list), so they are generated, not
written by hand: after a torchvision upgrade adds models, run this once (tests/test_families.py checks the
folder matches).
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune import config_dir
from finetune.model.backbones import BACKBONE_NAMES

TIMM_CONFIG = "timm"  # conf/backbone/timm.yaml: any timm model, written by hand


def config_text(name: str) -> str:
    """The one shape every backbone option has: the name, ImageNet weights by default."""
    return (
        f"# torchvision {name} cut into its stages (see finetune/model/backbones.py).\n"
        f"name: {name}\n"
        "# imagenet: torchvision's best ImageNet weights (torch hub cache or download)\n"
        "# none: random init; or a path to a state_dict / checkpoint file\n"
        "weights: imagenet\n"
    )


def write_configs(folder: Path) -> list[Path]:
    """Write every backbone's file into ``folder``; return the files whose content changed."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in BACKBONE_NAMES:
        path = folder / f"{name}.yaml"
        text = config_text(name)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def main() -> int:
    folder = config_dir() / "backbone"
    changed = write_configs(folder)
    stale = sorted(p.name for p in folder.glob("*.yaml") if p.stem not in (*BACKBONE_NAMES, TIMM_CONFIG))
    print(f"{len(BACKBONE_NAMES)} backbone configs in {folder}: {len(changed)} written.")
    if stale:
        print(f"Not a torchvision model (left as they are; remove them if unused): {', '.join(stale)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
