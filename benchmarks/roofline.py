"""Backbone forward throughput against this device's measured matmul peak (a compute roofline).

    python benchmarks/roofline.py [--backbones resnet50,vgg16 | all] [--image-size 224] [--batch-size 16]

For each backbone as finetune builds it (stages + pooling, fc6-fc7 for VGG; weights=none, which does not
change speed) it measures images/s under torch.inference_mode in eval mode and reports
fraction = images/s x FLOPs per image / peak FLOP/s, where FLOPs are counted by PyTorch's
FlopCounterMode (a multiply-add is 2) and the peak is the best of several large square matmuls of the
same precision and sizes n and 2n, measured in the same run (before and after the models; the higher
one counts), through the BLAS (torch.mm) and, on CPU, through oneDNN as well (which runs the convolutions).
Modes: fp32 in NCHW and channels_last; on CUDA also TF32 and bf16 autocast, each against its own
matmul peak. Target on CPU: >= 70% of the fp32 matmul roofline for resnet50 and vgg16 at 224 px.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any

import harness
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from finetune.model.backbones import BACKBONE_NAMES, build_backbone

TARGET_FRACTION = 0.70
TARGET_BACKBONES = ("resnet50", "vgg16")


@dataclass(frozen=True)
class Mode:
    """How the forward runs, and which matmul peak it is held against."""

    name: str
    peak: str  # "fp32" (strict IEEE), "tf32" or "bf16"
    channels_last: bool
    autocast_bf16: bool = False


MODES = {m.name: m for m in (
    Mode("fp32", "fp32", channels_last=False),
    Mode("fp32-cl", "fp32", channels_last=True),
    Mode("tf32-cl", "tf32", channels_last=True),
    Mode("bf16", "bf16", channels_last=False, autocast_bf16=True),
    Mode("bf16-cl", "bf16", channels_last=True, autocast_bf16=True),
)}
DEFAULT_MODES = {"cpu": ("fp32", "fp32-cl"), "cuda": ("fp32", "fp32-cl", "tf32-cl", "bf16", "bf16-cl")}


def set_tf32(device: torch.device, enabled: bool) -> None:
    """fp32 convolutions and matmuls both strict, or both TF32: a fraction must compare like with like.

    (cuDNN convolutions default to TF32 while matmuls default to strict fp32.) The new
    ``fp32_precision`` API only; mixing it with the legacy ``allow_tf32`` flags is an error in torch.
    """
    if device.type != "cuda":
        return
    value = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = value
    torch.backends.cudnn.conv.fp32_precision = value


def matmul_peaks(kind: str, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    """FLOP/s of an n x n x n matmul in the given precision (fp32, tf32 or bf16), best of ``repeats``.

    On CPU, torch.mm goes to the BLAS (MKL, slow on AMD CPUs) while convolutions go to oneDNN, so the
    same product is also timed through oneDNN's matmul; the faster library sets the roofline.
    """
    set_tf32(device, kind == "tf32")
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    calls = 1 if device.type == "cpu" else 10
    flops = 2 * n**3
    library = "cublas" if device.type == "cuda" else "blas"
    peaks = {library: flops / harness.best_seconds(lambda: torch.mm(a, b, out=out), calls, repeats, device, warmup=2)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            am, bm = a.to_mkldnn(), b.to_mkldnn()
            with torch.inference_mode():
                peaks["onednn"] = flops / harness.best_seconds(lambda: torch._C._nn.mkldnn_linear(am, bm, None),
                                                               calls, repeats, device, warmup=2)
        except (RuntimeError, AttributeError) as err:  # a private entry point: may move between releases
            print(f"(oneDNN matmul not timed: {type(err).__name__}: {err})")
    return peaks


def best_matmul_peaks(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Per library, the better of n and 2n: one size alone may sit below a library's best blocking."""
    if args.quick:
        return matmul_peaks(kind, args.matmul_size, device, 2)
    small = matmul_peaks(kind, args.matmul_size, device, 10)
    large = matmul_peaks(kind, 2 * args.matmul_size, device, 4)
    return {lib: max(small[lib], large.get(lib, 0.0)) for lib in small}


