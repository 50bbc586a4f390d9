"""Work per training step on cached features: aten ops dispatched, kernels, and host reads.

    python benchmarks/step_ops.py [--device cpu] [--steps 100] [--progress-bar none|rich|tqdm]

A head trained on cached features does microseconds of math per step; what is left is the framework's
work around it. On a GPU each dispatched op that is not a view is a kernel launch, and each host read of
a device value (``aten._local_scalar_dense``: ``.item()``, ``float()``, ``bool()``) makes the host wait
for the device. This counts both over ``--steps`` steps of a real ``finetune.run.train.train`` run (the
config ``python -m finetune`` composes, feature cache on), from one step's start to the next (loading,
hooks and logging included), and prints them per step with the ops that contribute most. Counts
are exact on any machine; on CPU they stand in for what a GPU would launch.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

import harness
import pytorch_lightning as pl
import torch
from cache_speedup import compose, run_finetune, write_image_tree, write_weights
from torch.utils._python_dispatch import TorchDispatchMode

import finetune.run.train as train_module

# metadata-only ops: no kernel on any device
NOT_KERNELS = {"aten.detach.default", "aten.view.default", "aten.t.default", "aten._local_scalar_dense.default",
               "aten.lift_fresh.default", "aten.alias.default", "aten._unsafe_view.default",
               "aten.squeeze.default", "aten.unsqueeze.default", "aten.expand.default", "aten.as_strided.default",
               "profiler._record_function_enter_new.default", "profiler._record_function_exit._RecordFunction"}
HOST_READ = "aten._local_scalar_dense.default"


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active, and host reads of values that live on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.step_counter_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        self.ops[name] += 1
        if name == HOST_READ and any(f.name == "_get_value" and f.filename.endswith("optim/optimizer.py")
                                     for f in traceback.extract_stack(limit=12)):
            self.step_counter_reads += 1  # torch.optim keeps step counters on the host, also on a GPU
        return func(*args, **(kwargs or {}))


class CountSteps(pl.Callback):
    """Counts from the batch that starts at optimizer step ``first`` or later to the one ``steps`` or more later
    (in the first epoch); ``counted``: the optimizer steps between them (a batch may be a block of several)."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.counter = OpCounter()
        self.counted = 0
        self._start: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.current_epoch != 0 or self.counted:
            return
        if self._start is None and step >= self.first:
            self._start = step
            self.counter.__enter__()
        elif self._start is not None and step - self._start >= self.steps:
            self.counter.__exit__(None, None, None)
            self.counted = step - self._start


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(parser)
    harness.add_model_data_args(parser, image_size=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="steps counted (within the first epoch)")
    parser.add_argument("--progress-bar", choices=("none", "rich", "tqdm"), default="none")
    parser.add_argument("--override", action="append", default=[],
                        help="a config override, e.g. cache.resident=false (one optimizer step per Lightning step)")
    args = parser.parse_args()
    return args, harness.resolve_device(parser, args)


def main() -> None:
    args, device = parse_args()
    machine = harness.start(device)
    work = Path(tempfile.mkdtemp(prefix="step_ops-"))
    try:
        images = harness.load_images(args.data, None, 4 if args.quick else None)
        sizes = write_image_tree(images, work / "images")
        weights = write_weights(args.backbone, "none", 0, work / f"{args.backbone}.pth")
        per_epoch = sizes["train"] // args.batch_size
        first = 5
        steps = max(1, min(10 if args.quick else args.steps, per_epoch - first - 1))
        counter = CountSteps(first, steps)
        build = train_module.build_callbacks
        train_module.build_callbacks = lambda *a, **k: [*build(*a, **k), counter]
        try:
            cfg = compose([f"backbone={args.backbone}", f"backbone.weights={weights}", "strategy=feature_extractor",
                           "data=folder", f"data.root={work / 'images'}", f"data.image_size={args.image_size}",
                           f"data.batch_size={args.batch_size}", "data.num_workers=0", "trainer.max_epochs=1",
                           "trainer.devices=1", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
                           "logger=none", *args.override], work, "run")
            if args.progress_bar != "none":
                cfg.callbacks.progress_bar = args.progress_bar
                cfg.trainer.enable_progress_bar = True
            run_finetune(cfg)
        finally:
            train_module.build_callbacks = build
        report(counter, args, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(counter: CountSteps, args: argparse.Namespace, machine: dict[str, Any]) -> None:
    if not counter.counted:
        raise SystemExit("the epoch was too short to count any step")
    ops, n = counter.counter.ops, counter.counted
    total = sum(ops.values())
    kernels = sum(v for k, v in ops.items() if k not in NOT_KERNELS)
    print(f"\n{args.backbone} head on cached features, batch {args.batch_size}, progress bar {args.progress_bar}, "
          f"{' '.join(args.override) or 'default settings'}, {n} steps counted:")
    print(f"  aten ops per step:           {total / n:6.2f}")
    print(f"  of them kernels (not views): {kernels / n:6.2f}")
    counters = counter.counter.step_counter_reads
    print(f"  host reads per step:         {ops[HOST_READ] / n:6.2f} ({counters / n:.2f} of them the optimizer's step "
          f"counters, host tensors on a GPU too; the other {(ops[HOST_READ] - counters) / n:.2f} wait for a GPU)")
    print("  most frequent ops per step:")
    for name, count in ops.most_common(15):
        print(f"    {count / n:6.2f}  {name}{'' if name not in NOT_KERNELS else '  (no kernel)'}")
    harness.write_json(args.json, {"benchmark": "step_ops", "machine": machine,
                             "settings": {"backbone": args.backbone, "batch_size": args.batch_size,
                                          "overrides": args.override,
                                          "progress_bar": args.progress_bar, "steps": n},
                             "per_step": {"ops": total / n, "kernels": kernels / n, "host_reads": ops[HOST_READ] / n,
                                          "host_reads_waiting_for_gpu": (ops[HOST_READ] - counters) / n},
                             "ops": {k: v / n for k, v in ops.most_common()}})


if __name__ == "__main__":
    main()
