"""finetune: transfer learning from ImageNet backbones (VGG, ResNet, any torchvision classifier), Hydra + Lightning."""

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> Path:
    """The Hydra config folder: inside the installed package, or conf/ beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"finetune's conf/ folder is missing next to {here}; reinstall the package.")
