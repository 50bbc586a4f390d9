"""Checkpoint sizes per backbone and strategy: the best checkpoint (weights only) against last.ckpt (resume).

    python benchmarks/checkpoint_sizes.py [--backbones resnet18,resnet50,vgg16] [--strategies ...]

Each pair trains one epoch (AdamW, 32 px, 24 tiny images, 3 classes) from a weights file the script
writes once per backbone (as ImageNet weights would be: a source the checkpoint can reference, so with
``checkpoint_frozen_stages=auto`` frozen stages are not stored). Prints one row per pair: the sizes of
best-epoch00.ckpt and last.ckpt in MB and their ratio. Sizes do not depend on the image size or the data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from finetune import config_dir
from finetune.run.train import train

STRATEGIES = ("feature_extractor", "partial_unfreeze", "full_finetune")


def write_images(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def sizes(backbone: str, strategy: str, weights: Path, images: Path, work: Path) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"backbone={backbone}", f"backbone.weights={weights}", f"strategy={strategy}", "data=folder",
            f"data.root={images}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
            "data.augment=false", "trainer.max_epochs=1", "logger=none", "callbacks.progress_bar=none",
            "trainer.accelerator=cpu", "trainer.devices=1"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / f"{backbone}-{strategy}")
        cfg.paths.cache_dir = str(work / "cache")
    summary = train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    best = Path(summary["best_checkpoint"]).stat().st_size / 2**20
    last = (folder / "last.ckpt").stat().st_size / 2**20
    shutil.rmtree(cfg.paths.output_dir)
    return {"best_mb": best, "last_mb": last, "params_trainable": summary.get("params_trainable")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18,resnet50,vgg16")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    harness.print_machine(harness.describe(torch.device("cpu")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = write_images(work / "images")
        print(f"{'backbone':<10} {'strategy':<18} {'best MB':>9} {'last MB':>9} {'last/best':>9}")
        for backbone in args.backbones.split(","):
            weights = work / f"{backbone}.pth"
            torch.save(torchvision.models.get_model(backbone, weights=None).state_dict(), weights)
            for strategy in args.strategies.split(","):
                row = {"backbone": backbone, "strategy": strategy, **sizes(backbone, strategy, weights, images, work)}
                rows.append(row)
                print(f"{backbone:<10} {strategy:<18} {row['best_mb']:>9.2f} {row['last_mb']:>9.2f} "
                      f"{row['last_mb'] / row['best_mb']:>8.2f}x", flush=True)
            weights.unlink()
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
