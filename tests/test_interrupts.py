"""SIGTERM in finetune's own phases (data check, feature extraction) stops at once with the resume hint,
leaves no temp file, and ``resume=auto`` finishes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.errors import Interrupted
from finetune.progress import progress
from finetune.run.interrupts import resume_hint, stop_on_sigterm


@pytest.fixture
def our_handler():
    original = signal.getsignal(signal.SIGTERM)
    stop_on_sigterm()
    yield signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, original)


def test_sigterm_before_fit_stops_at_once(our_handler) -> None:
    with pytest.raises(Interrupted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in the main thread before this ends


def test_under_lightnings_handler_only_our_phases_stop(our_handler) -> None:
    """Lightning wraps the handler it finds during fit and stops its loop at the next batch itself: then ours
    stays out of the way, except inside a phase of ours (the extraction runs inside fit, outside the loop)."""
    calls = []

    def lightning_like(signum, frame):
        calls.append(signum)
        our_handler(signum, frame)

    signal.signal(signal.SIGTERM, lightning_like)
    os.kill(os.getpid(), signal.SIGTERM)  # in the training loop: only the flag
    assert calls == [signal.SIGTERM]
    with pytest.raises(Interrupted), progress("extracting train features", 10):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_the_hint_names_a_checkpoint_only_when_there_is_one(tmp_path: Path) -> None:
    assert "no checkpoint yet" in resume_hint("SIGTERM", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    hint = resume_hint("SIGTERM", tmp_path)
    assert f"a resumable checkpoint is in {tmp_path / 'checkpoints'}" in hint
    assert hint.endswith(f"resume=auto hydra.run.dir={tmp_path}")


def test_sigterm_during_extraction_then_resume(tmp_path: Path) -> None:
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [sys.executable, "-m", "finetune", "backbone.weights=none", "data=digits", "data.image_size=64",
            "data.num_workers=0", "trainer.max_epochs=1", "logger=none", "callbacks.progress_bar=none",
            "cache.batch_size=16", f"cache.dir={cache}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(cache.rglob("*.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its extraction could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and f"resume=auto hydra.run.dir={run_dir}" in err
    assert "Traceback" not in err
    assert list(cache.rglob("*.tmp-*")) == []  # the half-written shard went with the process
    resumed = subprocess.run([*args, "resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "summary.json").is_file()


def test_a_rank_above_zero_dies_with_its_launcher(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a child rank whose launcher is killed with SIGKILL goes too (it would sleep 120 s)."""
    child = ("import time; from finetune.run.interrupts import die_with_launcher; die_with_launcher(); "
             "print('armed', flush=True); time.sleep(120)")
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
                "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", launcher], env={**os.environ, "LOCAL_RANK": "1"},
                              stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "armed"  # the child's line: it imported finetune, set the signal
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), "the child rank outlived its launcher"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"
