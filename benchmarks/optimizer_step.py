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
  the variable set as after ``import pytorch_lightning``) vs as finetune runs it (fused, no NVML probe).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import harness
import torch
import torchvision
from torch import nn

NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


def best_seconds(fn: Callable[[], Any], calls: int, repeats: int, device: torch.device) -> float:
    """Best per-call time over ``repeats`` runs of ``calls`` calls (after one warm-up run)."""
    best = float("inf")
    for _ in range(repeats + 1):
        harness.sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        harness.sync(device)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


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
    harness.write_json(args.json, {"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                   "seconds": seconds, "ratios": ratios,
                                   "nvml_loads": _nvml_loads()})


def _nvml_loads() -> bool:
    from finetune.run.cuda_check import nvml_loads

    return nvml_loads()


if __name__ == "__main__":
    main()
