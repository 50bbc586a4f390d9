"""The typed config at the door: every mistake is one paragraph, exit 2, and nothing is written.

Each bad command line runs through ``python -m finetune``'s own ``main()`` (in-process, in an empty
folder): the door composes it with Hydra's compose API and the schema before ``@hydra.main`` can create
a run folder. A few go through a real subprocess too.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import finetune.__main__ as app
from finetune import config_dir
from finetune.config.identity import roles
from finetune.config.schema import NEUTRAL, RESULT, FinetuneConfig
from finetune.config.typed import to_typed
from finetune.errors import SetupError
from finetune.model.backbones import BACKBONE_NAMES

FOLDER = "data=folder data.root={root}"
BAD = [
    # wrong types (bare int()/float() once gave tracebacks)
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("seed=abc", "seed"),
    ("data.batch_size=abc", "data.batch_size"),
    ("strategy=gradual_unfreeze strategy.milestones=abc", "strategy.milestones"),
    (f"{FOLDER} data.max_pixels=abc", "data.max_pixels"),
    ("loss.class_weights=abc", "loss.class_weights"),
    # missing mandatory value, unknown keys (also with +), unknown group options
    ("data=folder", "data.root"),
    ("+data.imagesize=64", "data.imagesize"),
    ("+foo=1", "foo"),
    ("trainer.foo=1", "trainer.foo"),
    ("bakbone.name=vgg16", "bakbone"),
    ("backbone=vgg17", "backbone=vgg17"),
    ("optimizer=adam", "optimizer=adam"),
    ("backbone.name=vgg99", "vgg99"),
    # closed choices
    ("scheduler.name=Cosine", "scheduler.name"),
    ("scheduler.name=foo", "scheduler.name"),
    ("head.type=transformer", "head.type"),
    ("cache.dtype=int8", "cache.dtype"),
    ("callbacks.progress_bar=fancy", "callbacks.progress_bar"),
    (f"{FOLDER} data.on_bad_image=ignore", "data.on_bad_image"),
    ("monitor=val/accuracy", "monitor"),
    ("monitor_mode=biggest", "monitor_mode"),
    ("trainer.precision=foo", "trainer.precision"),
    ("optimizer.fused=sometimes", "optimizer.fused"),
    # ranges and cross-field rules
    ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio"),
    ("data.val_fraction=-0.2", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("data.val_fraction=0.6 data.test_fraction=0.5", "data.val_fraction"),
    ("data.image_size=16", "data.image_size"),
    ("data.num_workers=-3", "data.num_workers"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("optimizer.layer_decay=0", "optimizer.layer_decay"),
    ("optimizer.momentum=0.9", "optimizer.momentum"),  # adamw has none: it would be ignored
    ("head.dropout=2", "head.dropout"),
    ("loss.label_smoothing=2", "loss.label_smoothing"),
    ("regularization.ema_decay=1.5", "regularization.ema_decay"),
    ("regularization.mixup_alpha=-1", "regularization.mixup_alpha"),
    ("strategy=partial_unfreeze strategy.unfreeze_last=9", "strategy.unfreeze_last"),
    ("strategy=gradual_unfreeze strategy.milestones=[3,2]", "strategy.milestones"),
    ("strategy=partial_unfreeze strategy.milestones=[2]", "strategy.milestones"),  # read by gradual_unfreeze only
    ("seed=-1", "seed"),
    # paths that must exist
    ("data=folder data.root=/no/such/folder", "data.root"),
    ("backbone.weights=/no/such/file.pth", "backbone.weights"),
    ("resume=/no/such/run.ckpt", "resume"),
    # a sweep: every job is checked, and an Optuna direction against the monitor
    ("-m seed=1,abc", "seed"),
    ("-m backbone=resnet18,vgg99", "vgg99"),
    ("hparams_search=optuna monitor=val/loss", "hydra.sweeper.direction"),
]
if not torch.cuda.is_available():
    BAD.append(("trainer.accelerator=gpu", "trainer.accelerator"))


def run_main(argv: list[str], folder: Path, monkeypatch) -> int:
    monkeypatch.chdir(folder)
    monkeypatch.setenv("FINETUNE_CACHE", str(folder / ".cache" / "finetune"))
    monkeypatch.setattr(sys, "argv", ["finetune", *argv])
    with pytest.raises(SystemExit) as stop:
        app.main()
    return int(stop.value.code)


@pytest.mark.parametrize(("command", "key"), BAD, ids=[c for c, _ in BAD])
def test_bad_config_is_one_paragraph_exit_2_and_writes_nothing(command: str, key: str, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    argv = command.format(root=images).split()
    flags = [a for a in argv if a.startswith("-")]
    words = [a for a in argv if not a.startswith("-")]
    if not any(w.startswith("backbone.weights=") for w in words):
        words.insert(0, "backbone.weights=none")
    code = run_main([*flags, *words], work, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and key in err, err
    assert "Traceback" not in err and "\n\n" not in err, err
    assert list(work.iterdir()) == [], "a refused config wrote something"


def test_real_command_line_refusals(tmp_path: Path) -> None:
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path(__file__).parents[1])}
    for word in ("trainer.max_epochs=abc", "backbone=vgg17"):  # a Hydra refusal and one of the schema
        done = subprocess.run([sys.executable, "-m", "finetune", "backbone.weights=none", word], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.startswith("error: "), done.stderr
        assert word.split("=")[0] in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a refused command wrote something"


def test_good_values_pass(compose_cfg) -> None:
    to_typed(compose_cfg("trainer.precision=bf16-mixed", "data.num_workers=2", "cache.dtype=float16",
                         "regularization.ema_decay=0.999", "monitor=val/loss", "trainer.max_epochs=-1",
                         "optimizer.fused=false", "loss.class_weights=[1,2.5]", "data.augment=true"))
    to_typed(compose_cfg("trainer.precision=null", "monitor=train/acc", "optimizer=sgd"))  # null: Lightning's default
    to_typed(compose_cfg("strategy=gradual_unfreeze", "strategy.milestones=[1,3]", "trainer.gradient_clip_val=1.0"))


def test_unknown_trainer_arguments_fail_and_real_ones_work(compose_cfg) -> None:
    cfg = to_typed(compose_cfg("trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=0.5"))
    assert cfg.trainer.accumulate_grad_batches == 2 and cfg.trainer.limit_train_batches == 0.5
    with pytest.raises(Exception, match="max_epoch"):
        compose_cfg("trainer.max_epoch=3")


def test_every_schema_field_declares_its_role() -> None:
    """A new key cannot be added without saying whether it changes a run's result."""
    found = roles()
    assert set(found.values()) == {RESULT, NEUTRAL}
    assert found["seed"] == RESULT and found["data.root"] == RESULT and found["paths"] == NEUTRAL
    assert found["data.num_workers"] == NEUTRAL and found["trainer.max_epochs"] == RESULT

    def walk(kind: type, prefix: str = "") -> None:
        for f in dataclasses.fields(kind):
            assert f.metadata.get("role") in (RESULT, NEUTRAL), f"{prefix}{f.name} declares no role"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")

    walk(FinetuneConfig)

    @dataclasses.dataclass
    class Forgotten:
        new_key: int = 1

    with pytest.raises(TypeError, match="declares no role"):
        roles(Forgotten)


