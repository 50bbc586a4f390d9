"""Framework overhead per training step: finetune's LightningModule + Trainer vs a plain PyTorch loop.

    python benchmarks/framework_overhead.py [--backbone resnet18] [--image-size 64] [--batch-size 32] [--steps 50]

Both train the same model (a FinetuneModule's backbone + head, built by finetune.run.train.build_module from
the real config, copied before any step), on the same in-memory tensors through the same kind of
DataLoader, with the same AdamW param groups and warmup-cosine schedule, strategy full_finetune. Each
run times N steps after a warm-up, from the batch-start of step W to that of step W+N; runs are
interleaved (ABC, BCA, CAB, ...) and the median of the per-repeat ratios is reported. Lightning runs
once lean (no logger, checkpointing, progress bar or model summary) and once with the trainer as
finetune.run.train builds it (its default callbacks, CSV logger, checkpoint plugin; no progress bar, no
validation). Target: lean <= 5% slower per step on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune import config_dir
from finetune.data.datasets import Splits
from finetune.model.backbones import preprocessing_for
from finetune.model.module import FinetuneModule, warmup_cosine
from finetune.model.strategies import param_groups

TARGET_OVERHEAD = 0.05
VARIANTS = ("plain", "lean", "default")
LABELS = {"plain": "plain PyTorch loop", "lean": "finetune + Lightning, lean",
          "default": "finetune + Lightning, as train() builds it"}


def compose(overrides: list[str], out_dir: Path) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.cache_dir = str(out_dir / "cache")
        cfg.callbacks.progress_bar = "none"
    return cfg


def image_tensors(images: harness.Images, size: int, backbone: str, count: int) -> TensorDataset:
    """Train images resized and normalised once, repeated up to ``count``: all steps fit in one epoch."""
    unique = min(count, len(images.x_train))
    x = torch.from_numpy(images.x_train[:unique])
    x = x.unsqueeze(-1).expand(*x.shape, 3) if x.ndim == 3 else x  # grayscale digits -> RGB
    x = x.permute(0, 3, 1, 2).float().div(255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    prep = preprocessing_for(backbone)
    x = (x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    index = torch.arange(count) % unique
    return TensorDataset(x[index].contiguous(), torch.from_numpy(images.y_train[:unique])[index])


class StepClock(pl.Callback):
    """Clock readings at the start of every training batch; the device is synchronised at the two marks.

    Besides wall time it reads the process's CPU time: on a machine shared with other work, time the
    process spent waiting for a core shows in the wall clock but not there (with --threads 1, where no
    thread spins waiting for another, CPU time is the work done).
    """

    def __init__(self, marks: tuple[int, int], device: torch.device) -> None:
        self.marks = marks
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.faults: list[int] = []

    def tick(self) -> None:
        if len(self.times) in self.marks:
            harness.sync(self.device)
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.tick()

    def result(self) -> dict[str, float]:
        first, last = self.marks
        steps = last - first
        deltas = np.diff(self.times[first:last + 1])
        return {"step_s": (self.times[last] - self.times[first]) / steps, "median_step_s": float(np.median(deltas)),
                "cpu_step_s": (self.cpu_times[last] - self.cpu_times[first]) / steps,
                "page_faults_per_step": (self.faults[1] - self.faults[0]) / steps}


def loader(data: TensorDataset, batch_size: int, device: torch.device) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, pin_memory=device.type == "cuda",
                      drop_last=True)


def run_lightning(module: FinetuneModule, cfg: Any, data: TensorDataset, marks: tuple[int, int],
                  device: torch.device, default_callbacks: bool, out_dir: Path) -> dict[str, float]:
    from omegaconf import open_dict

    from finetune.config.typed import to_typed
    from finetune.run.builders import build_callbacks, build_loggers, instantiate_node

    gc.collect()  # the last run's garbage is collected here, not inside this run's timed steps
    clock = StepClock(marks, device)
    common = {"max_steps": marks[1] + 1, "limit_val_batches": 0, "num_sanity_val_steps": 0,
              "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(out_dir)}
    started = time.perf_counter()
    if default_callbacks:  # the trainer as finetune.run.train builds it (callbacks, loggers, checkpoint plugin)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
        typed = to_typed(cfg)
        loggers = build_loggers(typed)
        try:
            from finetune.run.resume import AtomicCheckpointIO

            common["plugins"] = [AtomicCheckpointIO()]
        except ImportError:
            pass
        trainer = instantiate_node(typed.trainer, callbacks=[*build_callbacks(typed, has_logger=bool(loggers)), clock],
                                   logger=loggers or False, **common)
    else:
        trainer = instantiate_node(to_typed(cfg).trainer, callbacks=[clock], logger=False, enable_checkpointing=False,
                                   **common)
    trainer.fit(module, train_dataloaders=loader(data, int(cfg.data.batch_size), device))
    harness.sync(device)
    callbacks = [type(c).__name__ for c in trainer.callbacks if c is not clock]
    return {**clock.result(), "run_s": time.perf_counter() - started, "callbacks": callbacks,
            "loggers": [type(lg).__name__ for lg in trainer.loggers]}


def run_plain(model: FinetuneModule, cfg: Any, data: TensorDataset, marks: tuple[int, int],
              device: torch.device) -> dict[str, float]:
    """The same forward, loss, backward and AdamW step, written by hand."""
    gc.collect()
    started = time.perf_counter()
    backbone, head = model.backbone.to(device), model.head.to(device)
    opt_cfg = cfg.optimizer
    optimizer = torch.optim.AdamW(param_groups(backbone, head, float(opt_cfg.lr), float(opt_cfg.weight_decay),
                                               float(cfg.strategy.backbone_lr_ratio),
                                               bool(opt_cfg.no_decay_norm_bias)))
    total = marks[1] + 1
    warmup = round(float(cfg.scheduler.warmup_epochs) * max(1, total // max(1, int(cfg.trainer.max_epochs))))
    min_ratio = float(cfg.scheduler.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_ratio))
    criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.label_smoothing))
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    clock = StepClock(marks, device)
    backbone.train()
    head.train()
    for step, (x, y) in enumerate(loader(data, int(cfg.data.batch_size), device)):
        if step == total:
            break
        clock.tick()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = criterion(head(backbone(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    harness.sync(device)
    return {**clock.result(), "run_s": time.perf_counter() - started}


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=64)
    parser.add_argument("--strategy", default="full_finetune",
                        choices=("full_finetune", "partial_unfreeze", "feature_extractor"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.warmup, args.repeats = 32, 4, 3, 1, 1
    return args, harness.resolve_device(parser, args)


def main() -> None:
    args, device = parse_args()
    machine = harness.start(device)
    from finetune.config.typed import to_typed
    from finetune.run.builders import build_module, use_channels_last

    work = Path(tempfile.mkdtemp(prefix="framework_overhead-"))
    overrides = [f"backbone={args.backbone}", "backbone.weights=none", f"strategy={args.strategy}",
                 f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.devices=1",
                 f"trainer.precision={args.precision}"]
    if args.strategy == "partial_unfreeze":
        overrides.append("strategy.unfreeze_last=2")
    cfg = compose(overrides, work)
    pl.seed_everything(int(cfg.seed), verbose=False)
    images = harness.load_images(args.data)
    marks = (args.warmup, args.warmup + args.steps)
    data = image_tensors(images, args.image_size, args.backbone, (marks[1] + 1) * args.batch_size)
    module = build_module(to_typed(cfg), Splits(data, data, data, images.classes))
    if use_channels_last(to_typed(cfg)):
        module = module.to(memory_format=torch.channels_last)
    plain_model = copy.deepcopy(module)
    print(f"data: {images.source}, resized to {args.image_size} px, in memory as tensors")
    print(f"run: {args.backbone} weights=none, {args.strategy}, batch {args.batch_size}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} interleaved repeats\n")

    run_plain(copy.deepcopy(plain_model), cfg, data, (0, min(2, marks[1])), device)  # one-time costs first
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % 3:] + VARIANTS[:repeat % 3]
        for variant in order:
            if variant == "plain":
                r = run_plain(plain_model, cfg, data, marks, device)
            else:
                run_dir = work / f"{variant}-{repeat}"
                r = run_lightning(module, cfg, data, marks, device, variant == "default", run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of the whole model + optimizer
            results[variant].append(r)
            print(f"  repeat {repeat + 1}/{args.repeats} {LABELS[variant]:<42} {1000 * r['step_s']:9.2f} ms/step "
                  f"(median step {1000 * r['median_step_s']:.2f} ms, CPU {1000 * r['cpu_step_s']:.2f} ms/step, "
                  f"{r['page_faults_per_step']:.0f} page faults/step, run {r['run_s']:.1f} s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    report(results, args, machine, images.source, device)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, machine: dict[str, Any],
           source: str, device: torch.device) -> None:
    def ratios(variant: str, key: str) -> list[float]:
        return [r[key] / p[key] for r, p in zip(results[variant], results["plain"], strict=True)]

    summary: dict[str, Any] = {}
    print(f"\n{'variant':<42}{'ms/step':>10}{'median step ms':>16}{'CPU ms/step':>14}{'run s':>8}{'vs plain':>10}"
          f"{'CPU vs plain':>12}")
    for variant in VARIANTS:
        step = statistics.median(r["step_s"] for r in results[variant])
        median_step = statistics.median(r["median_step_s"] for r in results[variant])
        run = statistics.median(r["run_s"] for r in results[variant])
        ratio = statistics.median(ratios(variant, "step_s"))
        cpu_step = statistics.median(r["cpu_step_s"] for r in results[variant])
        summary[variant] = {"step_s": step, "median_step_s": median_step, "cpu_step_s": cpu_step, "run_s": run,
                            "ratio_vs_plain": ratio, "ratio_median_step_vs_plain":
                            statistics.median(ratios(variant, "median_step_s")),
                            "ratio_cpu_vs_plain": statistics.median(ratios(variant, "cpu_step_s")),
                            "per_repeat_ratio": ratios(variant, "step_s")}
        print(f"{LABELS[variant]:<42}{1000 * step:>10.2f}{1000 * median_step:>16.2f}{1000 * cpu_step:>14.2f}"
              f"{run:>8.1f}{ratio:>10.3f}{summary[variant]['ratio_cpu_vs_plain']:>12.3f}")
    first_default = results["default"][0]
    print(f"\n'as train() builds it' = callbacks {', '.join(first_default['callbacks'])}; "
          f"loggers {', '.join(first_default['loggers']) or 'none'}\n")
    lean, default = summary["lean"], summary["default"]
    met = lean["ratio_vs_plain"] - 1 <= TARGET_OVERHEAD
    print(f"ratio lightning-lean/plain per step: {lean['ratio_vs_plain']:.3f} "
          f"(overhead {100 * (lean['ratio_vs_plain'] - 1):+.1f}%, target <= {100 * TARGET_OVERHEAD:.0f}%: "
          f"{harness.verdict(met)}; per repeat {', '.join(f'{r:.3f}' for r in lean['per_repeat_ratio'])})")
    print(f"ratio lightning-default/plain per step: {default['ratio_vs_plain']:.3f} "
          f"(overhead {100 * (default['ratio_vs_plain'] - 1):+.1f}%; "
          f"per repeat {', '.join(f'{r:.3f}' for r in default['per_repeat_ratio'])})")
    print(f"ratio of median single steps, lean/plain: {lean['ratio_median_step_vs_plain']:.3f}, "
          f"default/plain: {default['ratio_median_step_vs_plain']:.3f}")
    print(f"ratio of CPU time per step, lean/plain: {lean['ratio_cpu_vs_plain']:.3f}, "
          f"default/plain: {default['ratio_cpu_vs_plain']:.3f} (insensitive to waiting for a core; "
          f"{'one torch thread' if torch.get_num_threads() == 1 else 'but counts spinning threads'})")
    harness.write_json(args.json, {
        "benchmark": "framework_overhead", "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"data": source},
        "runs": results, "summary": summary,
        "ratios": {"lean/plain": lean["ratio_vs_plain"], "default/plain": default["ratio_vs_plain"],
                   "cpu lean/plain": lean["ratio_cpu_vs_plain"], "cpu default/plain": default["ratio_cpu_vs_plain"]},
        "targets": {"lean overhead <= 5%": met},
    })


if __name__ == "__main__":
    main()