def flops_per_image(name: str, size: int) -> int:
    """Forward FLOPs of one image, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_backbone(name, weights="none")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.empty(1, 3, size, size, device="meta"))
    return int(counter.get_total_flops())


def images_per_s(model: nn.Module, mode: Mode, batch: int, size: int, device: torch.device, warmup: int,
                 iters: int, repeats: int) -> list[float]:
    """Throughput of each timed repeat (``iters`` batches each), after ``warmup`` batches."""
    set_tf32(device, mode.peak == "tf32")
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode.autocast_bf16 else contextlib.nullcontext()
    rates = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            harness.sync(device)
            started = time.perf_counter()
            for _ in range(iters):
                model(x)
            harness.sync(device)
            rates.append(batch * iters / (time.perf_counter() - started))
    return rates


def parse_args() -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser)
    parser.add_argument("--backbones", default=",".join(TARGET_BACKBONES), help="comma list, or 'all'")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 128 on CUDA")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} "
                        "(default: fp32,fp32-cl on CPU; all on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (default: 1 CPU, 5 CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="batches per timed repeat (default: 2 CPU, 20 CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best counts")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n x n peak matmul, also "
                        "timed at 2n (default: 2048 CPU, 8192 CUDA)")
    args = parser.parse_args()
    device = harness.resolve_device(parser, args)
    cpu = device.type == "cpu"
    args.backbones = list(BACKBONE_NAMES) if args.backbones == "all" else [b for b in args.backbones.split(",") if b]
    unknown = [b for b in args.backbones if b not in BACKBONE_NAMES]
    if unknown:
        parser.error(f"unknown backbone(s) {unknown}; choose from {', '.join(BACKBONE_NAMES)} or 'all'")
    args.modes = args.modes.split(",") if args.modes else list(DEFAULT_MODES[device.type])
    if any(m not in MODES for m in args.modes) or (cpu and "tf32-cl" in args.modes):
        parser.error(f"--modes takes {', '.join(MODES)} (tf32 only on CUDA)")
    args.batch_size = args.batch_size or (16 if cpu else 128)
    args.warmup = 1 if cpu and args.warmup is None else 5 if args.warmup is None else args.warmup
    args.iters = args.iters or (2 if cpu else 20)
    args.matmul_size = args.matmul_size or (2048 if cpu else 8192)
    if args.quick:
        args.backbones, args.image_size, args.batch_size = ["resnet18"], 64, 2
        args.warmup, args.iters, args.repeats, args.matmul_size = 1, 1, 1, 256
    return args, device


def main() -> None:
    args, device = parse_args()
    warnings.filterwarnings("ignore")
    machine = harness.describe(device)
    harness.print_machine(machine)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithms, as a throughput run should
    kinds = list(dict.fromkeys(MODES[m].peak for m in args.modes))
    peaks_before = {k: best_matmul_peaks(k, args, device) for k in kinds}
    print(f"matmul peak (n={args.matmul_size} and {2 * args.matmul_size}): {describe_peaks(peaks_before)}")
    print(f"run: batch {args.batch_size}, {args.image_size} px, inference_mode, eval, weights=none, "
          f"{args.warmup} warm-up + {args.repeats} x {args.iters} timed batches per mode\n", flush=True)

    rows: list[dict[str, Any]] = []
    for name in args.backbones:
        flops = flops_per_image(name, args.image_size)
        model = build_backbone(name, weights="none").eval().to(device)
        for mode_name in args.modes:
            mode = MODES[mode_name]
            rates = images_per_s(model, mode, args.batch_size, args.image_size, device, args.warmup, args.iters,
                                 args.repeats)
            rows.append({"backbone": name, "mode": mode_name, "peak_kind": mode.peak, "gflop_per_image": flops / 1e9,
                         "images_per_s_best": max(rates), "images_per_s_median": statistics.median(rates),
                         "images_per_s_all": rates})
            print(f"  {name:<10} {mode_name:<8} {max(rates):9.1f} img/s (best of {len(rates)})", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peaks_after = {k: best_matmul_peaks(k, args, device) for k in kinds}
    peaks = {k: max(*peaks_before[k].values(), *peaks_after[k].values()) for k in kinds}
    report(rows, peaks, peaks_before, peaks_after, args, machine, device)


def describe_peaks(peaks: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{kind}: " + ", ".join(f"{lib} {v / 1e9:,.1f}" for lib, v in libs.items()) + " GFLOP/s"
                     for kind, libs in peaks.items())


def report(rows: list[dict[str, Any]], peaks: dict[str, float], before: dict[str, dict[str, float]],
           after: dict[str, dict[str, float]], args: argparse.Namespace, machine: dict[str, Any],
           device: torch.device) -> None:
    print(f"\nmatmul peak, after the models: {describe_peaks(after)}")
    print("roofline used (best of before and after): " + ", ".join(
        f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"\n{'backbone':<10}{'mode':<9}{'GFLOP/img':>10}{'img/s best':>12}{'img/s median':>14}"
          f"{'GFLOP/s':>10}{'peak GFLOP/s':>14}{'fraction':>10}")
    for row in rows:
        achieved = row["images_per_s_best"] * row["gflop_per_image"] * 1e9
        row["achieved_flop_s"] = achieved
        row["peak_flop_s"] = peaks[row["peak_kind"]]
        row["fraction"] = achieved / peaks[row["peak_kind"]]
        print(f"{row['backbone']:<10}{row['mode']:<9}{row['gflop_per_image']:>10.2f}{row['images_per_s_best']:>12.1f}"
              f"{row['images_per_s_median']:>14.1f}{achieved / 1e9:>10,.1f}{peaks[row['peak_kind']] / 1e9:>14,.1f}"
              f"{row['fraction']:>10.2f}")
    print()
    ratios: dict[str, float] = {}
    targets: dict[str, bool] = {}
    for row in rows:
        ratios[f"{row['backbone']} {row['mode']}"] = row["fraction"]
        print(f"ratio achieved/peak {row['backbone']} {row['mode']}: {row['fraction']:.2f}")
    for name in TARGET_BACKBONES:
        fp32 = [r for r in rows if r["backbone"] == name and r["peak_kind"] == "fp32"]
        if device.type == "cpu" and fp32 and args.image_size == 224:
            best = max(fp32, key=lambda r: r["fraction"])
            targets[f"{name} >= 70% (cpu fp32, 224 px)"] = met = best["fraction"] >= TARGET_FRACTION
            print(f"target {name}: best fp32 mode {best['mode']} reaches {100 * best['fraction']:.0f}% of the matmul "
                  f"roofline (target >= {100 * TARGET_FRACTION:.0f}%: {harness.verdict(met)})")
    harness.write_json(args.json, {
        "benchmark": "roofline", "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "matmul_peak_flop_s": {"used": peaks, "before": before, "after": after},
        "rows": rows, "ratios": ratios, "targets": targets,
    })


if __name__ == "__main__":
    main()
