"""Cached training phase: finetune's resident blocks vs batches read per step vs a plain device-resident loop.

    python benchmarks/resident_loop.py [--threads 1] [--rounds 3] [--epochs 10] [--device cpu|cuda] [--quick]

One warm feature cache (resnet18 at 64 px, frozen, the CIFAR-10 subset from ../shared/data or digits without
it), then, interleaved for ``--rounds`` rounds: finetune with ``cache.resident=false`` (a DataLoader batch
and one Lightning step per optimizer step), finetune with the default ``cache.resident=auto`` (the train
features on the device, ``cache.steps_per_block`` optimizer steps per Lightning step), the same with Lightning's
own ``self.log`` (without ``finetune.run.fast_log``: what that saves), and a plain PyTorch
loop over the same cached features held as one tensor on the device: the same EpochSampler order, an
``nn.Linear`` head, cross-entropy, AdamW with the config's groups and warmup-cosine schedule, and one
validation pass per epoch, as finetune runs it; once with torch's default AdamW (the issue's plain loop), once
fused (the kernel finetune's ``optimizer.fused=auto`` picks, so that ratio is the framework's own cost).
Timed: finetune's ``wall_seconds.training`` (fit without the extraction: Lightning's setup, every epoch's
validation and checkpoints), and the plain loop's epochs. Reported: medians, the ratios (of medians, and
paired: each round's ratio, median over rounds, steadier where the machine's speed drifts within seconds),
and whether the two finetune runs trained identical heads. Target (issue 18): resident / plain <= 1.3x.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cache_speedup
import harness
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultMetric
from torch import nn

from finetune.data.datamodule import EpochSampler
from finetune.model.module import warmup_cosine
from finetune.run import fast_log

TARGET = 1.3
VARIANTS = {"per_step": "finetune, cache.resident=false (a DataLoader batch per step)",
            "resident": "finetune, cache.resident=auto (blocks on the device)",
            "resident_lightning_log": "the same, Lightning's own self.log (no fast_log)",
            "plain": "plain loop over a device tensor (torch's default AdamW)",
            "plain_fused": "plain loop, fused AdamW (as finetune's optimizer.fused=auto)"}


class TrainClock(pl.Callback):
    """Seconds of each epoch's training batches: first batch start to last batch end (no validation, no checkpoint)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._first: float | None = None
        self._last = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first is not None:
            self.seconds += self._last - self._first
        self._first = None


@contextlib.contextmanager
def lightning_log() -> Iterator[None]:
    """Lightning's own ``_ResultMetric.to`` for the runs inside (what finetune.run.fast_log replaces)."""
    fast = _ResultMetric.to
    install = fast_log.install
    _ResultMetric.to = getattr(fast, "lightning_to", fast)
    fast_log.install = lambda: False
    try:
        yield
    finally:
        _ResultMetric.to, fast_log.install = fast, install


def run_finetune(cfg: Any, fast_logging: bool = True) -> dict[str, Any]:
    import finetune.run.train as train_module

    clock = TrainClock()
    build_callbacks = train_module.build_callbacks
    train_module.build_callbacks = lambda *a, **k: [*build_callbacks(*a, **k), clock]  # the run as train() builds it
    cpu = time.process_time()
    try:
        with contextlib.nullcontext() if fast_logging else lightning_log():
            summary = train_module.train(cfg)
    finally:
        train_module.build_callbacks = build_callbacks
    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    return {"train_s": summary["wall_seconds"]["training"], "steps_s": clock.seconds,
            "test_acc": summary["test"]["acc"],
            "cpu_s_run": time.process_time() - cpu, "steps": summary["global_steps"],
            "head": {k: v for k, v in best.items() if k.startswith("head.")}, "cache": summary["feature_cache"]}


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / f"{split}.0of1.features.npy"), np.load(folder / f"{split}.0of1.labels.npy")


