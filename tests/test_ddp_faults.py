"""DDP faults on CPU (gloo): a killed rank stops the others within seconds and ``resume=auto`` finishes the
run; the multi-node path (torchrun, 2 nodes x 1 process on 127.0.0.1) trains one run. Slow: minutes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_image_folder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
STOP_WITHIN_S = 60  # Lightning's observer polls every 5 s; gloo's own timeout would be 30 min


def _args(root: Path, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["backbone=resnet18", "backbone.weights=none", "strategy=full_finetune", "data=folder",
            f"data.root={root}", "data.image_size=32", "data.batch_size=2", "data.num_workers=0",
            "data.augment=false", "trainer.max_epochs=3", "trainer.accelerator=cpu", "callbacks.progress_bar=none",
            "logger=none", f"cache.dir={cache}", f"hydra.run.dir={run_dir}", *extra]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank1", "rank0"])
def test_a_killed_rank_stops_the_other_and_resume_finishes(tmp_path: Path, victim: str) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, per_class=16)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    ddp = ("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    cmd = [sys.executable, "-m", "finetune", *_args(root, run_dir, cache, *ddp)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None and last.exists(), "the run should be in its second epoch"
    time.sleep(1.0)  # mid-epoch
    (child,) = [p for p in _children(proc.pid) if "finetune" in Path(f"/proc/{p}/cmdline").read_text()]
    killed, survivor = (child, proc.pid) if victim == "rank1" else (proc.pid, child)
    os.kill(killed, signal.SIGKILL)
    started = time.monotonic()
    while _alive(survivor) and time.monotonic() - started < STOP_WITHIN_S:
        time.sleep(0.5)
    stopped_after = time.monotonic() - started
    if _alive(survivor):
        os.kill(survivor, signal.SIGKILL)
    proc.wait(timeout=30)
    assert stopped_after < STOP_WITHIN_S, f"the surviving rank still ran {STOP_WITHIN_S} s after the kill"
    resumed = subprocess.run([sys.executable, "-m", "finetune", *_args(root, run_dir, cache, *ddp, "resume=auto")],
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["test"]["acc"] > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_one_process_each(tmp_path: Path) -> None:
    """The SLURM/torchrun path beyond one process group on one machine: two 'nodes' rendezvous on 127.0.0.1."""
    root = write_image_folder(tmp_path / "images", classes=3, per_class=16)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    port = _free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "finetune",
               *_args(root, run_dir, cache, "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2",
                      "trainer.max_epochs=2", "strategy=feature_extractor")]
        nodes.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["test"]["acc"] > 0
    assert {p.name for p in Path(summary["feature_cache"]).glob("train.*of2.features.npy")} == {
        "train.0of2.features.npy", "train.1of2.features.npy"}  # each node extracted its own shard
