"""The train function: config in, trained model + test metrics + summary.json out.

Builds each piece from the composed Hydra config, in the order of DESIGN.md's data
flow, and returns the summary (whose ``objective`` an Optuna sweep reads).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.backbones import preprocessing_for, weights_source
from finetune.data.datamodule import ImageDataModule, Transformed
from finetune.data.datasets import Splits, load_splits
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import SetupError
from finetune.module import FinetuneModule
from finetune.run_outputs import peak_memory, plot_confusion_matrix, write_json_atomic
from finetune.strategies import count_params

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, splits: Splits) -> FinetuneModule:
    prep = preprocessing_for(cfg.backbone.name).at_size(cfg.data.get("image_size"))
    return FinetuneModule(
        backbone=cfg.backbone.name,
        num_classes=splits.num_classes,
        weights=str(cfg.backbone.weights) if cfg.backbone.weights is not None else "none",
        strategy=cfg.strategy.name,
        unfreeze_last=cfg.strategy.get("unfreeze_last"),
        backbone_lr_ratio=float(cfg.strategy.backbone_lr_ratio),
        class_names=list(splits.classes),
        head=OmegaConf.to_container(cfg.head, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        label_smoothing=float(cfg.loss.label_smoothing),
        preprocessing={"resize_size": prep.resize_size, "crop_size": prep.crop_size,
                       "mean": list(prep.mean), "std": list(prep.std)},
    )


def build_datamodule(cfg: DictConfig, splits: Splits) -> ImageDataModule:
    prep = preprocessing_for(cfg.backbone.name).at_size(cfg.data.get("image_size"))
    train_tf = train_transform(prep, bool(cfg.data.augment), bool(cfg.data.get("hflip", True)))
    eval_tf = eval_transform(prep)
    return ImageDataModule(
        Transformed(splits.train, train_tf),
        Transformed(splits.val, eval_tf),
        Transformed(splits.test, eval_tf),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.get("num_workers", "auto"),
    )


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        RichProgressBar,
        TQDMProgressBar,
    )

    cb = cfg.callbacks
    callbacks: list[pl.Callback] = [instantiate(cb.checkpoint)]
    if cb.early_stopping.enabled:
        callbacks.append(EarlyStopping(monitor=cfg.monitor, mode="max", patience=int(cb.early_stopping.patience)))
    if cb.lr_monitor and has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cb.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif cb.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if name == "wandb":
            offline = node.get("offline")
            if offline is None:
                offline = not os.environ.get("WANDB_API_KEY")
            loggers.append(instantiate(node, offline=bool(offline)))
        else:
            loggers.append(instantiate(node))
    return loggers


def check_data(data_cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Scan a folder dataset before training; returns the loader's ``skip`` set (bad files).

    The report (bad_files.txt, data_check.json) is written before any error is raised, so the
    list the message points to exists.
    """
    if data_cfg.name != "folder" or not data_cfg.get("check", True):
        return {}
    from finetune.data.checks import apply_policy, check_image_tree

    if data_cfg.root is None or not Path(str(data_cfg.root)).expanduser().is_dir():
        raise SetupError(f"data.root='{data_cfg.root}' does not exist or is not a folder (data=folder needs it).")
    report = check_image_tree(Path(str(data_cfg.root)).expanduser(), int(data_cfg.get("max_pixels", 89_478_485)))
    report.write(out_dir)
    skip = apply_policy(report, str(data_cfg.get("on_bad_image", "skip")))
    if skip:
        log.warning("data check: skipping %d unreadable file(s), listed in %s", len(skip), out_dir / "bad_files.txt")
    for line in report.warnings():
        log.warning("data check: %s", line)
    return {"skip": set(skip)}


def _device_name(trainer: pl.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(root)}"
    return root.type


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test with the best checkpoint, write summary.json; returns the summary."""
    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)

    splits = load_splits(cfg.data, **check_data(cfg.data, out_dir))
    module = build_module(cfg, splits)
    datamodule = build_datamodule(cfg, splits)
    feature_seconds = 0.0

    config_path = out_dir / "resolved_config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))

    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, has_logger=bool(loggers)), logger=loggers or False,
        default_root_dir=str(out_dir),
    )
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - fit_started
    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") or None
    best_score = getattr(checkpoint, "best_model_score", None)

    test_started = time.perf_counter()
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
    test_seconds = time.perf_counter() - test_started
    test = {k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()}

    summary = {
        "backbone": cfg.backbone.name,
        "weights": weights_source(cfg.backbone.weights),
        "weights_path": str(cfg.backbone.weights) if weights_source(cfg.backbone.weights) == "file" else None,
        "strategy": cfg.strategy.name,
        "unfreeze_last": cfg.strategy.get("unfreeze_last"),
        "trainable_stages": list(module.trainable),
        "dataset": cfg.data.name,
        "num_classes": splits.num_classes,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "image_size": module.hparams.preprocessing["crop_size"],
        "params_total": count_params(module),
        "params_trainable": count_params(module, trainable_only=True),
        "epochs_run": int(trainer.current_epoch),
        "global_steps": int(trainer.global_step),
        "monitor": cfg.monitor,
        "best_val_metric": float(best_score) if best_score is not None else None,
        "best_checkpoint": best_path,
        "test": test,
        "wall_seconds": {
            "feature_extraction": round(feature_seconds, 3),
            "training": round(train_seconds, 3),
            "test": round(test_seconds, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "peak_memory": peak_memory(),
        "device": _device_name(trainer),
        "precision": str(cfg.trainer.get("precision")),
        "config_path": str(config_path),
        "run_dir": str(out_dir),
        "seed": int(cfg.seed),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if trainer.is_global_zero:
        if module.confusion_matrix is not None:
            plot_confusion_matrix(module.confusion_matrix, splits.classes, out_dir / "confusion_matrix.png")
        write_json_atomic(out_dir / "summary.json", summary)
    summary["objective"] = summary["best_val_metric"]
    return summary


def check_config(cfg: DictConfig) -> None:
    """Cheap checks before anything heavy runs; each failure is one clear SetupError."""
    if float(cfg.optimizer.lr) <= 0:
        raise SetupError(f"optimizer.lr={cfg.optimizer.lr} must be > 0 (e.g. optimizer.lr=1e-3).")
    if float(cfg.strategy.backbone_lr_ratio) < 0:
        raise SetupError("strategy.backbone_lr_ratio must be >= 0.")
    size = cfg.data.get("image_size")
    if size is not None and int(size) < 32:
        raise SetupError(
            f"data.image_size={size} is too small: VGG and ResNet downsample by 32, so use >= 32."
        )
    if int(cfg.data.batch_size) < 1:
        raise SetupError("data.batch_size must be >= 1.")
