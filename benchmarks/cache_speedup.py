"""Feature cache speed-up, end to end: finetune with the cache, without it, and a plain PyTorch loop.

    python benchmarks/cache_speedup.py [--epochs 10] [--backbone resnet18] [--image-size 64] [--device cpu]

All three train a linear head on the same frozen backbone (one state_dict file, written once), over the
same ImageFolder tree of PNGs (the CIFAR-10 subset from ../shared/data, scikit-learn's digits without
it), with AdamW at the config's LR, weight decay and warmup-cosine schedule, the same batch size and
epochs, validation every epoch and the best-val head tested. Each is timed from its call to its test
accuracy: the cached run's feature extraction counts. Target: cached >= 5x faster than cache off, test
accuracy within 0.5 points.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from finetune import config_dir
from finetune.data.datamodule import EpochSampler, resolve_num_workers
from finetune.model.backbones import family, preprocessing_for
from finetune.model.module import warmup_cosine
from finetune.run.builders import apply_tf32

TARGET_SPEEDUP = 5.0
TARGET_ACC_POINTS = 0.5


def write_image_tree(images: harness.Images, root: Path, val_fraction: float = 0.1, seed: int = 0,
                     stored_size: int | None = None, stored_format: str = "png") -> dict[str, int]:
    """root/{train,val,test}/<class>/NNNNN.png; val is a stratified slice of the train split.

    ``stored_size`` / ``stored_format`` (png or jpeg) store the images upscaled, like camera photos, so
    that decoding costs what it costs on real data (a 32 px PNG decodes in microseconds).
    """
    rng = np.random.default_rng(seed)
    val = np.zeros(len(images.y_train), dtype=bool)
    for c in np.unique(images.y_train):
        members = rng.permutation(np.flatnonzero(images.y_train == c))
        val[members[:max(1, round(val_fraction * len(members)))]] = True
    parts = {"train": (images.x_train[~val], images.y_train[~val]), "val": (images.x_train[val], images.y_train[val]),
             "test": (images.x_test, images.y_test)}
    for split, (xs, ys) in parts.items():
        for name in images.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        suffix = "jpg" if stored_format == "jpeg" else "png"
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            image = Image.fromarray(x)
            if stored_size:
                image = image.resize((stored_size, stored_size), Image.Resampling.BICUBIC)
            image.save(root / split / images.classes[int(y)] / f"{i:05d}.{suffix}",
                       **({"quality": 90} if suffix == "jpg" else {}))
    return {split: len(ys) for split, (_, ys) in parts.items()}


def write_weights(backbone: str, weights: str, seed: int, path: Path) -> Path:
    """The frozen weights all three runs share: seeded random init, or torchvision's ImageNet weights."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights="DEFAULT" if weights == "imagenet" else None)
    torch.save(model.state_dict(), path)
    return path


