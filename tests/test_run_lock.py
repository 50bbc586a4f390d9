"""One run per run directory at a time, and nothing a killed run half-wrote is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import SetupError
from finetune.run.run_dir import LOCK_NAME
from finetune.run.train import train

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""
TINY = ("backbone.weights=none", "data=folder", "data.image_size=32", "data.num_workers=0", "trainer.max_epochs=1",
        "logger=none")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_second_run_in_a_busy_folder_is_refused_naming_the_holder(compose_cfg, image_folder: Path) -> None:
    cfg = compose_cfg(*TINY, f"data.root={image_folder}")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_NAME), "60"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SetupError, match=rf"Another finetune run \(PID {holder.pid}\) is running in {out}"):
            train(cfg)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg)["epochs_run"] == 1  # a killed holder holds nothing: the folder is free again


def test_temp_files_of_a_killed_write_are_removed_at_the_next_start(compose_cfg, image_folder: Path) -> None:
    cfg = compose_cfg(*TINY, f"data.root={image_folder}")
    out = Path(cfg.paths.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    left = [out / "checkpoints" / ".best-epoch03.ckpt.k2j4.tmp", out / ".summary.json.x81.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    train(cfg)
    assert not any(path.exists() for path in left)
    assert not list(out.rglob("*.tmp"))
