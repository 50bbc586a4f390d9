"""What a CPU optimizer step costs beyond the math: a fused optimizer kernel, and no NVML probe per step."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from finetune.model.module import use_fused
from finetune.run import cuda_check
from finetune.run.train import train
from tests.conftest import own_dir, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _groups(*params: torch.Tensor) -> list[dict]:
    return [{"params": list(params)}]


def test_auto_fuses_the_optimizer_on_one_device_kind() -> None:
    cpu = torch.nn.Parameter(torch.zeros(2))
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert use_fused("auto", _groups(cpu)) is True  # CPU: one kernel instead of a Python loop over parameters
    assert use_fused("auto", _groups(cpu, meta)) is None  # mixed devices: torch's default
    assert use_fused("auto", _groups()) is None
    assert use_fused("auto", _groups(cpu), clips_under_amp=True) is None  # Lightning refuses to clip a fused one
    assert use_fused("false", _groups(cpu)) is None
    assert use_fused("true", _groups(cpu)) is True


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_default_cpu_run_steps_a_fused_optimizer(compose_cfg, tmp_path: Path, optimizer: str) -> None:
    """The optimizer a CPU run trained with (its state in last.ckpt) is the fused one; fused=false keeps torch's."""
    folder = write_image_folder(tmp_path / "images", classes=2, per_class=6)
    groups = {}
    for fused in ("auto", "false"):
        cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={folder}", "data.image_size=32",
                          "data.batch_size=4", "data.num_workers=0", "strategy=feature_extractor",
                          "trainer.max_epochs=1", f"optimizer={optimizer}", f"optimizer.fused={fused}")
        with open_dict(cfg):
            cfg.callbacks.progress_bar = "none"
        run = Path(train(own_dir(cfg, f"{optimizer}-{fused}"))["run_dir"])
        last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        groups[fused] = last["optimizer_states"][0]["param_groups"]
    assert groups["auto"] and all(g["fused"] is True for g in groups["auto"])
    assert all(not g["fused"] for g in groups["false"])


def test_the_nvml_check_is_dropped_only_where_nvml_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1; without libnvidia-ml every torch.cuda.is_available() (one
    per optimizer step) then tries to load it and falls back to the runtime's answer, so the variable goes."""
    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setenv(cuda_check.NVML_CHECK_VARIABLE, "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a machine with the NVIDIA driver
    assert cuda_check.drop_nvml_check_without_nvml() is False
    assert cuda_check.NVML_CHECK_VARIABLE in os.environ
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert cuda_check.drop_nvml_check_without_nvml() is True
    assert cuda_check.NVML_CHECK_VARIABLE not in os.environ
    assert cuda_check.drop_nvml_check_without_nvml() is False  # unset: nothing to do
    monkeypatch.setenv(cuda_check.NVML_CHECK_VARIABLE, "0")
    assert cuda_check.drop_nvml_check_without_nvml() is False  # the user's own choice stays


def test_training_leaves_no_nvml_probe_where_there_is_no_nvml(compose_cfg, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if cuda_check.nvml_loads():
        pytest.skip("this machine has NVML: the variable stays as Lightning set it")
    monkeypatch.setenv(cuda_check.NVML_CHECK_VARIABLE, "1")  # as importing Lightning left it
    folder = write_image_folder(tmp_path / "images", classes=2, per_class=4)
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={folder}", "data.image_size=32",
                      "data.batch_size=4", "data.num_workers=0", "strategy=feature_extractor", "trainer.max_epochs=1")
    train(own_dir(cfg, "nvml"))
    assert cuda_check.NVML_CHECK_VARIABLE not in os.environ
