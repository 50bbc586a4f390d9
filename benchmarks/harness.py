"""The benchmark harness: the machine a number came from, the flags and data every script shares, JSON out.

A ratio means nothing without the hardware it was measured on, so every script prints ``describe()``
first and stores it with its results. Not a benchmark itself; imported by the scripts beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared data folder sits beside the repository (../shared/data), or inside a copy of it (shared/data).
CIFAR_SUBSET_CANDIDATES = (REPO_ROOT.parent / "shared" / "data" / "cifar10-subset.npz",
                           REPO_ROOT / "shared" / "data" / "cifar10-subset.npz")


def cifar_subset() -> Path | None:
    """The real CIFAR-10 subset (see its README), or None where this checkout has no shared data."""
    return next((p for p in CIFAR_SUBSET_CANDIDATES if p.is_file()), None)


@dataclass
class Images:
    """uint8 HWC RGB (or grayscale) arrays with integer labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    source: str


def _first_per_class(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if limit is None:
        return x, y
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:limit] for c in np.unique(y)]))
    return x[keep], y[keep]


def load_images(path: Path | None = None, train_per_class: int | None = None,
                test_per_class: int | None = None) -> Images:
    """The CIFAR-10 subset (real photos), else scikit-learn's 8x8 digits split 80/20 (always available)."""
    if path is not None and not Path(path).is_file():
        raise SystemExit(f"--data {path}: no such file (the CIFAR-10 subset .npz; leave --data out to use "
                         f"../shared/data or fall back to scikit-learn's digits)")
    path = path or cifar_subset()
    if path is not None and Path(path).is_file():
        with np.load(path) as npz:
            x_train, y_train = npz["x_train"], npz["y_train"].astype(np.int64)
            x_test, y_test = npz["x_test"], npz["y_test"].astype(np.int64)
            classes = [str(c) for c in npz["classes"]]
        source = f"CIFAR-10 subset ({Path(path)})"
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        x_train, x_test, y_train, y_test = train_test_split(
            pixels, digits.target.astype(np.int64), test_size=0.2, stratify=digits.target, random_state=0)
        classes = [str(c) for c in digits.target_names]
        source = "scikit-learn digits (8x8; the CIFAR-10 subset was not found)"
    x_train, y_train = _first_per_class(x_train, y_train, train_per_class)
    x_test, y_test = _first_per_class(x_test, y_test, test_per_class)
    return Images(x_train, y_train, x_test, y_test, classes, source)


# glibc malloc hands freed memory back to the OS and takes it again (mmap for large blocks, heap trimming),
# so a training step may page-fault on every fresh activation buffer. How much depends on the heap's
# history: on a 2-core CPU box it moved identical runs' step time by 20-40%, swamping a 5% comparison.
# With a fixed mmap threshold and no trimming, freed memory stays in the process and steps are steady.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def steady_malloc(args: argparse.Namespace) -> None:
    """Re-run this script under ``STEADY_MALLOC`` unless --default-malloc (or the variables are set already)."""
    if args.default_malloc or sys.platform != "linux" or any(k in os.environ for k in STEADY_MALLOC):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **STEADY_MALLOC})


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: above the core count, other work competed for the CPU during a run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "load_average_at_start": load_average(),
        "malloc_env": {k: os.environ.get(k) for k in STEADY_MALLOC},
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import pytorch_lightning

        info["lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu']}, {info['cpu_cores_usable']} usable of {info['cpu_cores_logical']} logical cores, "
          f"{info['torch_threads']} torch threads")
    extra = f", lightning {info['lightning']}" if "lightning" in info else ""
    cuda = f", CUDA {info['cuda']}, cuDNN {info['cudnn']}" if "cuda" in info else ""
    print(f"software: python {info['python']}, torch {info['torch']}{extra}{cuda}")
    print(f"device: {info['device']} = {info['device_name']}")
    malloc = " ".join(f"{k}={v}" for k, v in info["malloc_env"].items() if v is not None)
    print(f"malloc: {malloc or 'glibc defaults (freed memory may be handed back to the OS between steps)'}")
    load = info["load_average_at_start"]
    if load is not None:
        busy = load[0] > 0.5 * info["cpu_cores_usable"]
        print(f"load average (1/5/15 min) at start: {load}"
              + (" (other processes are using these cores: expect noisy timings)" if busy else ""))
    print()


def add_common_args(parser: argparse.ArgumentParser) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default,
                        help=f"where to measure (default here: {default})")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds, numbers meaningless)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc behaviour (default: re-run with memory kept between steps)")


def add_model_data_args(parser: argparse.ArgumentParser, image_size: int) -> None:
    """--backbone, --image-size and --data, the same in every script that runs a backbone on images."""
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--data", type=Path, default=None, help="the CIFAR-10 subset .npz (default: ../shared/data)")


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """The device to measure on; also applies --threads and the malloc settings, so describe() reports them."""
    steady_malloc(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers): the work done, whatever the load."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def sync(device: torch.device) -> None:
    """GPU work is asynchronous: read the clock only after it has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], calls: int, repeats: int, device: torch.device, warmup: int) -> float:
    """Best per-call time over ``repeats`` runs of ``calls`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], **payload}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results written to {path}")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def start(device: Any) -> dict[str, Any]:
    """Silence framework logs and warnings, then print and return the machine description."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "finetune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    machine = describe(device)
    print_machine(machine)
    return machine
