"""Recipe ablation: training recipes side by side on the same data, seed, epochs and input pipeline.

    python benchmarks/ablation.py --data digits --epochs 5
    python benchmarks/ablation.py --data cifar --epochs 4 --max-train 2000
    python benchmarks/ablation.py --quick                       # smoke: 1 epoch, 3 recipes, digits subset

Every recipe is a list of Hydra overrides (RECIPES below) on top of the same base overrides; each runs
``finetune.run.train.train`` in its own child process (so peak memory is that recipe's own, not the
maximum of all runs before it) with its own feature cache (so a cached recipe pays its extraction).
One table comes out: test accuracy, mean per-class accuracy, best val accuracy, wall time (train() in the
child), CPU time (the child process's user+system seconds: less sensitive to other load on a shared machine),
peak memory, trainable parameters at the end of training, and the test-accuracy delta against the baseline.

By default the backbone starts from random init (backbone.weights=none, offline), which measures recipes
*without* transfer: recipes made for pretrained backbones (a frozen feature extractor, layer-wise LR decay)
rank differently with real weights. ``--backbone squeezenet1_1 --weights ../shared/data/squeezenet1_1-imagenet.pth``
measures real ImageNet transfer with the one pretrained CNN these machines have.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_CANDIDATES = (REPO_ROOT.parent / "shared" / "data" / "cifar10-subset.npz",
                    REPO_ROOT / "shared" / "data" / "cifar10-subset.npz")

# name -> Hydra overrides. "{milestones}" is filled with stage milestones spread over --epochs.
RECIPES: dict[str, list[str]] = {
    "feature_extractor": ["strategy=feature_extractor", "cache.enabled=auto"],
    "linear_probe": ["strategy=linear_probe"],
    "partial_unfreeze": ["strategy=partial_unfreeze", "strategy.unfreeze_last=2"],
    "full_finetune": ["strategy=full_finetune"],
    "full_finetune+label_smoothing": ["strategy=full_finetune", "loss.label_smoothing=0.1"],
    "full_finetune+mixup": ["strategy=full_finetune", "regularization.mixup_alpha=0.2"],
    "full_finetune+ema": ["strategy=full_finetune", "regularization.ema_decay=0.99"],
    "gradual_unfreeze": ["strategy=gradual_unfreeze", "strategy.milestones={milestones}"],
    "freeze_then_finetune": ["strategy=freeze_then_finetune", "strategy.freeze_epochs=1"],
    "freeze_then_finetune+layer_decay": ["strategy=freeze_then_finetune", "strategy.freeze_epochs=1",
                                         "optimizer.layer_decay=0.7"],
    "full_finetune+class_weights": ["strategy=full_finetune", "loss.class_weights=auto"],
    "full_finetune+tta_hflip": ["strategy=full_finetune", "regularization.tta_hflip=true"],
}
BASELINE = "feature_extractor"
QUICK_RECIPES = ("feature_extractor", "linear_probe", "full_finetune")
QUICK_MAX_TRAIN = 200
CAVEAT = ("caveat: backbone.weights=none (offline, no ImageNet weights): random-init backbone, no ImageNet "
          "transfer; recipes designed for pretrained backbones may rank differently with real weights.")


# ----------------------------------------------------------------------------------------------- machine


def machine(device: str, threads: int | None = None) -> dict[str, Any]:
    import pytorch_lightning
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_cores_logical": os.cpu_count(), "cpu_cores_usable": usable,
        "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__,
        "lightning": pytorch_lightning.__version__, "python": platform.python_version(), "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({cpu_model()})",
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_at_start"] = None
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['cpu']}, {info['cpu_cores_usable']} usable of {info['cpu_cores_logical']} logical cores, "
          f"{info['torch_threads']} torch threads")
    print(f"software: python {info['python']}, torch {info['torch']}, lightning {info['lightning']}")
    print(f"device: {info['device']} = {info['device_name']}")
    load = info["load_average_at_start"]
    if load is not None:
        busy = load[0] > 0.5 * (info["cpu_cores_usable"] or 1)
        print(f"load average (1/5/15 min) at start: {load}"
              + (" (other processes share these cores: wall times are noisy)" if busy else ""))


# -------------------------------------------------------------------------------------------------- data


def cifar_subset() -> Path | None:
    return next((p for p in CIFAR_CANDIDATES if p.is_file()), None)


def stratified_take(y: Any, n: int | None, seed: int) -> Any:
    """Indices of a stratified random subset of size n (all indices when n is None or >= len(y))."""
    import numpy as np

    if n is None or n >= len(y):
        return np.arange(len(y))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(keep)


def write_tree(root: Path, splits: dict[str, tuple[Any, Any]], classes: list[str]) -> None:
    """An ImageFolder tree root/{train,val,test}/<class>/NNNNN.png."""
    from PIL import Image

    for split, (x, y) in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            Image.fromarray(pixels).save(root / split / classes[int(label)] / f"{i:05d}.png")


def prepare_data(args: argparse.Namespace, workdir: Path) -> tuple[list[str], str]:
    """Base data overrides shared by every recipe, and a line saying what the data is."""
    import numpy as np

    if args.data == "cifar":
        path = cifar_subset()
        if path is None:
            print("note: the CIFAR-10 subset (../shared/data/cifar10-subset.npz) is absent; using digits instead.")
            args.data = "digits"
    if args.data == "digits" and args.max_train is None:
        return ["data=digits"], "scikit-learn digits (8x8 upscaled), data=digits splits 70/15/15 (split_seed 0)"

    if args.data == "digits":
        from omegaconf import OmegaConf

        from finetune.data.datasets import dataset_labels, load_digits_splits

        digit_splits = load_digits_splits(OmegaConf.create({"val_fraction": 0.15, "test_fraction": 0.15,
                                                            "split_seed": 0}))
        arrays = {name: (np.stack([np.asarray(im) for im, _ in ds]), np.asarray(dataset_labels(ds)))
                  for name in ("train", "val", "test") for ds in [getattr(digit_splits, name)]}
        classes = list(digit_splits.classes)
        source = "scikit-learn digits (data=digits splits)"
    else:
        with np.load(path) as npz:
            x_train, y_train = npz["x_train"], npz["y_train"].astype(np.int64)
            x_test, y_test = npz["x_test"], npz["y_test"].astype(np.int64)
            classes = [str(c) for c in npz["classes"]]
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(np.arange(len(y_train)), test_size=0.1, stratify=y_train, random_state=0)
        arrays = {"train": (x_train[tr], y_train[tr]), "val": (x_train[va], y_train[va]), "test": (x_test, y_test)}
        source = f"CIFAR-10 subset ({path}; val = stratified 10% of its train)"
    keep = stratified_take(arrays["train"][1], args.max_train, args.seed)
    arrays["train"] = (arrays["train"][0][keep], arrays["train"][1][keep])
    root = workdir / "images"
    write_tree(root, arrays, classes)
    sizes = ", ".join(f"{k} {len(v[1])}" for k, v in arrays.items())
    return ["data=folder", f"data.root={root}"], f"{source}; {sizes} images as PNG under a temp ImageFolder tree"


# --------------------------------------------------------------------------------------------- one recipe


def milestones(epochs: int) -> str:
    """One stage more per epoch from epoch 1, the last unfreeze at least an epoch before the end: 5 -> [1,2,3]."""
    return "[" + ",".join(str(e) for e in range(1, max(2, epochs - 1))) + "]"


def recipe_overrides(name: str, epochs: int) -> list[str]:
    return [o.replace("{milestones}", milestones(epochs)) for o in RECIPES[name]]


def run_child(spec_path: Path) -> None:
    """Child-process mode: compose the real config, train one recipe, write its summary."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from hydra import compose, initialize_config_dir

    from finetune import config_dir
    from finetune.run.train import check_config, train

    spec = json.loads(spec_path.read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=spec["overrides"])
    check_config(cfg)
    started = time.perf_counter()
    summary = train(cfg)
    summary["ablation_wall_seconds"] = time.perf_counter() - started
    Path(spec["result"]).write_text(json.dumps(summary, default=str))


