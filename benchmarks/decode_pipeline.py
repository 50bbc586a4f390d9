"""JPEG decode + eval transform for full fine-tuning, side by side: PIL, PIL with draft mode (libjpeg's
DCT-domain reduction), torchvision.io.decode_jpeg on the CPU (the default), and data.decode=device (batched
decode_jpeg on the training device, nvjpeg on CUDA, with the resize, crop and normalise there as tensors).

    python benchmarks/decode_pipeline.py [--images 300] [--stored-size 384] [--sizes 224,112,64] [--repeats 3]
                                         [--device cpu|cuda] [--batch-size 64]

Photo-like files: real CIFAR-10 photos (digits without ../shared) upscaled to the stored size (bicubic) and
saved as JPEG quality 90, like camera photos. For each target size, each path decodes every file and applies
finetune's eval transform at that size (shorter side to size x 232/224, centre crop, normalise), in one process
on one thread, as one DataLoader worker does. Printed: images/s (best of --repeats), the ratio to PIL in the
same run, and how far each path's tensor is from PIL's, in 8-bit levels (max and mean over all pixels).
The device path is split in two: what a DataLoader worker still does per image (read the file, check its
header, collate), and what the device does per batch of --batch-size (pin, batched decode, resize and crop,
normalise; timed to the last kernel). Its images/s is the two in series on one core; with W workers the
feed rate is min(W x worker part, device part). On a CPU the device is this core, so its row measures the
batched path itself, not nvjpeg.
``--accuracy WEIGHTS`` adds the linear probe on real SqueezeNet weights per decode (test accuracy side by side).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np
import torch
from PIL import Image

from finetune.data.datasets import ImageFileDataset
from finetune.data.device_decode import EncodedImages
from finetune.data.images import image_loader
from finetune.data.transforms import eval_transform
from finetune.model.backbones import preprocessing_for


def write_jpegs(count: int, stored_size: int, folder: Path, data: Path | None = None) -> list[Path]:
    images = harness.load_images(data)
    paths = []
    for i, pixels in enumerate(images.x_train[:count]):
        image = Image.fromarray(pixels).convert("RGB").resize((stored_size, stored_size), Image.Resampling.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


DECODES = {"pil": "PIL", "pil_draft": "PIL draft", "torchvision": "torchvision.io.decode_jpeg (CPU, default)",
           "device": "data.decode=device"}


def decoders(side: int) -> dict[str, Callable[[Path], object]]:
    """What ``data.decode`` gives the datasets: the same loaders, header checks and fallbacks included."""
    return {label: image_loader(decode, side) for decode, label in DECODES.items() if decode != "device"}


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


def per_file(paths: list[Path], decode: Callable[[Path], object], transform: Any) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    tensors = [transform(decode(p)) for p in paths]
    return torch.stack(tensors), {"seconds": time.perf_counter() - start}


def on_device(paths: list[Path], prep: Any, device: torch.device, batch_size: int) -> tuple[torch.Tensor, dict]:
    """data.decode=device as a run does it: the worker part per image, then each batch's ``.to(device)``."""
    dataset = EncodedImages(ImageFileDataset([(p, 0) for p in paths], image_loader("device", prep.resize_size)),
                            eval_transform(prep))
    worker = device_s = 0.0
    out = []
    for first in range(0, len(paths), batch_size):
        start = time.perf_counter()
        batch = dataset.collate([dataset[i] for i in range(first, min(len(paths), first + batch_size))])
        middle = time.perf_counter()
        if device.type == "cuda":
            batch = batch.pin_memory()  # the DataLoader's pin thread does this in a run
        x, _ = batch.to(device, non_blocking=True)
        harness.sync(device)
        worker, device_s = worker + middle - start, device_s + time.perf_counter() - middle
        out.append(x.cpu())
    return torch.cat(out), {"seconds": worker + device_s, "worker_s": worker, "device_s": device_s}


