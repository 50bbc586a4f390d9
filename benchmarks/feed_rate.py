"""Full fine-tuning fed from a JPEG folder against the same steps fed synthetic tensors already on the device,
and the naive fp32 loop against bf16 + channels_last (+ torch.compile): issue 18, part 3 (b) and (c).

    python benchmarks/feed_rate.py [--backbone resnet50] [--image-size 224] [--batch-size 32] [--per-class 200]
                                   [--decodes torchvision,device] [--compile] [--device cuda]

In one process, side by side:

* synthetic loops, the same FinetuneModule (weights=none: speed does not depend on the values), AdamW and
  cross-entropy on one batch of random tensors already on the device, timed after warm-up steps:
  ``fp32`` (NCHW, float32: the naive loop), ``fast`` (the runs' precision, channels_last) and, with
  ``--compile``, ``fast+compile`` (the same through torch.compile);
* finetune's own runs (``train()``: strategy=full_finetune, data.augment=true, data.num_workers=auto, the
  runs' precision, speed.channels_last=auto) from a folder of photo-like JPEGs (CIFAR-10 photos upscaled to
  --stored-size, quality 90), once per ``data.decode``. Timed: the training batches alone (first batch start
  to last batch end of each epoch after the first, which warms up workers and cuDNN).

Ratios: each JPEG-fed run / ``fast`` (target >= 0.8 on a GPU), ``fast`` and ``fast+compile`` / ``fp32``
(target >= 2x on a GPU). On a CPU the numbers say how the script runs, not what a GPU does.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import cache_speedup
import harness
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

FEED_TARGET, SPEED_TARGET = 0.8, 2.0


class EpochClock(pl.Callback):
    """Per epoch: seconds from the first training batch's start to the last one's end, and the batches run."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, int]] = []
        self._first: float | None = None
        self._last, self._batches = 0.0, 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._first is None:
            self._first, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._last, self._batches = time.perf_counter(), self._batches + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first is not None:
            self.epochs.append((self._last - self._first, self._batches))
        self._first = None


def from_jpegs(cfg: Any, batch_size: int) -> dict[str, Any]:
    """finetune's run as train() builds it, plus the clock; images/s of the epochs after the first."""
    import finetune.run.train as train_module

    clock = EpochClock()
    build_callbacks = train_module.build_callbacks
    train_module.build_callbacks = lambda *a, **k: [*build_callbacks(*a, **k), clock]
    try:
        summary = train_module.train(cfg)
    finally:
        train_module.build_callbacks = build_callbacks
    timed = clock.epochs[1:] or clock.epochs
    seconds, batches = sum(s for s, _ in timed), sum(b for _, b in timed)
    return {"images_s": batches * batch_size / seconds, "seconds": seconds, "batches": batches,
            "test_acc": summary["test"]["acc"], "workers": summary.get("num_workers")}