@pytest.mark.parametrize("group", ["backbone", "strategy", "data", "optimizer", "trainer", "logger", "callbacks",
                                   "experiment"])
def test_every_shipped_option_composes_against_the_schema(group: str, tmp_path: Path) -> None:
    folder = config_dir() / group
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if group == "backbone":  # the generated files differ in their name only (tests/test_families.py checks each
            # against the generator): two of them and the hand-written ones
            options = [o for o in options if o not in BACKBONE_NAMES or o in ("resnet18", "vit_b_16")]
        for option in options:
            extra = {"folder": [f"data.root={tmp_path}"], "timm": ["backbone.name=resnet18"]}.get(option, [])
            cfg = compose("config", overrides=[f"{group}={option}", *extra, f"paths.output_dir={tmp_path}"])
            typed = to_typed(cfg)
            assert isinstance(typed, FinetuneConfig)


def test_typed_config_is_plain_python_below_the_entry_point(compose_cfg) -> None:
    cfg = to_typed(compose_cfg("scheduler.name=none"))
    assert cfg.scheduler.name == "none" and f"{cfg.scheduler.name}" == "none"
    assert type(cfg.trainer).__name__ == "TrainerConfig" and cfg.trainer.max_epochs == 10
    with pytest.raises(SetupError, match=r"^strategy\.freeze_epochs=2 is not read by strategy=feature_extractor"):
        to_typed(compose_cfg("+strategy.freeze_epochs=2"))


def test_the_end_of_a_run_says_the_result_and_the_next_commands(capsys) -> None:
    from finetune.run.console import show_result

    summary = {"backbone": "resnet18", "strategy": "feature_extractor", "dataset": "digits", "num_classes": 10,
               "test": {"acc": 0.9333, "top5": 0.99, "mean_class_acc": 0.93, "f1_macro": 0.92},
               "monitor": "val/acc", "best_val_metric": 0.95, "epochs_run": 3,
               "wall_seconds": {"feature_extraction": 1.0, "training": 2.0, "test": 0.5, "total": 4.0},
               "peak_memory": {"cpu_rss_bytes": 2**30}, "run_dir": "/runs/a", "best_checkpoint": "/runs/a/b.ckpt"}
    show_result(summary, fancy=False)
    out = capsys.readouterr().out
    assert "top-1 93.33%" in out and "/runs/a/b.ckpt" in out and "1,024 MB RSS" in out
    assert "python -m finetune.predict ckpt=/runs/a/b.ckpt" in out and "python -m finetune.compare /runs" in out
    show_result(summary, fancy=True)
    assert "run finished" in capsys.readouterr().out
