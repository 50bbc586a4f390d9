"""A run directory's record is never overwritten; configs are checked before anything heavy runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

import finetune.run.train as train_module
from finetune import config_dir
from finetune.data.features import FeatureDataset, ShardFiles
from finetune.errors import SetupError
from finetune.run.outputs import write_json_atomic
from finetune.run.run_dir import (
    CONFIG_NAME,
    RESULT_NEUTRAL_KEYS,
    Claim,
    claim_run_dir,
    config_differences,
    resolved_config,
    set_aside,
)
from finetune.run.train import build_callbacks, check_config, monitor_mode, train


def finish(cfg, summary: dict | None = None) -> Path:
    """Make cfg's run directory look like a finished run of cfg (what train() leaves behind)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "summary.json").write_text(json.dumps(summary or {"finished_at": "then"}))
    return out


def test_sweep_folder_names_leave_out_only_result_neutral_keys() -> None:
    hydra_cfg = yaml.safe_load((config_dir() / "hydra" / "default.yaml").read_text())
    excluded = hydra_cfg["job"]["config"]["override_dirname"]["exclude_keys"]
    assert "seed" not in excluded and "data.root" not in excluded  # a sweep over them needs one folder per value
    for key in excluded:
        assert any(key == n or key.startswith(f"{n}.") for n in RESULT_NEUTRAL_KEYS), key


def test_finished_run_is_not_overwritten_without_resume(compose_cfg) -> None:
    cfg = compose_cfg("trainer.max_epochs=1")
    out = finish(cfg)
    with pytest.raises(SetupError, match=r"already holds a finished run.*resume=auto"):
        claim_run_dir(cfg, out)
    assert json.loads((out / "summary.json").read_text()) == {"finished_at": "then"}