def measure(paths: list[Path], size: int, repeats: int, device: torch.device, batch_size: int) -> list[dict]:
    prep = preprocessing_for("resnet50").at_size(size)
    transform = eval_transform(prep)
    runs: dict[str, Callable[[], tuple[torch.Tensor, dict]]] = {
        name: (lambda decode=decode: per_file(paths, decode, transform))
        for name, decode in decoders(prep.resize_size).items()}
    runs[DECODES["device"] + f" ({device.type})"] = lambda: on_device(paths, prep, device, batch_size)
    on_device(paths[:batch_size], prep, device, batch_size)  # CUDA context, nvjpeg handles, kernels: not timed
    rows, reference = [], None
    for name, run in runs.items():
        best: dict = {"seconds": float("inf")}
        for _ in range(repeats):
            stacked, times = run()
            best = times if times["seconds"] < best["seconds"] else best
        # back to 8-bit levels: normalised values x std x 255
        levels = stacked * torch.tensor(prep.std).view(1, 3, 1, 1) * 255
        if reference is None:
            reference = levels
        diff = (levels - reference).abs()
        row = {"size": size, "resize": prep.resize_size, "path": name, "images_s": len(paths) / best["seconds"],
               "max_levels": float(diff.max()), "mean_levels": float(diff.mean())}
        if "worker_s" in best:
            row["worker_images_s"] = len(paths) / best["worker_s"]
            row["device_images_s"] = len(paths) / best["device_s"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--data", type=Path, default=None, help="the CIFAR-10 subset .npz (default: ../shared/data)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--stored-size", type=int, default=384)
    parser.add_argument("--sizes", default="224,112,64", help="target image sizes (crop), comma list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="images per batched decode (device path)")
    parser.add_argument("--accuracy", type=Path, default=None, metavar="WEIGHTS",
                        help="also run the linear probe per decode with these SqueezeNet 1.1 weights "
                             "(e.g. ../shared/data/squeezenet1_1-imagenet.pth)")
    parser.add_argument("--accuracy-size", type=int, default=96)
    parser.add_argument("--max-train", type=int, default=2000)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1  # one DataLoader worker's view
    if args.quick:
        args.images, args.stored_size, args.sizes, args.repeats, args.batch_size = 24, 96, "32", 1, 8
    device = harness.resolve_device(parser, args)
    machine = harness.start(device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(args.images, args.stored_size, Path(tmp), args.data)
        print(f"data: {len(paths)} JPEGs (quality 90) at {args.stored_size} px; one process, "
              f"{torch.get_num_threads()} thread(s); device path in batches of {args.batch_size} on {device}")
        print("| image size (resize) | path | images/s | vs PIL | max diff (levels) | mean diff (levels) |")
        print("|---|---|---:|---:|---:|---:|")
        for size in [int(s) for s in args.sizes.split(",")]:
            rows = measure(paths, size, args.repeats, device, args.batch_size)
            pil = rows[0]["images_s"]
            for row in rows:
                row["vs_pil"] = row["images_s"] / pil
                print(f"| {row['size']} ({row['resize']}) | {row['path']} | {row['images_s']:,.0f} | "
                      f"{row['vs_pil']:.2f}x | {row['max_levels']:.1f} | {row['mean_levels']:.2f} |")
            results.extend(rows)
    print(f"draft applies where the stored shorter side is >= 2x the resize side ({args.stored_size} px: "
          f"resize <= {args.stored_size // 2})")
    for row in results:
        if "worker_images_s" in row:
            print(f"device path at {row['size']} px: worker part {row['worker_images_s']:,.0f} images/s per core, "
                  f"device part {row['device_images_s']:,.0f} images/s ({device.type})")
    ratios = {f"{r['path']} / PIL at {r['size']}": r["vs_pil"] for r in results if r["path"] != DECODES["pil"]}
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")
    harness.write_json(args.json, {"machine": machine, "results": results, "ratios": ratios})
    if args.accuracy:
        accuracy(args.stored_size, args.accuracy_size, args.accuracy.resolve(), args.max_train)


if __name__ == "__main__":
    main()
