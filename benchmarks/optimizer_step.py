"""What an optimizer step costs besides the math: torch's default AdamW/SGD vs fused, and the NVML probe per step.

    python benchmarks/optimizer_step.py [--threads 1] [--device cpu|cuda] [--quick]

Side by side in one process, alternated, best of ``--repeats``:
- ``optimizer.step()`` alone, torch's default implementation vs ``fused=True`` (what finetune's
  ``optimizer.fused=auto`` picks on CUDA and on a CPU), for AdamW and SGD with momentum, on resnet18's
  parameters (full fine-tuning) and on a cached head's two (``nn.Linear(512, 10)``);
- ``torch.cuda.is_available()`` with ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (what importing Lightning sets) vs
  without: torch's optimizers ask it once per step, and without libnvidia-ml the NVML route tries to load it
  every call before falling back to the same answer (finetune drops the variable there);
- a whole cached-head step (forward, cross-entropy, backward, step) as a plain loop gets it (default AdamW,
  the variable set as after ``import pytorch_lightning``) vs as finetune runs it (fused, no NVML probe);
- with ``--end-to-end``: finetune's full fine-tuning (resnet18 at 64 px, batch 16, ``--steps`` steps, the
  CIFAR-10 subset or digits, 150 images a class), ``optimizer.fused=auto`` vs ``false``, alternated, medians
  of 3: the training phase.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import torch
import torchvision
from torch import nn

NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


def best_seconds(fn: Callable[[], Any], calls: int, repeats: int, device: torch.device) -> float:
    """Best per-call time over ``repeats`` runs of ``calls`` calls (after one untimed run)."""
    return harness.best_seconds(fn, calls, repeats, device, warmup=calls)


def optimizer_steps(params: list[nn.Parameter], name: str, fused: bool, calls: int, repeats: int,
                    device: torch.device) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    kind = {"fused": True} if fused else {}
    optimizer = (torch.optim.AdamW(params, lr=1e-4, **kind) if name == "adamw"
                 else torch.optim.SGD(params, lr=1e-4, momentum=0.9, **kind))
    return best_seconds(optimizer.step, calls, repeats, device)


def with_nvml_variable(value: str | None, fn: Callable[[], float]) -> float:
    before = os.environ.get(NVML)
    try:
        if value is None:
            os.environ.pop(NVML, None)
        else:
            os.environ[NVML] = value
        return fn()
    finally:
        if before is None:
            os.environ.pop(NVML, None)
        else:
            os.environ[NVML] = before


def head_step(device: torch.device, fused: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    head = nn.Linear(512, 10).to(device)
    x, y = torch.randn(32, 512, device=device), torch.randint(0, 10, (32,), device=device)
    optimizer = torch.optim.AdamW([{"params": [head.weight]}, {"params": [head.bias], "weight_decay": 0.0}],
                                  lr=1e-3, fused=True if fused else None)

    def step() -> None:
        loss = nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", action="store_true", help="also time finetune's full fine-tuning, fused vs not")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    device = harness.resolve_device(parser, args)
    machine = harness.start(device)
    calls = {"resnet18": 3 if args.quick else 20, "head": 50 if args.quick else 2000}
    repeats = 1 if args.quick else args.repeats
    models = {"resnet18": list(torchvision.models.resnet18().to(device).parameters()),
              "head": list(nn.Linear(512, 10).to(device).parameters())}
    seconds: dict[str, float] = {}
    ratios: dict[str, float] = {}
    print("optimizer.step() alone, best per call:")
    for model, params in models.items():
        count = sum(p.numel() for p in params)
        for name in ("adamw", "sgd"):
            default = optimizer_steps(params, name, False, calls[model], repeats, device)
            fused = optimizer_steps(params, name, True, calls[model], repeats, device)
            seconds[f"{model} {name} default"], seconds[f"{model} {name} fused"] = default, fused
            ratios[f"{model} {name} default/fused"] = default / fused
            print(f"  {model:<9} ({count:>10,} parameters) {name:<5}  default {1e6 * default:9.1f} us   fused "
                  f"{1e6 * fused:9.1f} us")
    checks = 200 if args.quick else 20_000
    probe = with_nvml_variable("1", lambda: best_seconds(torch.cuda.is_available, checks, repeats, device))
    plain = with_nvml_variable(None, lambda: best_seconds(torch.cuda.is_available, checks, repeats, device))
    seconds["is_available nvml"], seconds["is_available plain"] = probe, plain
    ratios["is_available nvml/plain"] = probe / plain
    print(f"torch.cuda.is_available(): {1e6 * probe:.2f} us with {NVML}=1, {1e6 * plain:.2f} us without")
    step_calls = 50 if args.quick else 2000
    naive = with_nvml_variable("1", lambda: best_seconds(head_step(device, False), step_calls, repeats, device))
    tuned = with_nvml_variable(None, lambda: best_seconds(head_step(device, True), step_calls, repeats, device))
    seconds["head step naive"], seconds["head step finetune"] = naive, tuned
    ratios["head step naive/finetune"] = naive / tuned
    for model in models:
        for name in ("adamw", "sgd"):
            print(f"ratio {model} {name} optimizer step, default / fused: "
                  f"{ratios[f'{model} {name} default/fused']:.2f}x")
    print(f"ratio torch.cuda.is_available(), NVML probe / without: {ratios['is_available nvml/plain']:.2f}x "
          f"({1e6 * (probe - plain):.1f} us more a call)")
    print(f"ratio cached-head step (Linear 512->10, batch 32), default AdamW + NVML probe / fused, no probe: "
          f"{ratios['head step naive/finetune']:.2f}x ({1e6 * naive:.1f} vs {1e6 * tuned:.1f} us)")
    if args.end_to_end:
        seconds.update(end_to_end(args, device))
        ratios["full_finetune false/auto"] = seconds["full_finetune fused=false"] / seconds["full_finetune fused=auto"]
        print(f"ratio full_finetune training phase, optimizer.fused=false / auto: "
              f"{ratios['full_finetune false/auto']:.2f}x ({seconds['full_finetune fused=false']:.2f} vs "
              f"{seconds['full_finetune fused=auto']:.2f} s)")
    harness.write_json(args.json, {"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                   "seconds": seconds, "ratios": ratios,
                                   "nvml_loads": _nvml_loads()})


def end_to_end(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """finetune's training phase, full fine-tuning, optimizer.fused=auto vs false (median of 3, alternated)."""
    import cache_speedup

    import finetune.run.train as train_module

    work = Path(tempfile.mkdtemp(prefix="optimizer_step-"))
    try:
        images = harness.load_images(None, 4 if args.quick else 150, 2)  # 1,350 train images: 84 batches
        cache_speedup.write_image_tree(images, work / "images")
        weights = cache_speedup.write_weights("resnet18", "none", 0, work / "resnet18.pth")
        steps = 3 if args.quick else args.steps
        base = ["backbone=resnet18", f"backbone.weights={weights}", "strategy=full_finetune", "data=folder",
                f"data.root={work / 'images'}", "data.image_size=64", "data.batch_size=16", "trainer.max_epochs=1",
                f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=2", "trainer.devices=1",
                f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "logger=none",
                "cache.enabled=false"]
        runs: dict[str, list[float]] = {"auto": [], "false": []}
        for r in range(1 if args.quick else 3):
            for fused in (["auto", "false"] if r % 2 == 0 else ["false", "auto"]):
                cfg = cache_speedup.compose([*base, f"optimizer.fused={fused}"], work, fused)
                runs[fused].append(train_module.train(cfg)["wall_seconds"]["training"])
                print(f"  full_finetune, optimizer.fused={fused}: {runs[fused][-1]:.2f} s", flush=True)
        return {f"full_finetune fused={k}": statistics.median(v) for k, v in runs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _nvml_loads() -> bool:
    from finetune.run.cuda_check import nvml_loads

    return nvml_loads()


if __name__ == "__main__":
    main()
