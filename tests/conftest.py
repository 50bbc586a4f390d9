"""Shared fixtures: the real Hydra config, shrunk for CPU tests, and tiny image folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

import finetune.config.schema  # noqa: F401  (registers the schema conf/config.yaml starts from)
from finetune import config_dir

ROOT = Path(__file__).resolve().parents[1]
# What a checkout may hold besides tracked files: the venv, caches of tools (not of finetune)
EXPECTED = (".venv", ".ruff_cache", ".pytest_cache", "__pycache__", ".egg-info", ".whl", ".gl")


def _untracked(root: Path) -> set[str]:
    """Untracked files and folders, ignored ones included (``.cache/`` is ignored, and must still not appear)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"], cwd=root,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    paths = {line[3:].strip() for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in p for part in EXPECTED)}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """The suite leaves the checkout as it found it: every path a test writes is under tmp_path."""
    before = _untracked(ROOT)
    yield
    new = sorted(_untracked(ROOT) - before)
    assert not new, f"the test suite wrote into the checkout: {new}"


@pytest.fixture
def one_torch_thread():
    """Training at 32 px in this process: handing tiny ops between threads costs more than it saves (5-10x on a
    busy 2-core machine). Subprocesses get the same through OMP_NUM_THREADS=1 in their environment."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/ exactly as `python -m finetune` does, plus test overrides, output in tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            cfg.callbacks.progress_bar = "none"
            if "trainer.accelerator" not in " ".join(overrides):
                cfg.trainer.accelerator = "cpu"
                cfg.trainer.devices = 1
        return cfg

    return _compose


def own_dir(cfg: DictConfig, name: str) -> DictConfig:
    """Give a composed config its own run directory next to the fixture's: a finished run is never overwritten."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / name)
    return cfg


def write_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Class-dependent colour blobs: learnable in a few steps, written as real JPEG/PNG files."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.zeros(3)
        base[c % 3] = 200
        for i in range(per_class):
            noise = rng.normal(0, 25, size=(size, size, 3))
            pixels = np.clip(base + 30 + noise, 0, 255).astype(np.uint8)
            if c >= 3:  # more classes than channels: add stripes
                pixels[:: (c % 4) + 2] = 255
            ext = "png" if i % 4 == 0 else "jpg"
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def kill_resume_and_compare(args: Callable[..., list[str]], tmp_path: Path, env: dict[str, str],
                            kill_after_epoch: int, settle: float = 0.0) -> tuple[Path, Path]:
    """Run once straight; run again, SIGKILL it once epoch N's last.ckpt exists (+``settle`` s, i.e. inside
    the next epoch), resume with resume=auto; assert both end with bit-identical weights.

    The straight run goes on beside the other two (each a single-threaded process with OMP_NUM_THREADS=1 in
    ``env``, so a 2-core machine runs both at once); its weights do not depend on what else runs.
    ``args(run_dir, *extra)`` builds the command line. Returns (straight_dir, killed_dir).
    last.ckpt lands after its fsync, on a background thread (``DeferredCommits``): under heavy writeback the
    next epoch can be over before it does. A kill that came too late is tried again, up to 3 runs in all.
    """
    import shutil
    import signal
    import subprocess
    import time

    import torch

    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.stderr" for name in ("straight", "killed")}
    running: list[subprocess.Popen] = []

    def start(name: str, run_dir: Path) -> subprocess.Popen:
        with open(logs[name], "w") as log:  # a file, not a pipe: nobody reads it while the run goes on
            running.append(subprocess.Popen(args(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=log))
        return running[-1]

    straight = start("straight", straight_dir)
    last = killed_dir / "checkpoints" / "last.ckpt"
    try:
        for attempt in range(3):
            proc = start("killed", killed_dir)
            deadline, seen = time.monotonic() + 300, None
            while True:
                try:  # each save replaces the file (atomic rename): read its epoch once per new file, memory-mapped
                    stat = last.stat()
                    version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                    if version != seen:
                        seen = version
                        epoch = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]
                        if epoch >= kill_after_epoch:
                            break
                except FileNotFoundError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (
                    "the run ended before it could be killed: " + logs["killed"].read_text()[-2000:])
                time.sleep(0.05)
            time.sleep(settle)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if torch.load(last, map_location="cpu", weights_only=True)["epoch"] == kill_after_epoch:
                break
            assert attempt < 2, "killed too late in 3 runs"
            shutil.rmtree(killed_dir)
        assert not (killed_dir / "summary.json").exists()

        resumed = subprocess.run(args(killed_dir, "resume=auto"), env=env, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert straight.wait(timeout=600) == 0, logs["straight"].read_text()[-2000:]
    finally:
        for leftover in running:  # a failed assertion leaves no run behind
            if leftover.poll() is None:
                leftover.kill()
                leftover.wait()
    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    return straight_dir, killed_dir


def export_parity(module, size: int, folder: Path, fmt: str) -> tuple[float, float]:
    """Export ``module`` as ``python -m finetune.export`` does (torchscript or onnx) and compare the exported
    model's logits with the module's, as the CLI does: (max abs diff, tolerance)."""
    import torch

    from finetune.cli.export import (
        compare,
        export_onnx,
        export_torchscript,
        inference_network,
        onnx_runner,
        torchscript_runner,
    )

    network = inference_network(module)
    if fmt == "onnx":
        path = folder / "model.onnx"
        export_onnx(network, torch.randn(2, 3, size, size), path)
        run = onnx_runner(path)
    else:
        path = folder / "model.ts"
        export_torchscript(network, path)
        run = torchscript_runner(path)
    return compare(module, run, torch.randn(3, 3, size, size))
