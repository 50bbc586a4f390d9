"""The VGG-vs-ResNet study notebook runs top to bottom on a tiny configuration and leaves its files.

The parameters cell is overridden papermill-style (a cell injected after the one tagged
``parameters``), and the notebook runs in a kernel whose spec is written into a temporary
JUPYTER_PATH pointing at this interpreter, so the kernel imports the finetune under test even where
another ``python3`` kernel spec (user-wide, system-wide) would resolve to a different Python.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "vgg_vs_resnet.ipynb"
KERNEL_NAME = "finetune-test-python"

TINY = {
    "BACKBONES": ["resnet18", "vgg11"],
    "STRATEGIES": ["feature_extractor", "partial_unfreeze"],
    "IMAGE_SIZE": 32,
    "BATCH": 2,
    "STEPS": 1,
    "EPOCHS": 1,
    "WEIGHTS": "none",
    # One batch per split, and no feature cache: caching runs the frozen prefix over all 1,797 digits,
    # and at batch 2 that alone takes minutes for vgg11's fc6-fc7 on a CPU.
    "OVERRIDES": [
        "cache.enabled=false",
        "strategy.unfreeze_last=1",  # fc7 (16.8 M) trains, not fc6 + fc7 (119.6 M): checkpoints of 0.2 GB, not 2 GB
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    ],
}


def inject_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> None:
    """Insert an assignment cell right after the ``parameters`` cell, as papermill does."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec for sys.executable, found first because JUPYTER_PATH leads the search path."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "finetune tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # one intra-op thread in the kernel: at batch 2 and 32 px a second one costs more than it gives
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return KERNEL_NAME


def test_notebook_runs_on_a_tiny_configuration(tmp_path: Path, kernel_env: str) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells), "commit the notebook with its outputs cleared"
    out = tmp_path / "study"
    inject_parameters(nb, {**TINY, "OUT": str(out)})
    workdir = tmp_path / "work"
    workdir.mkdir()

    client = NotebookClient(nb, kernel_name=kernel_env, timeout=600, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()  # raises CellExecutionError, with the failing cell's traceback, on any error

        assert (out / "report.csv").is_file()
        assert (out / "comparison.csv").is_file()
        summaries = [json.loads(path.read_text()) for path in (out / "runs").rglob("summary.json")]
        assert len(summaries) == 4
        assert {(s["backbone"], s["strategy"]) for s in summaries} == {
            (b, s) for b in TINY["BACKBONES"] for s in TINY["STRATEGIES"]
        }
        assert not any(workdir.iterdir()), "the notebook must write under OUT only"
    finally:
        # vgg11's checkpoints alone are ~4 GB; pytest keeps the temp folders of the last three sessions.
        for folder in out.glob("runs/*/checkpoints"):
            shutil.rmtree(folder, ignore_errors=True)