def synthetic(module: torch.nn.Module, args: argparse.Namespace, device: torch.device, classes: int,
              bf16: bool, channels_last: bool, compiled: bool, steps: int) -> dict[str, Any]:
    """``steps`` training steps on one device-resident batch, after ``--warmup`` steps (compilation included)."""
    torch.manual_seed(0)
    model = copy.deepcopy(module).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as finetune's auto (CUDA and CPU)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    harness.sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    harness.sync(device)
    seconds = time.perf_counter() - started
    return {"images_s": steps * args.batch_size / seconds, "seconds": seconds, "batches": steps}


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=224)
    parser.set_defaults(backbone="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=200, help="train photos per class (10%% go to val)")
    parser.add_argument("--stored-size", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=3, help="finetune runs: the first is warm-up")
    parser.add_argument("--warmup", type=int, default=10, help="synthetic loops: untimed steps first")
    parser.add_argument("--decodes", default="torchvision,device", help="data.decode values to feed from")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time the fast loop through torch.compile")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.image_size, args.batch_size, args.per_class = "resnet18", 32, 8, 4
        args.stored_size, args.epochs, args.warmup = 64, 2, 2
    device = harness.resolve_device(parser, args)
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    return args, device


def main() -> None:
    args, device = parse_args()
    machine = harness.start(device)
    from finetune.config.typed import to_typed
    from finetune.data.datasets import Splits
    from finetune.run.builders import build_module

    work = Path(tempfile.mkdtemp(prefix="feed_rate-"))
    try:
        images = harness.load_images(args.data, args.per_class, 4 if args.quick else None)
        sizes = cache_speedup.write_image_tree(images, work / "images", stored_size=args.stored_size,
                                               stored_format="jpeg")
        base = [f"backbone={args.backbone}", "backbone.weights=none", "strategy=full_finetune", "data=folder",
                f"data.root={work / 'images'}", f"data.image_size={args.image_size}", "data.augment=true",
                f"data.batch_size={args.batch_size}", "data.check=false", f"trainer.max_epochs={args.epochs}",
                f"trainer.precision={args.precision}", "trainer.devices=1", "logger=none",
                f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
        steps = sizes["train"] // args.batch_size
        print(f"data: {images.source} as {args.stored_size} px JPEGs, train/val/test = {sizes['train']}/"
              f"{sizes['val']}/{sizes['test']}; {args.backbone} full_finetune at {args.image_size} px, batch "
              f"{args.batch_size}, {args.precision}; {steps} steps an epoch\n", flush=True)
        module = build_module(to_typed(cache_speedup.compose(base, work, "module")),
                              Splits([], [], [], images.classes))
        bf16 = args.precision.startswith("bf16")
        print(f"fp32 here: PyTorch's defaults (cuDNN convolutions in TF32: {torch.backends.cudnn.allow_tf32}, "
              f"matmuls at {torch.get_float32_matmul_precision()!r} precision), as a naive loop gets them")
        loops = {"fp32": (False, False, False), "fast": (bf16, True, False)}
        if args.compile:
            loops["fast+compile"] = (bf16, True, True)
        runs: dict[str, dict[str, Any]] = {}
        for name, (half, last, compiled) in loops.items():
            try:
                runs[name] = synthetic(module, args, device, len(images.classes), half, last, compiled, steps)
            except Exception as error:  # torch.compile needs a compiler toolchain: say so, measure the rest
                print(f"{name}: not measured ({type(error).__name__}: {str(error)[:200]})")
                continue
            print(f"synthetic {name:<13} {runs[name]['images_s']:9,.0f} images/s", flush=True)
        for decode in args.decodes.split(","):
            name = f"jpeg decode={decode}"
            runs[name] = from_jpegs(cache_speedup.compose([*base, f"data.decode={decode}"], work, decode),
                                    args.batch_size)
            print(f"finetune {name:<22} {runs[name]['images_s']:9,.0f} images/s (test acc "
                  f"{runs[name]['test_acc']:.2%})", flush=True)
        report(runs, args, machine, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any],
           device: torch.device) -> None:
    fast = runs["fast"]["images_s"]
    print(f"\n| run | images/s | vs synthetic fast ({args.precision}, channels_last) |\n|---|---:|---:|")
    for name, run in runs.items():
        print(f"| {name} | {run['images_s']:,.0f} | {run['images_s'] / fast:.2f} |")
    on_gpu = device.type == "cuda"
    ratios = {}
    for name, run in runs.items():
        if name.startswith("jpeg"):
            ratios[f"{name} / synthetic"] = run["images_s"] / fast
            print(f"ratio {name} / synthetic: {ratios[f'{name} / synthetic']:.2f} (target >= {FEED_TARGET} on a "
                  f"GPU{': ' + harness.verdict(ratios[f'{name} / synthetic'] >= FEED_TARGET) if on_gpu else ''})")
    for name in ("fast", "fast+compile"):
        if name in runs:
            ratio = ratios[f"{name} / fp32"] = runs[name]["images_s"] / runs["fp32"]["images_s"]
            print(f"ratio {name} / fp32: {ratio:.2f}x (target >= {SPEED_TARGET}x on a GPU"
                  f"{': ' + harness.verdict(ratio >= SPEED_TARGET) if on_gpu else ''})")
    harness.write_json(args.json, {"machine": machine, "ratios": ratios,
                                   "runs": runs, "precision": args.precision, "backbone": args.backbone,
                                   "image_size": args.image_size, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