def run_plain(cache: Path, cfg: Any, device: torch.device, fused: bool = False) -> dict[str, Any]:
    """Train a Linear head on the cached features, every tensor on the device, finetune's order and schedule;
    ``fused``: one fused AdamW kernel per step (what finetune's optimizer.fused=auto picks), else torch's default."""
    torch.manual_seed(int(cfg.seed))
    (xt, yt), (xv, yv) = load_split(cache, "train"), load_split(cache, "val")
    x_train, y_train = torch.from_numpy(xt).float().to(device), torch.from_numpy(yt).to(device)
    x_val, y_val = torch.from_numpy(xv).float().to(device), torch.from_numpy(yv).to(device)
    batch = int(cfg.data.batch_size)
    classes = int(max(yt.max(), yv.max())) + 1
    head = nn.Linear(x_train.shape[1], classes).to(device)
    optimizer = torch.optim.AdamW([{"params": [head.weight], "weight_decay": float(cfg.optimizer.weight_decay)},
                                   {"params": [head.bias], "weight_decay": 0.0}], lr=float(cfg.optimizer.lr),
                                  fused=True if fused else None)
    epochs, per_epoch = int(cfg.trainer.max_epochs), len(x_train) // batch
    warmup, ratio = round(float(cfg.scheduler.warmup_epochs) * per_epoch), float(cfg.scheduler.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, epochs * per_epoch, ratio))
    criterion = nn.CrossEntropyLoss()
    sampler = EpochSampler(len(x_train), int(cfg.seed))
    harness.sync(device)
    started, cpu = time.perf_counter(), time.process_time()
    steps_s = 0.0
    for epoch in range(epochs):
        epoch_started = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(sampler.order(), device=device)
        head.train()
        for i in range(per_epoch):
            index = order[i * batch:(i + 1) * batch]
            loss = criterion(head(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        harness.sync(device)
        steps_s += time.perf_counter() - epoch_started
        head.eval()
        with torch.no_grad():
            correct = sum(int((head(x_val[i:i + batch]).argmax(1) == y_val[i:i + batch]).sum())
                          for i in range(0, len(x_val), batch))
    harness.sync(device)
    return {"train_s": time.perf_counter() - started, "steps_s": steps_s, "cpu_s": time.process_time() - cpu,
            "val_acc": correct / len(x_val), "steps": epochs * per_epoch}


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--override", action="append", default=[], help="more config overrides, for every run")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.epochs, args.batch_size, args.per_class, args.rounds = 32, 2, 16, 8, 1
    return args, harness.resolve_device(parser, args)


def main() -> None:
    args, device = parse_args()
    machine = harness.start(device)
    work = Path(tempfile.mkdtemp(prefix="resident_loop-"))
    try:
        images = harness.load_images(args.data, args.per_class, 4 if args.quick else None)
        sizes = cache_speedup.write_image_tree(images, work / "images")
        weights = cache_speedup.write_weights(args.backbone, "none", args.seed, work / f"{args.backbone}.pth")
        overrides = [f"backbone={args.backbone}", f"backbone.weights={weights}", "strategy=feature_extractor",
                     "data=folder", f"data.root={work / 'images'}", f"data.image_size={args.image_size}",
                     f"data.batch_size={args.batch_size}", "data.num_workers=0", f"trainer.max_epochs={args.epochs}",
                     "trainer.devices=1", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
                     "logger=none", f"seed={args.seed}", *args.override]
        print(f"data: {images.source}; train/val/test = {sizes['train']}/{sizes['val']}/{sizes['test']}; "
              f"{args.backbone} frozen at {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs\n")
        print("filling the feature cache (not timed) ...", flush=True)
        first = run_finetune(cache_speedup.compose(overrides, work, "fill"))
        cache = Path(first["cache"])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]  # none always first
            for name in order:
                if name.startswith("plain"):
                    runs[name].append(run_plain(cache, cache_speedup.compose(overrides, work, name), device,
                                                fused=name == "plain_fused"))
                else:
                    extra = ["cache.resident=false"] if name == "per_step" else []
                    runs[name].append(run_finetune(cache_speedup.compose([*overrides, *extra], work, name),
                                                   fast_logging=name != "resident_lightning_log"))
            print(f"round {r + 1}: " + ", ".join(f"{n} {runs[n][-1]['train_s']:.3f} s" for n in VARIANTS), flush=True)
        report(runs, args, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, machine: dict[str, Any]) -> None:
    median = {name: statistics.median(r["train_s"] for r in rs) for name, rs in runs.items()}
    stepping = {name: statistics.median(r["steps_s"] for r in rs) for name, rs in runs.items()}
    steps = runs["plain"][0]["steps"]
    print(f"\nmedian of {args.rounds} round(s), {steps} optimizer steps; training phase (with every epoch's "
          f"validation, and finetune's checkpoints and fit set-up) | the epochs' training batches alone:")
    for name, label in VARIANTS.items():
        print(f"  {label:<62} {median[name]:7.3f} s  {1e3 * median[name] / steps:6.3f} ms/step | "
              f"{stepping[name]:7.3f} s  {1e3 * stepping[name] / steps:6.3f} ms/step")
    finetunes = ("per_step", "resident", "resident_lightning_log")
    identical = all(torch.equal(a["head"][k], b["head"][k]) for name in finetunes[1:]
                    for a, b in zip(runs["per_step"], runs[name], strict=True) for k in a["head"])
    same_acc = {r["test_acc"] for name in finetunes for r in runs[name]}
    ratios = {"resident/plain": median["resident"] / median["plain"],
              "per_step/plain": median["per_step"] / median["plain"],
              "per_step/resident": median["per_step"] / median["resident"]}
    ratios["steps resident/plain"] = stepping["resident"] / stepping["plain"]
    ratios["steps per_step/plain"] = stepping["per_step"] / stepping["plain"]
    ratios["resident/plain_fused"] = median["resident"] / median["plain_fused"]
    ratios["resident lightning log/resident"] = median["resident_lightning_log"] / median["resident"]
    # this machine's speed drifts within seconds: the ratio of runs next to each other, median over rounds
    ratios["paired resident/plain"] = statistics.median(
        a["train_s"] / b["train_s"] for a, b in zip(runs["resident"], runs["plain"], strict=True))
    ratios["paired resident/plain_fused"] = statistics.median(
        a["train_s"] / b["train_s"] for a, b in zip(runs["resident"], runs["plain_fused"], strict=True))
    print(f"ratio resident / plain loop: {ratios['resident/plain']:.2f}x the training phase (target <= {TARGET}: "
          f"{harness.verdict(ratios['resident/plain'] <= TARGET)}); {ratios['steps resident/plain']:.2f}x the "
          f"training batches alone (per-step: {ratios['steps per_step/plain']:.2f}x)")
    print(f"ratio per-step / plain loop: {ratios['per_step/plain']:.2f}x; per-step / resident: "
          f"{ratios['per_step/resident']:.2f}x")
    print(f"paired (median over rounds of each round's ratio): resident / plain "
          f"{ratios['paired resident/plain']:.2f}x; "
          f"resident / plain with fused AdamW {ratios['paired resident/plain_fused']:.2f}x "
          f"(ratio of medians {ratios['resident/plain_fused']:.2f}x: the framework's own cost, same optimizer kernel)")
    print(f"ratio resident with Lightning's own self.log / resident (finetune.run.fast_log): "
          f"{ratios['resident lightning log/resident']:.2f}x the training phase")
    print(f"finetune heads identical (resident and resident with Lightning's self.log vs per-step, every round): "
          f"{identical}; test accuracy "
          f"{sorted(same_acc)}; steps {runs['resident'][0]['steps']} / {runs['per_step'][0]['steps']} / {steps}")
    harness.write_json(args.json, {"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                   "median_train_s": median, "median_steps_s": stepping, "ratios": ratios,
                                   "heads_identical": identical,
                                   "runs": {n: [{k: v for k, v in r.items() if k != "head"} for r in rs]
                                            for n, rs in runs.items()}})


if __name__ == "__main__":
    main()
