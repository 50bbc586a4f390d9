"""JPEG decode + eval transform for full fine-tuning, side by side: PIL (today), PIL with draft mode (libjpeg's
DCT-domain reduction), torchvision.io.decode_jpeg on the CPU.

    python benchmarks/decode_pipeline.py [--images 300] [--stored-size 384] [--sizes 224,112,64] [--repeats 3]

Photo-like files: real CIFAR-10 photos (digits without ../shared) upscaled to the stored size (bicubic) and
saved as JPEG quality 90, like camera photos. For each target size, each path decodes every file and applies
finetune's eval transform at that size (shorter side to size x 256/224, centre crop, normalise), in one process
on one thread, as one DataLoader worker does. Printed: images/s (best of --repeats), the ratio to PIL in the
same run, and how far each path's tensor is from PIL's, in 8-bit levels (max and mean over all pixels).
``--accuracy WEIGHTS`` adds the linear probe on real SqueezeNet weights per decode (test accuracy side by side).
The CUDA path (nvjpeg, batched, with the transform on the GPU) needs a GPU: not measured here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
import numpy as np
import torch
from PIL import Image

from finetune.data.images import image_loader
from finetune.data.transforms import eval_transform
from finetune.model.backbones import preprocessing_for


def write_jpegs(count: int, stored_size: int, folder: Path) -> list[Path]:
    images = harness.load_images()
    paths = []
    for i, pixels in enumerate(images.x_train[:count]):
        image = Image.fromarray(pixels).convert("RGB").resize((stored_size, stored_size), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


DECODES = {"pil": "PIL (default)", "pil_draft": "PIL draft", "torchvision": "torchvision.io.decode_jpeg (CPU)"}


def decoders(side: int) -> dict[str, Callable[[Path], object]]:
    """What ``data.decode`` gives the datasets: the same loaders, header checks and fallbacks included."""
    return {label: image_loader(decode, side) for decode, label in DECODES.items()}


def accuracy(stored_size: int, image_size: int, weights: Path, max_train: int) -> None:
    """The linear probe on real ImageNet SqueezeNet, CIFAR-10 photos stored as JPEGs: one run per decode."""
    import cache_speedup

    images = harness.load_images()
    keep = np.sort(np.concatenate([np.flatnonzero(images.y_train == c)[:max_train // len(images.classes)]
                                   for c in np.unique(images.y_train)]))
    images.x_train, images.y_train = images.x_train[keep], images.y_train[keep]
    print(f"accuracy: linear probe, squeezenet1_1 from {weights}, {image_size} px, data.center_crop=false, "
          f"{len(images.x_train)} train (10% val) / {len(images.x_test)} test CIFAR-10 photos"
          f" as {stored_size} px JPEGs")
    print("| decode | test top-1 | mean per-class | extraction s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache_speedup.write_image_tree(images, work / "images", stored_size=stored_size, stored_format="jpeg")
        for decode in DECODES:
            cfg = cache_speedup.compose(
                ["experiment=linear_probe", "backbone=squeezenet1_1", f"backbone.weights={weights}", "data=folder",
                 f"data.root={work / 'images'}", f"data.image_size={image_size}", "data.center_crop=false",
                 f"data.decode={decode}", "data.num_workers=0", "trainer.accelerator=cpu", "trainer.devices=1",
                 "logger=none", "data.check=false"], work, decode)
            from finetune.run.train import train

            summary = train(cfg)
            print(f"| {decode} | {summary['test']['acc']:.2%} | {summary['test']['mean_class_acc']:.2%} | "
                  f"{summary['wall_seconds']['feature_extraction']:.1f} |")


def measure(paths: list[Path], size: int, repeats: int) -> list[dict]:
    prep = preprocessing_for("resnet50").at_size(size)
    transform = eval_transform(prep)
    rows, reference = [], None
    for name, decode in decoders(prep.resize_size).items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            tensors = [transform(decode(p)) for p in paths]
            best = min(best, time.perf_counter() - start)
        stacked = torch.stack(tensors)
        # back to 8-bit levels: normalised values x std x 255
        levels = stacked * torch.tensor(prep.std).view(1, 3, 1, 1) * 255
        if reference is None:
            reference = levels
        diff = (levels - reference).abs()
        rows.append({"size": size, "resize": prep.resize_size, "path": name, "images_s": len(paths) / best,
                     "max_levels": float(diff.max()), "mean_levels": float(diff.mean())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--stored-size", type=int, default=384)
    parser.add_argument("--sizes", default="224,112,64", help="target image sizes (crop), comma list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", type=Path, default=None, metavar="WEIGHTS",
                        help="also run the linear probe per decode with these SqueezeNet 1.1 weights "
                             "(e.g. ../shared/data/squeezenet1_1-imagenet.pth)")
    parser.add_argument("--accuracy-size", type=int, default=96)
    parser.add_argument("--max-train", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    harness.print_machine(harness.describe(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(args.images, args.stored_size, Path(tmp))
        print(f"data: {len(paths)} JPEGs (quality 90) at {args.stored_size} px; one process, one thread")
        print("| image size (resize) | path | images/s | vs PIL | max diff (levels) | mean diff (levels) |")
        print("|---|---|---:|---:|---:|---:|")
        for size in [int(s) for s in args.sizes.split(",")]:
            rows = measure(paths, size, args.repeats)
            pil = rows[0]["images_s"]
            for row in rows:
                print(f"| {row['size']} ({row['resize']}) | {row['path']} | {row['images_s']:,.0f} | "
                      f"{row['images_s'] / pil:.2f}x | {row['max_levels']:.1f} | {row['mean_levels']:.2f} |")
    print(f"draft applies where the stored shorter side is >= 2x the resize side ({args.stored_size} px: "
          f"resize <= {args.stored_size // 2})")
    if args.accuracy:
        accuracy(args.stored_size, args.accuracy_size, args.accuracy.resolve(), args.max_train)


if __name__ == "__main__":
    main()
