"""benchmarks/: every script runs alone in its --quick mode, prints its ratio lines and writes its JSON.

The numbers of a quick run mean nothing (tiny sizes, a shared machine), so none is asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cache_speedup.py", "framework_overhead.py", "roofline.py", "decode_pipeline.py", "feed_rate.py",
           "optimizer_step.py", "resident_loop.py")


def run_quick(script: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, dict]:
    """Run a benchmark script in --quick mode on the CPU; its stdout and its JSON result."""
    result_file = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--device", "cpu", "--json", str(result_file),
         *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(result_file.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_prints_ratios(script: str, tmp_path: Path) -> None:
    stdout, result = run_quick(script, tmp_path)
    assert stdout.startswith("machine: "), stdout[:500]
    ratio_lines = re.findall(r"^ratio .+: \d+\.\d+", stdout, re.MULTILINE)
    assert ratio_lines, stdout[-2000:]
    assert result["machine"]["torch"] and result["ratios"]
    assert all(isinstance(v, float) for v in result["ratios"].values())


@pytest.mark.slow
def test_cache_fidelity_quick_mode_finds_cpu_features_identical(tmp_path: Path) -> None:
    results = run_quick("cache_fidelity.py", tmp_path)[1]["results"]
    assert all(0 <= row["rel_to_spread"] < 1e-4 for row in results.values())
    # on CPU the cache's extraction and the uncached training path compute the very same features
    assert results["cache vs uncached | tf32=False"]["rel_to_spread"] == 0.0


def _benchmark_harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import harness
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return harness


@pytest.mark.parametrize("loop", ["cache.resident=false", "cache.steps_per_block=2"])
def test_cached_training_step_makes_a_gpu_wait_only_for_the_periodic_nan_check(tmp_path: Path, loop: str) -> None:
    """Per step, no host read of a device value (a GPU sync) besides FiniteLoss's one read every 10 steps; read
    per batch from the cache files, or resident in blocks of several steps (fewer kernels: no per-step copy)."""
    # The counts are exact whatever the data, threads or malloc: a subset of the script's own data (64 train
    # images a class, val split off: 18 steps an epoch at batch 32, so the same 10 counted as on all 5,085), one thread,
    # and the steady-malloc variables set already (the script would otherwise start itself a second time).
    harness = _benchmark_harness()
    images = harness.load_images(None, 64, 4)
    subset = tmp_path / "subset.npz"
    np.savez(subset, x_train=images.x_train, y_train=images.y_train, x_test=images.x_test, y_test=images.y_test,
             classes=np.array(images.classes))
    stdout, result = run_quick("step_ops.py", tmp_path, "--data", str(subset), "--threads", "1",
                               "--override", loop, env=harness.STEADY_MALLOC)
    assert "10 steps counted" in stdout, stdout[-2000:]
    per_step = result["per_step"]
    assert per_step["host_reads_waiting_for_gpu"] <= 0.1 + 1e-9, per_step
    assert 0 < per_step["kernels"] < 40, per_step  # 42 before the NaN check and epoch sums left the step