def compose(overrides: list[str], work: Path, name: str) -> Any:
    """The real config, as ``python -m finetune`` composes it, with output and cache in ``work``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a kept --work-dir: this run starts anew
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / "runs" / name)
        cfg.paths.cache_dir = str(work / "cache")
        cfg.callbacks.progress_bar = "none"
        # callbacks.progress_bar=none alone still leaves Lightning's default (rich) bar on.
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False  # output only; costs no measurable time
    return cfg


def run_finetune(cfg: Any) -> dict[str, Any]:
    from finetune.run.train import train

    started = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - started
    seconds = summary["wall_seconds"]
    training_memory = summary.get("peak_memory_training") or {}
    checkpoints = Path(summary["run_dir"]) / "checkpoints"
    return {"wall_s": wall, "extract_s": seconds["feature_extraction"], "train_s": seconds["training"],
            "test_s": seconds["test"], "test_acc": summary["test"]["acc"], "epochs": summary["epochs_run"],
            "feature_cache": summary["feature_cache"], "best_val_acc": summary["best_val_metric"],
            "train_peak_cuda_bytes": training_memory.get("cuda_max_allocated_bytes"),
            "train_start_cuda_bytes": training_memory.get("cuda_allocated_at_start_bytes"),
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoints.glob("*.ckpt"))}


def head_alone_peak(width: int, classes: int, batch_size: int, steps: int, device: torch.device) -> int | None:
    """Peak CUDA allocation of training only a Linear head (AdamW) on batches of pooled features:
    the floor that feature_extractor training on cached features should reach."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    head = nn.Linear(width, classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(batch_size, width, device=device)
        y = torch.randint(classes, (batch_size,), device=device)
        loss = nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    harness.sync(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    del head, optimizer, x, y, loss
    return peak


def headless_backbone(name: str, weights_file: Path) -> tuple[nn.Module, int]:
    """torchvision's model with the ImageNet classifier replaced by the identity: pooled features out.

    The plain loop's own, independent cut: VGG and ResNet only (other families: finetune's stages).
    """
    if family(name) not in ("resnet", "vgg"):
        raise SystemExit(f"--backbone {name}: the plain reference loop cuts VGG and ResNet only")
    with torch.device("meta"):  # no random init: the global RNG is left for the head, as in finetune
        model = torchvision.models.get_model(name, weights=None)
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True), assign=True)
    if family(name) == "resnet":
        width = model.fc.in_features
        model.fc = nn.Identity()
    else:
        width = model.classifier[6].in_features
        model.classifier[6] = nn.Identity()
    return model, width