def test_unfinished_run_with_checkpoints_needs_resume(compose_cfg) -> None:
    cfg = compose_cfg()
    out = Path(cfg.paths.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(SetupError, match=r"unfinished run.*resume=auto"):
        claim_run_dir(cfg, out)
    assert claim_run_dir(compose_cfg("resume=auto"), out) == Claim()


def test_resume_auto_skips_only_a_run_with_the_same_config(compose_cfg) -> None:
    out = finish(compose_cfg("optimizer.lr=0.01", "resume=auto"), {"finished_at": "then"})
    # result-neutral keys may differ (another machine, more workers, no progress bar)
    same = compose_cfg("optimizer.lr=0.01", "resume=auto", "data.num_workers=3", "callbacks.progress_bar=tqdm")
    assert claim_run_dir(same, out).finished == {"finished_at": "then"}
    for override, key in (("optimizer.lr=0.02", "optimizer.lr"), ("seed=7", "seed")):
        with pytest.raises(SetupError, match=rf"another config \({key}: .* there, .* now\)"):
            claim_run_dir(compose_cfg("optimizer.lr=0.01", "resume=auto", override), out)
    assert (out / "summary.json").is_file()


def test_resume_auto_extends_a_finished_run_to_more_epochs(compose_cfg) -> None:
    out = finish(compose_cfg("trainer.max_epochs=2", "resume=auto"), {"epochs_run": 2})
    with pytest.raises(SetupError, match="another config"):
        claim_run_dir(compose_cfg("trainer.max_epochs=1", "resume=auto"), out)  # fewer epochs: not an extension
    with pytest.raises(SetupError, match=r"last\.ckpt is gone"):
        claim_run_dir(compose_cfg("trainer.max_epochs=4", "resume=auto"), out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    claim = claim_run_dir(compose_cfg("trainer.max_epochs=4", "resume=auto"), out)
    assert claim == Claim(extends=out / "summary.json") and (out / "summary.json").is_file()  # deciding writes nothing
    assert set_aside(claim.extends) == out / "summary.until-epoch2.json"
    assert not (out / "summary.json").exists()  # unfinished again until the extension ends ...
    (out / "summary.json").write_text(json.dumps({"epochs_run": 4}))  # ... which ends, and is extended again
    set_aside(out / "summary.json")
    kept = {p.name: json.loads(p.read_text()) for p in out.glob("summary.until-epoch*.json")}
    assert kept == {"summary.until-epoch2.json": {"epochs_run": 2}, "summary.until-epoch4.json": {"epochs_run": 4}}
    assert set_aside(out / "summary.json") is None  # another rank moved it first: nothing to do, no crash


def test_config_keys_added_later_and_a_moved_run_folder_are_no_difference(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("resume=auto")
    stored = resolved_config(cfg)
    del stored["monitor_mode"]  # written by a version without that key
    moved = str(tmp_path / "elsewhere" / "run")
    stored["paths"]["output_dir"] = moved  # the folder was copied here from elsewhere
    stored["callbacks"]["checkpoint"]["dirpath"] = f"{moved}/checkpoints"
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True)
    (out / CONFIG_NAME).write_text(yaml.safe_dump(stored))
    (out / "summary.json").write_text("{}")
    assert config_differences(stored, resolved_config(cfg)) == {}
    assert claim_run_dir(cfg, out).finished == {}
    stored["callbacks"]["checkpoint"]["dirpath"] = "/somewhere/else/checkpoints"  # not inside the run folder
    assert list(config_differences(stored, resolved_config(cfg))) == ["callbacks.checkpoint.dirpath"]


def test_resolved_config_round_trips_unchanged(compose_cfg) -> None:
    cfg = compose_cfg()
    out = finish(cfg)
    assert resolved_config(cfg) == yaml.safe_load((out / CONFIG_NAME).read_text())


@pytest.mark.parametrize(("override", "key"), [
    ("head.dropout=2", "head.dropout"),
    ("loss.label_smoothing=2", "loss.label_smoothing"),
    ("regularization.ema_decay=1.5", "regularization.ema_decay"),
    ("regularization.mixup_alpha=-1", "regularization.mixup_alpha"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("optimizer.layer_decay=0", "optimizer.layer_decay"),
    ("optimizer.fused=sometimes", "optimizer.fused"),
    ("cache.dtype=int8", "cache.dtype"),
    ("cache.dtype=bfloat16", "cache.dtype"),
    ("trainer.precision=foo", "trainer.precision"),
    ("data.num_workers=-3", "data.num_workers"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("monitor=val/accuracy", "monitor"),
    ("monitor_mode=biggest", "monitor_mode"),
])
def test_bad_values_are_refused_before_training(compose_cfg, override: str, key: str) -> None:
    with pytest.raises(SetupError, match=rf"^{key}="):
        check_config(compose_cfg(override))


def test_good_values_pass(compose_cfg) -> None:
    check_config(compose_cfg("trainer.precision=bf16-mixed", "data.num_workers=2", "cache.dtype=float16",
                             "regularization.ema_decay=0.999", "monitor=val/loss", "trainer.max_epochs=-1",
                             "optimizer.fused=false"))
    check_config(compose_cfg("trainer.precision=null", "monitor=train/acc"))  # null: Lightning's default


def test_loss_monitor_keeps_the_lowest_and_sweep_direction_must_agree(compose_cfg, monkeypatch) -> None:
    cfg = compose_cfg("monitor=val/loss")
    assert monitor_mode(cfg) == "min" and monitor_mode(compose_cfg()) == "max"
    checkpoint = build_callbacks(cfg)[0]
    assert checkpoint.monitor == "val/loss" and checkpoint.mode == "min"
    monkeypatch.setattr(train_module, "sweep_direction", lambda: "maximize")
    with pytest.raises(SetupError, match=r"hydra\.sweeper\.direction=minimize"):
        check_config(cfg)
    check_config(compose_cfg())  # val/acc with maximize is fine


def test_loss_monitor_picks_the_epoch_with_the_lowest_val_loss(compose_cfg) -> None:
    summary = train(compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=3",
                                "monitor=val/loss", "optimizer.lr=0.05"))
    rows = [line.split(",") for line in (Path(summary["run_dir"]) / "csv" / "metrics.csv").read_text().splitlines()]
    column = rows[0].index("val/loss")
    losses = [float(r[column]) for r in rows[1:] if r[column]]
    assert len(losses) == 3 and summary["best_val_metric"] == pytest.approx(min(losses))


def test_damaged_feature_cache_names_the_folder_to_delete(tmp_path: Path) -> None:
    files = ShardFiles(tmp_path / "train.0of1.features.npy", tmp_path / "train.0of1.labels.npy")
    np.save(files.features, np.zeros((64, 16), dtype=np.float32))
    np.save(files.labels, np.zeros(64, dtype=np.int64))
    assert len(FeatureDataset(files)) == 64
    os.truncate(files.features, 1000)
    with pytest.raises(SetupError, match=r"damaged.*Delete that folder"):
        FeatureDataset(files)


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
