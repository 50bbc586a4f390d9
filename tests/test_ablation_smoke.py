"""benchmarks/ablation.py runs alone in its --quick mode and prints one table listing its recipes.

The numbers of a quick run mean nothing (1 epoch, 200 images, random-init backbone), so none is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_ablation_prints_table(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from ablation import CAVEAT, QUICK_RECIPES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result_file = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--device", "cpu",
         "--json", str(result_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert out.startswith("machine: "), out[:500]
    assert "torch" in out and CAVEAT in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table and "test acc" in table[0] and "trainable params" in table[0], out[-3000:]
    listed = [line.split("|")[1].strip() for line in table[1:]]
    assert listed == list(QUICK_RECIPES), listed
    assert not any("FAILED" in line for line in table)
    rows = json.loads(result_file.read_text())["rows"]
    assert [r["recipe"] for r in rows] == list(QUICK_RECIPES)
    assert all(r["ok"] and 0.0 <= r["test_acc"] <= 1.0 and r["params_trainable"] > 0 for r in rows)
