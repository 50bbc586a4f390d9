"""A run directory's record is never overwritten; configs are checked before anything heavy runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from finetune import config_dir
from finetune.atomic import write_json_atomic
from finetune.config.identity import DATA_KEY, result_defining, roles
from finetune.config.schema import NEUTRAL
from finetune.config.typed import to_typed, to_yaml
from finetune.data.features import FeatureDataset, ShardFiles
from finetune.errors import SetupError
from finetune.run.builders import build_callbacks
from finetune.run.run_dir import (
    CONFIG_NAME,
    Claim,
    claim_run_dir,
    set_aside,
    write_identity,
)
from finetune.run.train import train

FINGERPRINT = "files-of-the-data"


def claim(cfg, out: Path, data: str = FINGERPRINT) -> Claim:
    typed = to_typed(cfg)
    return claim_run_dir(typed, out, result_defining(typed, data))


def finish(cfg, summary: dict | None = None, data: str = FINGERPRINT) -> Path:
    """Make cfg's run directory look like a finished run of cfg (what train() leaves behind)."""
    typed = to_typed(cfg)
    out = Path(typed.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(to_yaml(typed))
    write_identity(out, result_defining(typed, data))
    (out / "summary.json").write_text(json.dumps(summary or {"finished_at": "then"}))
    return out


def test_sweep_folder_names_leave_out_only_result_neutral_keys() -> None:
    hydra_cfg = yaml.safe_load((config_dir() / "hydra" / "default.yaml").read_text())
    excluded = hydra_cfg["job"]["config"]["override_dirname"]["exclude_keys"]
    assert "seed" not in excluded and "data.root" not in excluded  # a sweep over them needs one folder per value
    neutral = [key for key, role in roles().items() if role == NEUTRAL]
    for key in excluded:
        assert any(key == n or key.startswith(f"{n}.") for n in neutral), f"{key} is excluded but result-defining"


def test_finished_run_is_not_overwritten_without_resume(compose_cfg) -> None:
    cfg = compose_cfg("trainer.max_epochs=1")
    out = finish(cfg)
    with pytest.raises(SetupError, match=r"already holds a finished run.*resume=auto"):
        claim(cfg, out)
    assert json.loads((out / "summary.json").read_text()) == {"finished_at": "then"}


def test_unfinished_run_with_checkpoints_needs_resume(compose_cfg) -> None:
    cfg = compose_cfg()
    out = Path(cfg.paths.output_dir)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(SetupError, match=r"unfinished run.*resume=auto"):
        claim(cfg, out)
    assert claim(compose_cfg("resume=auto"), out) == Claim()


def test_resume_auto_skips_only_a_run_with_the_same_config_and_data(compose_cfg) -> None:
    out = finish(compose_cfg("optimizer.lr=0.01", "resume=auto"), {"finished_at": "then"})
    # result-neutral keys may differ (another machine, more workers, no progress bar, another cache folder)
    same = compose_cfg("optimizer.lr=0.01", "resume=auto", "data.num_workers=3", "callbacks.progress_bar=tqdm",
                       "trainer.accelerator=cpu", "cache.dir=/elsewhere")
    assert claim(same, out).finished == {"finished_at": "then"}
    for override, key in (("optimizer.lr=0.02", "optimizer.lr"), ("seed=7", "seed"),
                          ("data.image_size=48", "data.image_size"), ("head.dropout=0.1", "head.dropout"),
                          ("data.split_seed=3", "data.split_seed"), ("speed.tf32=false", "speed.tf32")):
        with pytest.raises(SetupError, match=rf"another config or data \({key}: .* there, .* now\)"):
            claim(compose_cfg("optimizer.lr=0.01", "resume=auto", override), out)
    with pytest.raises(SetupError, match=rf"{DATA_KEY}: files-of-the.* there, other-files.* now"):
        claim(compose_cfg("optimizer.lr=0.01", "resume=auto"), out, data="other-files")
    assert (out / "summary.json").is_file()


def test_resume_auto_extends_a_finished_run_to_more_epochs(compose_cfg) -> None:
    out = finish(compose_cfg("trainer.max_epochs=2", "resume=auto"), {"epochs_run": 2})
    with pytest.raises(SetupError, match="another config"):
        claim(compose_cfg("trainer.max_epochs=1", "resume=auto"), out)  # fewer epochs: not an extension
    with pytest.raises(SetupError, match=r"last\.ckpt is gone"):
        claim(compose_cfg("trainer.max_epochs=4", "resume=auto"), out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    claimed = claim(compose_cfg("trainer.max_epochs=4", "resume=auto"), out)
    assert claimed == Claim(extends=out / "summary.json")
    assert (out / "summary.json").is_file()  # deciding writes nothing
    assert set_aside(claimed.extends) == out / "summary.until-epoch2.json"
    assert not (out / "summary.json").exists()  # unfinished again until the extension ends ...
    (out / "summary.json").write_text(json.dumps({"epochs_run": 4}))  # ... which ends, and is extended again
    set_aside(out / "summary.json")
    kept = {p.name: json.loads(p.read_text()) for p in out.glob("summary.until-epoch*.json")}
    assert kept == {"summary.until-epoch2.json": {"epochs_run": 2}, "summary.until-epoch4.json": {"epochs_run": 4}}
    assert set_aside(out / "summary.json") is None  # another rank moved it first: nothing to do, no crash


def test_a_moved_run_folder_is_no_difference_and_a_run_without_identity_is_refused(compose_cfg, tmp_path) -> None:
    out = finish(compose_cfg("resume=auto"))
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    cfg = compose_cfg("resume=auto")
    cfg.paths.output_dir = str(moved)
    assert claim(cfg, moved).finished == {"finished_at": "then"}  # paths are result-neutral
    (moved / "run_identity.json").unlink()
    with pytest.raises(SetupError, match=r"without run_identity\.json"):
        claim(cfg, moved)


def test_resolved_config_round_trips_unchanged(compose_cfg) -> None:
    cfg = compose_cfg()
    out = finish(cfg)
    again = to_typed(OmegaConf.merge(cfg, OmegaConf.load(out / CONFIG_NAME)))
    assert to_yaml(again) == (out / CONFIG_NAME).read_text()


def test_loss_monitor_keeps_the_lowest(compose_cfg) -> None:
    cfg = to_typed(compose_cfg("monitor=val/loss"))
    assert cfg.best_mode() == "min" and to_typed(compose_cfg()).best_mode() == "max"
    checkpoint = build_callbacks(cfg)[0]
    assert checkpoint.monitor == "val/loss" and checkpoint.mode == "min"


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
