"""Frozen stages stay out of checkpoints (rebuilt from their source, fingerprint-checked) and off the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import open_dict

import finetune.run.train as train_module
from finetune.errors import SetupError
from finetune.model.checkpoints import load_module
from finetune.model.frozen_weights import RECORD_KEY
from finetune.model.module import FinetuneModule
from finetune.run.train import train
from tests.conftest import write_image_folder

TINY = ("data.image_size=32", "logger=none", "trainer.max_epochs=2", "data.val_fraction=0.1",
        "data.test_fraction=0.1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, ...]:
    """A small image folder instead of digits, for the tests that count no classes: batch 8, several steps."""
    root = write_image_folder(tmp_path_factory.mktemp("frozen-data") / "images", classes=3, per_class=16)
    return ("data=folder", f"data.root={root}", "data.batch_size=8", "data.num_workers=0", "data.check=false")


def write_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def run(compose_cfg, out: Path, *overrides: str) -> dict:
    cfg = compose_cfg(*TINY, *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return train(cfg)


def checkpoint(summary: dict, name: str = "last.ckpt") -> dict:
    return torch.load(Path(summary["run_dir"]) / "checkpoints" / name, map_location="cpu", weights_only=True)


def test_reference_checkpoints_hold_only_trained_tensors_and_load_like_stored_ones(compose_cfg, tmp_path,
                                                                                   small) -> None:
    weights = write_weights(tmp_path / "frozen.pth", seed=1)
    ref = run(compose_cfg, tmp_path / "ref", *small, f"backbone.weights={weights}")
    stored = run(compose_cfg, tmp_path / "stored", *small, f"backbone.weights={weights}",
                 "checkpoint_frozen_stages=store")

    slim, full = checkpoint(ref), checkpoint(stored)
    assert not [k for k in slim["state_dict"] if k.startswith("backbone.")]  # only the head is left
    assert slim[RECORD_KEY]["stages"] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert len([k for k in full["state_dict"] if k.startswith("backbone.")]) == 120  # resnet18's, fc aside
    slim_mb = (Path(ref["run_dir"]) / "checkpoints" / "last.ckpt").stat().st_size / 2**20
    full_mb = (Path(stored["run_dir"]) / "checkpoints" / "last.ckpt").stat().st_size / 2**20
    assert slim_mb < 1 < 40 < full_mb
    assert ref["test"] == stored["test"]  # same training either way

    a, b = load_module(ref["best_checkpoint"]), load_module(stored["best_checkpoint"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_a_changed_or_missing_weights_file_is_refused_on_load(compose_cfg, tmp_path, small) -> None:
    weights = write_weights(tmp_path / "frozen.pth", seed=1)
    summary = run(compose_cfg, tmp_path / "ref", *small, f"backbone.weights={weights}", "trainer.max_epochs=1")
    write_weights(weights, seed=2)  # same file name, other tensors
    with pytest.raises(SetupError, match=r"differ.*Restore the weights"):
        load_module(summary["best_checkpoint"])
    weights.unlink()
    with pytest.raises(SetupError, match=r"not stored in it.*rebuilt from their weights source"):
        load_module(summary["best_checkpoint"])


def test_cached_training_holds_only_the_head(compose_cfg, tmp_path, monkeypatch) -> None:
    seen: dict[str, object] = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen["params"] = sum(p.numel() for p in pl_module.parameters())
            seen["head"] = sum(p.numel() for p in pl_module.head.parameters())

    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda *a, **k: [*build(*a, **k), Probe()])
    weights = write_weights(tmp_path / "frozen.pth", seed=1)
    summary = run(compose_cfg, tmp_path / "ref", f"backbone.weights={weights}", "trainer.max_epochs=1")
    assert seen["params"] == seen["head"] == 512 * 10 + 10
    assert summary["params_total"] > 11_000_000  # the backbone is back once the run ends
    assert summary["peak_memory_training"]["cpu_rss_bytes"] > 0
    assert summary["peak_memory"]["cpu_rss_bytes"] >= summary["peak_memory_training"]["cpu_rss_bytes"]


def test_detached_prefix_round_trip() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", input_stage=5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.detach_frozen_prefix()
    assert {k for k in module.state_dict()} == {k for k in before if k.startswith("head.")}
    assert module(torch.randn(4, 512)).shape == (4, 3)
    module.input_stage = 0
    with pytest.raises(RuntimeError, match="detached"):
        module(torch.randn(1, 3, 32, 32))
    module.attach_frozen_prefix()
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not module.backbone.stages["stem"].training  # still frozen: BatchNorm in eval


def test_resume_and_ema_fill_left_out_stages_when_the_prefix_is_attached(compose_cfg, tmp_path, small) -> None:
    weights = write_weights(tmp_path / "frozen.pth", seed=1)
    common = (*small, f"backbone.weights={weights}", "strategy=partial_unfreeze", "strategy.unfreeze_last=1",
              "cache.enabled=false", "data.augment=false")
    straight = run(compose_cfg, tmp_path / "straight", *common)
    first = run(compose_cfg, tmp_path / "resumed", *common, "trainer.max_epochs=1")
    assert RECORD_KEY in checkpoint(first)
    (tmp_path / "resumed" / "summary.json").unlink()
    resumed = run(compose_cfg, tmp_path / "resumed", *common, "resume=auto")
    assert resumed["epochs_run"] == straight["epochs_run"] == 2
    a, b = checkpoint(straight)["state_dict"], checkpoint(resumed)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ema = run(compose_cfg, tmp_path / "ema", *common, "regularization.ema_decay=0.5")
    saved = json.loads((tmp_path / "ema" / "summary.json").read_text())
    assert saved["test"] == ema["test"] and load_module(ema["best_checkpoint"]) is not None


def test_bf16_true_runs_and_relative_weights_paths_load_anywhere(compose_cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_weights(tmp_path / "frozen.pth", seed=1)
    summary = run(compose_cfg, tmp_path / "bf16", "backbone.weights=frozen.pth", "strategy=partial_unfreeze",
                  "strategy.unfreeze_last=1", "cache.enabled=false", "trainer.precision=bf16-true",
                  "trainer.max_epochs=1")
    assert checkpoint(summary)[RECORD_KEY]["weights"] == str(tmp_path / "frozen.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    module = load_module(Path(summary["run_dir"]) / "checkpoints" / "last.ckpt")  # fingerprint as built, not bf16
    assert module(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_linear_probe_checkpoint_references_frozen_stages_too(compose_cfg, tmp_path) -> None:
    weights = write_weights(tmp_path / "frozen.pth", seed=1)
    summary = run(compose_cfg, tmp_path / "probe", f"backbone.weights={weights}", "strategy=linear_probe",
                  "strategy.c_num=2")
    saved = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == {"head.1.weight", "head.1.bias"} and RECORD_KEY in saved
    assert load_module(summary["best_checkpoint"])(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_epoch_sums_stay_float32_under_bf16_weights() -> None:
    module = FinetuneModule("resnet18", num_classes=3, weights="none", input_stage=5).to(torch.bfloat16)
    module.on_train_epoch_start()
    for _ in range(3):
        module.training_step((torch.randn(8, 512, dtype=torch.bfloat16), torch.randint(3, (8,))), 0)
    assert sum(module.epoch_means["train"].sizes) == 24
    loss, acc = module.epoch_means["train"].means()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert 0 <= float(acc) <= 1


def test_epoch_means_weight_each_sample_once() -> None:
    """A short last batch counts by its size: the epoch numbers are per-sample means, as logged before."""
    torch.manual_seed(0)
    module = FinetuneModule("resnet18", num_classes=3, weights="none", input_stage=5).eval()
    batches = [(torch.randn(n, 512), torch.randint(3, (n,))) for n in (8, 8, 3)]
    module.on_train_epoch_start()
    for batch in batches:
        module.training_step(batch, 0)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = module(x)
    loss, acc = module.epoch_means["train"].means()
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, y), atol=1e-6)
    assert float(acc) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