def children_cpu_seconds() -> float:
    """User + system CPU time of finished child processes: the work a recipe did, less sensitive to other load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_recipe(name: str, base: list[str], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    run_dir = workdir / "runs" / name
    shutil.rmtree(run_dir / "out", ignore_errors=True)  # a kept --keep folder: the recipe runs anew
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        *base, *recipe_overrides(name, args.epochs),
        f"paths.output_dir={run_dir / 'out'}",
        f"paths.cache_dir={run_dir / 'cache'}",  # own cache: a cached recipe pays its feature extraction
    ]
    spec = {"overrides": overrides, "result": str(run_dir / "summary.json"), "threads": args.threads}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")],
                          env=env, capture_output=not args.verbose, text=True, cwd=str(run_dir))
    process_seconds, cpu_seconds = time.perf_counter() - started, children_cpu_seconds() - cpu_before
    row: dict[str, Any] = {"recipe": name, "overrides": recipe_overrides(name, args.epochs),
                           "process_seconds": round(process_seconds, 2), "cpu_seconds": round(cpu_seconds, 1),
                           "ok": proc.returncode == 0}
    if proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-3000:]
        print(f"  {name}: FAILED (exit {proc.returncode})\n{tail}", file=sys.stderr)
        row["error"] = tail
        return row
    summary = json.loads((run_dir / "summary.json").read_text())
    test, memory = summary.get("test", {}), summary.get("peak_memory") or {}
    cuda = memory.get("cuda_max_allocated_bytes")
    row.update({
        "test_acc": test.get("acc"), "test_mean_class_acc": test.get("mean_class_acc"),
        "best_val": summary.get("best_val_metric"), "monitor": summary.get("monitor"),
        "wall_seconds": summary["wall_seconds"].get("total"), "wall_split": summary["wall_seconds"],
        "peak_memory_mb": (cuda if args.device == "cuda" and cuda else memory.get("cpu_rss_bytes", 0)) / 2**20,
        "peak_memory_kind": "cuda max allocated" if args.device == "cuda" and cuda else "process RSS",
        "params_trainable": summary.get("params_trainable"), "params_total": summary.get("params_total"),
        "epochs_run": summary.get("epochs_run"), "augment": summary.get("augment"),
        "feature_cache": bool(summary.get("feature_cache")), "unfreeze_events": summary.get("unfreeze_events"),
        "device": summary.get("device"),
    })
    print(f"  {name}: test acc {row['test_acc']:.4f}, {row['wall_seconds']:.1f} s", flush=True)
    return row


# ------------------------------------------------------------------------------------------------- table


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def table(rows: list[dict[str, Any]], reference: str | None, mem_label: str) -> str:
    ref = next((r for r in rows if r["recipe"] == reference and r["ok"]), None)
    head = ["recipe", "test acc %", "mean per-class acc %", "best val %", f"Δ test acc vs {reference} (pp)",
            "wall s", "CPU s", f"peak mem MB ({mem_label})", "trainable params (end)", "cached"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['recipe']} | FAILED |" + " |" * (len(head) - 2))
            continue
        delta = "-" if ref is None else f"{100 * (r['test_acc'] - ref['test_acc']):+.2f}"
        val = "-" if r["best_val"] is None else f"{100 * r['best_val']:.2f}"
        lines.append(
            f"| {r['recipe']} | {fmt_pct(r['test_acc'])} | {fmt_pct(r['test_mean_class_acc'])} | {val} | {delta} | "
            f"{r['wall_seconds']:.1f} | {r['cpu_seconds']:.0f} | {r['peak_memory_mb']:.0f} | "
            f"{r['params_trainable']:,} | {'yes' if r['feature_cache'] else 'no'} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "cifar"), default="digits",
                        help="digits: scikit-learn 8x8 digits; cifar: the real CIFAR-10 subset in ../shared/data")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="none", metavar="none|imagenet|FILE",
                        help="backbone.weights for every recipe; e.g. ../shared/data/squeezenet1_1-imagenet.pth with "
                             "--backbone squeezenet1_1: real ImageNet transfer (default none: random init)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="the same seed for every recipe")
    parser.add_argument("--recipes", default=None,
                        help=f"comma list, a subset of: {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--augment", choices=("off", "on", "config"), default="off",
                        help="train augmentation for every recipe: off (default: one input pipeline for all, the "
                             "controlled comparison), on (RandomResizedCrop+flip), config (each strategy's default)")
    parser.add_argument("--max-train", type=int, default=None, metavar="N",
                        help="stratified random subset of N train images (same for every recipe)")
    try:
        import torch

        default_device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        default_device = "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                        help=f"cuda: trainer.accelerator=gpu, precision bf16-mixed (default here: {default_device})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 epoch, {', '.join(QUICK_RECIPES)}, {QUICK_MAX_TRAIN} digits train images")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per run (default: torch's own); 1 gives steadier timings on a "
                             "machine whose cores other jobs share")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep run directories (summary.json, checkpoints) under DIR instead of a temp dir")
    parser.add_argument("--verbose", action="store_true", help="show each run's Lightning output")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.data = 1, "digits"
        args.max_train = args.max_train or QUICK_MAX_TRAIN
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
    names = list(RECIPES) if not args.recipes else [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from: {', '.join(RECIPES)}")
    args.recipe_names = names
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.child is None and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    return args


def weights_override(weights: str) -> str:
    """none / imagenet as given; a file as an absolute path (children run elsewhere)."""
    return weights if weights in ("none", "imagenet") else str(Path(weights).expanduser().resolve())


def base_overrides(args: argparse.Namespace, data: list[str]) -> list[str]:
    device = (["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed"]
              if args.device == "cuda" else ["trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0"])
    augment = {"off": ["data.augment=false"], "on": ["data.augment=true"], "config": []}[args.augment]
    return [
        *data, f"backbone={args.backbone}", f"backbone.weights={weights_override(args.weights)}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}", f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", *device,
        *augment, "logger=none", "callbacks.progress_bar=none", "trainer.enable_model_summary=false",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        run_child(args.child)
        return 0
    started = time.perf_counter()
    info = machine(args.device, args.threads)
    print_machine(info)
    if args.weights == "none":
        print(CAVEAT)
    with tempfile.TemporaryDirectory(prefix="finetune-ablation-") as tmp:
        workdir = Path(args.keep).expanduser().absolute() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data, source = prepare_data(args, workdir)
        base = base_overrides(args, data)
        print(f"data: {source}")
        print(f"setup: {args.backbone}, image size {args.image_size}, {args.epochs} epoch(s), batch {args.batch_size}, "
              f"seed {args.seed} (same for every recipe), augmentation {args.augment}, device {args.device}")
        print(f"base overrides: {' '.join(o for o in base if not o.startswith('data.root='))}")
        print(f"running {len(args.recipe_names)} recipe(s), each in its own process:", flush=True)
        rows = [run_recipe(name, base, args, workdir) for name in args.recipe_names]
    reference = BASELINE if BASELINE in args.recipe_names else args.recipe_names[0]
    mem_label = "CUDA max allocated" if args.device == "cuda" else "process RSS"
    print()
    print(table(rows, reference, mem_label))
    print("best val: the run's monitor at its best checkpoint (val/acc; linear_probe: val mean per-class acc, on "
          "which it picks C). Pick a recipe on val; test is reported once.")
    print()
    print("recipes (overrides on top of the base):")
    for r in rows:
        print(f"  {r['recipe']}: {' '.join(r['overrides'])}")
    ok = [r for r in rows if r["ok"]]
    if ok:
        best = max(ok, key=lambda r: (r["test_acc"], r["test_mean_class_acc"] or 0.0))
        best_val = max((r for r in ok if r["best_val"] is not None), key=lambda r: r["best_val"], default=None)
        print(f"best test acc: {best['recipe']} ({fmt_pct(best['test_acc'])}%)"
              + (f"; best val ({best_val['monitor']}): {best_val['recipe']} ({fmt_pct(best_val['best_val'])}%)"
                 if best_val else ""))
    total = time.perf_counter() - started
    print(f"total wall time: {total:.1f} s")
    print(CAVEAT if args.weights == "none" else f"weights: {args.weights} (pretrained: this measures transfer)")
    if args.json is not None:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "machine": info,
                                    "data": source, "base_overrides": base, "baseline": reference,
                                    "seed": args.seed, "epochs": args.epochs, "rows": rows,
                                    "total_wall_seconds": total}, indent=2, default=str) + "\n")
        print(f"results written to {path}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