def run_plain(root: Path, weights_file: Path, cfg: Any, device: torch.device, workers: int) -> dict[str, Any]:
    """A hand-written loop: ImageFolder + DataLoader, frozen backbone in eval mode every epoch, Linear head."""
    started = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    prep = preprocessing_for(cfg.backbone.name).at_size(cfg.data.image_size)
    transform = v2.Compose([v2.Resize(prep.resize_size, antialias=True), v2.CenterCrop(prep.crop_size),
                            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])
    datasets = {split: torchvision.datasets.ImageFolder(str(root / split), transform=transform)
                for split in ("train", "val", "test")}
    # finetune's train order (drawn from seed and epoch, not the global RNG), so all three see the same batches
    order = EpochSampler(len(datasets["train"]), int(cfg.seed))
    loaders = {
        split: DataLoader(datasets[split], batch_size=int(cfg.data.batch_size),
                          sampler=order if split == "train" else None, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                          drop_last=split == "train")  # as finetune's train loader (a batch of 1 breaks BN)
        for split in ("train", "val", "test")
    }
    backbone, width = headless_backbone(cfg.backbone.name, weights_file)
    # channels_last, as finetune does (speed.channels_last=auto)
    backbone = backbone.eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last)
    head = nn.Linear(width, len(loaders["train"].dataset.classes)).to(device)
    optimizer = torch.optim.AdamW([
        {"params": [head.weight], "weight_decay": float(cfg.optimizer.weight_decay)},
        {"params": [head.bias], "weight_decay": 0.0},
    ], lr=float(cfg.optimizer.lr))
    epochs = int(cfg.trainer.max_epochs)
    per_epoch = len(loaders["train"])
    total = epochs * per_epoch
    warmup = round(float(cfg.scheduler.warmup_epochs) * per_epoch)
    min_ratio = float(cfg.scheduler.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
    criterion = nn.CrossEntropyLoss()

    def features(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return backbone(x)

    def accuracy(split: str) -> float:
        head.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in loaders[split]:
                correct += int((head(features(x)).argmax(1).cpu() == y).sum())
                seen += len(y)
        return correct / seen

    best_acc, best_head = -1.0, None
    for epoch in range(epochs):
        order.set_epoch(epoch)
        head.train()
        for x, y in loaders["train"]:
            loss = criterion(head(features(x)), y.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val_acc = accuracy("val")
        if val_acc > best_acc:  # like ModelCheckpoint(mode="max"): strictly better replaces
            best_acc, best_head = val_acc, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_head)
    test_acc = accuracy("test")
    return {"wall_s": time.perf_counter() - started, "test_acc": test_acc, "best_val_acc": best_acc, "epochs": epochs}


def measured(run: Any, *args: Any) -> dict[str, Any]:
    """A run's result plus the CPU seconds it used and the load right after it (wall time alone lies on a
    shared machine: other processes' work shows up in it, not in the CPU seconds)."""
    gc.collect()
    leftover = int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
    cpu = harness.cpu_seconds()
    result = run(*args)
    gc.collect()  # loader workers are reaped (and their CPU time counted) once their iterators are freed
    # printed at once, so a run cut short by a time limit still shows the variants it finished
    print(f"  done: {result['wall_s']:.1f} s wall, test acc {100 * result['test_acc']:.2f}%", flush=True)
    return {**result, "cpu_s": harness.cpu_seconds() - cpu, "load_average_after": harness.load_average(),
            "cuda_allocated_before_bytes": leftover}


def check_data_once(cfg: Any) -> None:
    """Run finetune's data check before any clock, as a user's first run would (its results are remembered
    by file size and mtime): otherwise whichever variant runs first pays for decoding every file once."""
    from finetune.config.typed import to_typed
    from finetune.run.builders import check_data

    started = time.perf_counter()
    check_data(to_typed(cfg))
    print(f"data check of every file, once before the timed runs: {time.perf_counter() - started:.1f} s\n")


def warm_up(name: str, weights_file: Path, size: int, batch_size: int, device: torch.device) -> None:
    """Pay one-time costs (CUDA context, cuDNN/oneDNN kernels for the batch shape) before any clock runs,
    so the first variant timed does not pay them for the others."""
    model, _ = headless_backbone(name, weights_file)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(torch.zeros(batch_size, 3, size, size, device=device))
    harness.sync(device)


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default: finetune's auto)")
    parser.add_argument("--weights", choices=("none", "imagenet"), default="none",
                        help="frozen weights: seeded random init (default, offline) or ImageNet (needs them cached)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--per-class", type=int, default=None, help="use only the first N train images per class")
    parser.add_argument("--stored-size", type=int, default=None, metavar="PX",
                        help="store the images upscaled to PX x PX (default: as they come, 32 px for CIFAR)")
    parser.add_argument("--stored-format", choices=("png", "jpeg"), default="png",
                        help="file format of the stored images (jpeg: like camera photos)")
    parser.add_argument("--tf32", choices=("auto", "true", "false"), default="auto",
                        help="speed.tf32 for the finetune runs, and the same setting for the plain loop")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the comparison, run the warm cached job once more under cProfile and print "
                             "its N most expensive functions by own time (and 2N by cumulative time)")
    parser.add_argument("--warm-variant", action="append", default=[], metavar="OVERRIDE",
                        help="also run the warm cached job with this override (e.g. optimizer.fused=false), "
                             "alternating with the default warm job, and print both (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the image tree, cache and runs go "
                        "(default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.epochs, args.batch_size, args.per_class = 32, 2, 16, 8
    return args, harness.resolve_device(parser, args)


def main() -> None:
    args, device = parse_args()
    machine = harness.start(device)

    work = Path(tempfile.mkdtemp(prefix="cache_speedup-")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = harness.load_images(args.data, args.per_class, 4 if args.quick else None)
        sizes = write_image_tree(images, work / "images", stored_size=args.stored_size,
                                 stored_format=args.stored_format)
        weights_file = write_weights(args.backbone, args.weights, args.seed, work / f"{args.backbone}.pth")
        workers = resolve_num_workers("auto") if args.num_workers is None else args.num_workers
        stored = f"{args.stored_format.upper()} files" + (f" at {args.stored_size} px" if args.stored_size else "")
        print(f"data: {images.source}; {stored}, train/val/test = {sizes['train']}/{sizes['val']}/{sizes['test']}")
        print(f"run: {args.backbone} (weights={args.weights}, frozen), feature_extractor, {args.image_size} px, "
              f"batch {args.batch_size}, {args.epochs} epochs, AdamW, {workers} loader worker(s), "
              f"speed.tf32={args.tf32}\n")

        overrides = [f"backbone={args.backbone}", f"backbone.weights={weights_file}", "strategy=feature_extractor",
                     "data=folder", f"data.root={work / 'images'}", f"data.image_size={args.image_size}",
                     f"data.batch_size={args.batch_size}", f"data.num_workers={workers}",
                     f"trainer.max_epochs={args.epochs}", "trainer.devices=1",
                     f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "logger=none",
                     f"seed={args.seed}", f"speed.tf32={args.tf32}"]
        # the plain loop and the warm-up run under the same setting
        apply_tf32({"auto": "auto", "true": True, "false": False}[args.tf32])
        warm_up(args.backbone, weights_file, args.image_size, args.batch_size, device)
        check_data_once(compose(overrides, work, "data_check"))
        runs: dict[str, dict[str, Any]] = {}
        print("running finetune with the feature cache (cold: extraction included) ...", flush=True)
        runs["cached"] = measured(run_finetune, compose(overrides, work, "cached"))
        print("running finetune with cache.enabled=false ...", flush=True)
        runs["cache_off"] = measured(run_finetune, compose([*overrides, "cache.enabled=false"], work, "cache_off"))
        print("running the plain PyTorch loop ...", flush=True)
        runs["plain"] = measured(run_plain, work / "images", weights_file, compose(overrides, work, "plain"), device,
                                 workers)
        print("running finetune with the feature cache again (warm: a second run or sweep job) ...\n", flush=True)
        runs["cached_warm"] = measured(run_finetune, compose(overrides, work, "cached_warm"))
        _, width = headless_backbone(args.backbone, weights_file)
        head_peak = head_alone_peak(width, len(images.classes), args.batch_size, 20, device)
        report(runs, args, machine, images.source, sizes, workers, head_peak)
        if args.warm_variant:
            warm_variants(overrides, work, args.warm_variant)
        if args.profile:
            profile(compose(overrides, work, "profiled"), args.profile)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any], source: str,
           sizes: dict[str, int], workers: int, head_peak: int | None) -> None:
    labels = {"cached": "finetune, cache (cold)", "cache_off": "finetune, cache.enabled=false",
              "plain": "plain PyTorch loop", "cached_warm": "finetune, cache (warm)"}
    print(f"{'variant':<32}{'wall s':>9}{'extract s':>11}{'train s':>9}{'test s':>8}{'CPU s':>9}{'test acc %':>12}"
          f"{'load after':>18}")
    for key, label in labels.items():
        r = runs[key]
        cols = [f"{r[k]:>{w}.1f}" if k in r else f"{'-':>{w}}" for k, w in
                (("extract_s", 11), ("train_s", 9), ("test_s", 8), ("cpu_s", 9))]
        load = "/".join(f"{x:.1f}" for x in r["load_average_after"] or [])
        print(f"{label:<32}{r['wall_s']:>9.1f}{''.join(cols)}{100 * r['test_acc']:>12.2f}{load:>18}")
    print()
    cached = runs["cached"]["wall_s"]
    ratios = {
        "cache_off/cached": runs["cache_off"]["wall_s"] / cached,
        "plain/cached": runs["plain"]["wall_s"] / cached,
        "cache_off/plain": runs["cache_off"]["wall_s"] / runs["plain"]["wall_s"],
        "cache_off/cached_warm": runs["cache_off"]["wall_s"] / runs["cached_warm"]["wall_s"],
        "cpu_s cache_off/cached": runs["cache_off"]["cpu_s"] / runs["cached"]["cpu_s"],
        "cpu_s plain/cached": runs["plain"]["cpu_s"] / runs["cached"]["cpu_s"],
    }
    print_memory(runs, labels, head_peak)
    acc_diff = 100 * (runs["cached"]["test_acc"] - runs["cache_off"]["test_acc"])
    plain_diff = 100 * (runs["cached"]["test_acc"] - runs["plain"]["test_acc"])
    speed_met = ratios["cache_off/cached"] >= TARGET_SPEEDUP
    acc_met = abs(acc_diff) <= TARGET_ACC_POINTS
    print(f"ratio cache-off/cached (end to end): {ratios['cache_off/cached']:.2f}x "
          f"(target >= {TARGET_SPEEDUP:g}x: {harness.verdict(speed_met)})")
    print(f"ratio plain/cached (end to end): {ratios['plain/cached']:.2f}x")
    print(f"ratio cache-off/plain (finetune's cost over a plain loop, no cache): {ratios['cache_off/plain']:.2f}x")
    print(f"ratio cache-off/cached-warm (cache reused): {ratios['cache_off/cached_warm']:.2f}x")
    print(f"ratio of CPU seconds cache-off/cached: {runs['cache_off']['cpu_s'] / runs['cached']['cpu_s']:.2f}x, "
          f"plain/cached: {runs['plain']['cpu_s'] / runs['cached']['cpu_s']:.2f}x (less sensitive to other load)")
    print(f"test accuracy cached - cache-off: {acc_diff:+.2f} points "
          f"(target within {TARGET_ACC_POINTS:g}: {harness.verdict(acc_met)}); cached - plain: {plain_diff:+.2f}")
    harness.write_json(args.json, {
        "benchmark": "cache_speedup", "machine": machine,
        "settings": {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
                     "tf32": args.tf32, "stored_size": args.stored_size, "stored_format": args.stored_format,
                     "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": workers,
                     "seed": args.seed, "data": source, "split_sizes": sizes, "quick": args.quick},
        "runs": runs, "ratios": ratios, "head_alone_train_peak_cuda_bytes": head_peak,
        "test_acc_diff_points": {"cached-cache_off": acc_diff, "cached-plain": plain_diff},
        "targets": {"cache_off/cached >= 5": speed_met, "|acc diff| <= 0.5 points": acc_met},
    })


def warm_variants(overrides: list[str], work: Path, variants: list[str], rounds: int = 2) -> None:
    """Warm cached runs with and without each override, alternated, so a per-step change is seen in wall time."""
    print("\nwarm cached runs, alternated (train s = fit incl. validation; wall s = the whole train() call):")
    for variant in variants:
        for i in range(rounds):
            for label, extra in (("default", []), (variant, [variant])):
                r = run_finetune(compose([*overrides, *extra], work, f"variant{i}"))
                print(f"  {label:<40} round {i + 1}: train {r['train_s']:6.2f} s, wall {r['wall_s']:6.2f} s, "
                      f"test acc {100 * r['test_acc']:.2f}%", flush=True)


def profile(cfg: Any, top: int) -> None:
    """Where a warm cached run spends its time: per-step framework cost shows up here."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    summary = run_finetune(cfg)
    profiler.disable()
    print(f"\ncProfile of one more warm cached run ({summary['wall_s']:.1f} s wall with the profiler on), "
          f"top {top} by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    print(f"the same profile, top {2 * top} by cumulative time (which hooks and phases the time is spent in):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(2 * top)


def print_memory(runs: dict[str, dict[str, Any]], labels: dict[str, str], head_peak: int | None) -> None:
    """Training-phase memory (after extraction) next to a head trained alone, and checkpoint sizes."""
    mb = 2**20
    print(f"\n{'variant':<32}{'ckpt MB':>9}{'CUDA at train start MB':>24}{'CUDA train peak MB':>20}")
    for key, label in labels.items():
        r = runs[key]
        cuda = [f"{r[k] / mb:>{w}.2f}" if r.get(k) is not None else f"{'-':>{w}}"
                for k, w in (("train_start_cuda_bytes", 24), ("train_peak_cuda_bytes", 20))]
        ckpt = f"{r['checkpoint_bytes'] / mb:>9.2f}" if "checkpoint_bytes" in r else f"{'-':>9}"
        print(f"{label:<32}{ckpt}{''.join(cuda)}")
    if head_peak is not None:
        print(f"{'a Linear head trained alone':<32}{'':>9}{'':>24}{head_peak / mb:>20.2f}")
        print(f"training peak cached / head alone: {runs['cached']['train_peak_cuda_bytes'] / head_peak:.2f}x")
    print()


if __name__ == "__main__":
    main()
