"""Fault matrix: kill -9 in each phase of a run, resume with ``resume=auto``, compare with an uninterrupted run.

    python benchmarks/fault_matrix.py [--per-class 60] [--epochs 3] [--phases data_check,extraction,...]

One config (resnet18 from a weights file, partial_unfreeze of layer4 over cached layer3 outputs, 32 px, AdamW),
on a small real-photo folder (the CIFAR-10 subset from ../shared/data stored as 96 px JPEGs; scikit-learn's
digits without it). For each phase the run is started, SIGKILLed when the phase is under way, and resumed;
each row says whether the resumed run ends bit-identical to the straight one (every tensor of last.ckpt, the
test metrics) and whether a temp file was left anywhere in the run or cache folder after the resume.

Phases and how each is caught: data_check and extraction by their progress lines (FINETUNE_PROGRESS_EVERY_S=0
prints one per batch); mid_epoch when epoch 0's last.ckpt exists; checkpoint_write when a checkpoint's temp
file exists; test when the run says it restores the best checkpoint for the test.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
import torch
import torchvision
from cache_speedup import write_image_tree

PHASES = ("data_check", "extraction", "mid_epoch", "checkpoint_write", "test")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "FINETUNE_PROGRESS_EVERY_S": "0", "OMP_NUM_THREADS": "2"}


def run_args(data: Path, weights: Path, run_dir: Path, cache: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "backbone=resnet18", f"backbone.weights={weights}",
            "strategy=partial_unfreeze", "strategy.unfreeze_last=1", "data=folder", f"data.root={data}",
            "data.image_size=32", "data.batch_size=16", "data.num_workers=0", "data.augment=false",
            f"trainer.max_epochs={epochs}", "logger=none", "trainer.accelerator=cpu",
            f"cache.dir={cache}", f"hydra.run.dir={run_dir}", *extra]


def temp_files(*folders: Path) -> list[Path]:
    """Every temp-file pattern finetune writes: ``<name>.tmp-<host>-<pid>`` (cache) and ``.<name>.*.tmp`` (atomic)."""
    return sorted(p for folder in folders if folder.exists() for p in folder.rglob("*")
                  if ".tmp-" in p.name or (p.name.startswith(".") and p.name.endswith(".tmp")))


def ckpt_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:
        return None


def trigger(phase: str, run_dir: Path) -> Callable[[str], bool]:
    """A test on each output line (and on the folder between lines): is the phase under way now?"""
    checkpoints = run_dir / "checkpoints"
    if phase == "data_check":
        return lambda line: "checking images: " in line and "/" in line.split("checking images: ")[1][:12]
    if phase == "extraction":
        return lambda line: "extracting train features: " in line and " in " not in line
    if phase == "mid_epoch":  # 0.3 s into epoch 1
        seen: list[float] = []

        def in_epoch_1(line: str) -> bool:
            if not seen and (checkpoints / "last.ckpt").exists() and ckpt_epoch(checkpoints / "last.ckpt") == 0:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] > 0.3

        return in_epoch_1
    if phase == "checkpoint_write":
        return lambda line: checkpoints.exists() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir())
    if phase == "test":
        return lambda line: "Restoring states from the checkpoint path" in line
    raise ValueError(phase)


def run_and_kill(cmd: list[str], caught: Callable[[str], bool], timeout: float = 600) -> tuple[bool, float]:
    """Start ``cmd``; SIGKILL it as soon as ``caught`` says so. (killed?, seconds from start)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while time.monotonic() - started < timeout:
        try:
            line = lines.get(timeout=0.005)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if caught(line):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, time.monotonic() - started
    proc.wait()
    return False, time.monotonic() - started


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return last, json.loads((run_dir / "summary.json").read_text())["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=60, help="train images per class (test: a third)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    harness.print_machine(harness.describe(torch.device("cpu")))
    images = harness.load_images(train_per_class=args.per_class, test_per_class=max(1, args.per_class // 3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        counts = write_image_tree(images, work / "data", stored_size=96, stored_format="jpeg")
        print(f"data: {images.source}, {counts} images stored as 96 px JPEGs; {args.epochs} epochs")
        weights = work / "resnet18.pth"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), weights)
        straight_dir = work / "straight"
        done = subprocess.run(run_args(work / "data", weights, straight_dir, work / "cache-straight", args.epochs),
                              env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        reference, reference_test = final_state(straight_dir)
        print(f"{'phase':<17} {'killed at':>9} {'resume rc':>9} {'weights':>10} {'test':>10} {'temp left':>9}")
        for phase in args.phases.split(","):
            run_dir, cache = work / phase, work / f"cache-{phase}"
            cmd = run_args(work / "data", weights, run_dir, cache, args.epochs)
            killed, at = run_and_kill(cmd, trigger(phase, run_dir))
            resumed = subprocess.run([*cmd, "resume=auto"], env=ENV, capture_output=True, text=True, timeout=900)
            row = {"phase": phase, "killed": killed, "killed_at_s": round(at, 1), "resume_rc": resumed.returncode}
            if resumed.returncode == 0:
                state, test = final_state(run_dir)
                row["identical_weights"] = state.keys() == reference.keys() and all(
                    torch.equal(state[k], reference[k]) for k in reference)
                row["identical_test"] = test == reference_test
            row["temp_files_left"] = [str(p) for p in temp_files(run_dir, cache)]
            rows.append(row)
            print(f"{phase:<17} {(f'{at:.1f} s' if killed else 'not hit'):>9} {resumed.returncode:>9} "
                  f"{row.get('identical_weights', '-')!s:>10} {row.get('identical_test', '-')!s:>10} "
                  f"{len(row['temp_files_left']):>9}", flush=True)
            if resumed.returncode != 0:
                print(resumed.stderr[-2000:])
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    ok = all(r["killed"] and r["resume_rc"] == 0 and r.get("identical_weights") and r.get("identical_test")
             and not r["temp_files_left"] for r in rows)
    print("every phase resumed bit-identical, no temp file left" if ok else "NOT every phase recovered: see above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
