"""The train function: typed config in, trained model + test metrics + summary.json out.

:func:`train` runs one job: the linear probe (:mod:`finetune.run.linear_probe`) or Lightning's fit and
test (:func:`fit_and_test`); both start from :func:`finetune.run.setup.prepare_run`, which claims the run
directory, loads and fingerprints the data and checks a resume, writing nothing until all of it passed.
Returns the summary, whose ``objective`` an Optuna sweep reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from finetune.config.schema import FinetuneConfig, StrategyName
from finetune.config.typed import to_typed
from finetune.data.features import FeatureCacheDataModule
from finetune.model.module import FinetuneModule
from finetune.progress import set_style
from finetune.run.builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_trainer,
    resolve_augment,
    use_channels_last,
)
from finetune.run.cuda_check import drop_nvml_check_without_nvml
from finetune.run.interrupts import CtrlCAtBatchEnd
from finetune.run.outputs import TrainingPeakMemory
from finetune.run.quiet import quiet_block_logging_warning, quiet_known_noise
from finetune.run.run_dir import SUMMARY_NAME
from finetune.run.setup import Prepared, prepare_run
from finetune.run.summary import device_name, make_summary, write_run_files

log = logging.getLogger(__name__)

def check_config(cfg: DictConfig | FinetuneConfig) -> FinetuneConfig:
    """The config as checked, typed objects (the same conversion every entry point makes)."""
    return to_typed(cfg)


def train(cfg: DictConfig | FinetuneConfig) -> dict[str, Any]:
    """Run one job of the config; returns its summary (a finished identical run's, when resume=auto skips it)."""
    cfg = to_typed(cfg)
    quiet_known_noise()
    drop_nvml_check_without_nvml()  # ~35 us per optimizer step on a machine without the NVIDIA driver
    set_style(str(cfg.callbacks.progress_bar))
    if cfg.strategy.name == StrategyName.linear_probe:
        from finetune.run.linear_probe import probe

        return probe(cfg)
    return fit_and_test(cfg)


def fit_and_test(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fit, test with the best checkpoint, write summary.json."""
    run = prepare_run(cfg)
    if isinstance(run, dict):
        return run
    module = build_module(cfg, run.splits, run.identity)
    datamodule = build_datamodule(cfg, run.splits, module)
    if module.steps_per_block > 1:
        quiet_block_logging_warning()
    if use_channels_last(cfg):
        module = module.to(memory_format=torch.channels_last)
    fit_module = torch.compile(module) if cfg.speed.compile else module
    loggers = build_loggers(cfg)
    memory = TrainingPeakMemory()
    trainer = build_trainer(cfg, [*build_callbacks(cfg, has_logger=bool(loggers)), memory], loggers,
                            train_images=len(run.splits.train), manual_optimization=not module.automatic_optimization)
    extra: dict[str, Any] = {}
    module.detach_frozen_prefix()  # on cached features the prefix is not needed until the end: off the device
    try:
        if cfg.tune.lr_find and run.resume_from is None:
            extra["lr_find"] = find_lr(trainer, module, datamodule, run.out_dir)
        fit_started = time.perf_counter()
        try:
            trainer.fit(fit_module, datamodule=datamodule,
                        ckpt_path=str(run.resume_from) if run.resume_from else None)
        except SIGTERMException as stop:  # Lightning's stop after a batch: for SIGTERM, or for our Ctrl-C
            if any(isinstance(c, CtrlCAtBatchEnd) and c.requested for c in trainer.callbacks):
                raise KeyboardInterrupt("Ctrl-C") from stop
            raise
        feature_seconds = getattr(datamodule, "extract_seconds", 0.0)
        train_seconds = time.perf_counter() - fit_started - feature_seconds
        test_started = time.perf_counter()
        test = test_best(cfg, trainer, fit_module, module, datamodule)
        test_seconds = time.perf_counter() - test_started
    finally:
        module.attach_frozen_prefix()
    extra["peak_memory"], extra["peak_memory_training"] = memory.overall(), memory.training
    if isinstance(datamodule, FeatureCacheDataModule):  # how the cached features were served (cache.resident)
        resident = bool(datamodule.resident)
        extra["cached_batches"] = {"resident": resident,
                                   "optimizer_steps_per_batch": datamodule.block_steps if resident else 1}
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    summary = make_summary(
        cfg, run.splits, module, run.out_dir, augment=resolve_augment(cfg.data, cfg.strategy.name),
        feature_cache=str(datamodule.folder) if isinstance(datamodule, FeatureCacheDataModule) else None,
        epochs_run=int(trainer.current_epoch), global_steps=int(trainer.global_step),
        best_val_metric=float(best_score) if best_score is not None else None,
        best_checkpoint=getattr(checkpoint, "best_model_path", "") or None, test=test,
        seconds={"feature_extraction": feature_seconds, "training": train_seconds, "test": test_seconds,
                 "total": time.perf_counter() - run.started},
        device=device_name(trainer.strategy.root_device), extra=extra,
    )
    if trainer.is_global_zero:
        write_run_files(summary, module.confusion_matrix, run.splits.classes, run.out_dir)
        log_results(loggers, summary, run.out_dir)
    return summary


def test_best(cfg: FinetuneConfig, trainer: pl.Trainer, fit_module: Any, module: FinetuneModule,
              datamodule: Any) -> dict[str, float]:
    """Test metrics of the best checkpoint (with EMA: its averaged weights, the ones val picked)."""
    best_path = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    ckpt_path = best_path
    if best_path and cfg.regularization.ema_decay:
        # Lightning's weight averaging would restore the raw weights from the checkpoint's
        # `current_model_state`; the averaged ones (its `state_dict`) are what val picked.
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        module.complete_checkpoint(best, f"'{best_path}'")
        module.load_state_dict(best["state_dict"])
        ckpt_path = None
    results = trainer.test(fit_module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return {k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()}


def find_lr(trainer: pl.Trainer, module: FinetuneModule, datamodule: Any, out_dir: Path) -> dict[str, Any]:
    """Lightning's LR range test before fit: saves its plot, sets the head LR to the suggestion.

    Backbone groups follow through backbone_lr_ratio / layer_decay, since they are ratios of it.
    """
    from pytorch_lightning.tuner import Tuner

    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, update_attr=False)
    suggested = finder.suggestion() if finder is not None else None
    plot = out_dir / "lr_find.png"
    if finder is not None:
        import matplotlib.pyplot as plt

        fig = finder.plot(suggest=suggested is not None)
        fig.savefig(plot, dpi=100)
        plt.close(fig)
    original = float(module.optimizer_cfg["lr"])
    if suggested is not None:
        module.optimizer_cfg["lr"] = float(suggested)
        log.info("lr_find: suggested lr %.3g (configured %.3g)", suggested, original)
    return {"suggested_lr": suggested, "configured_lr": original, "plot": str(plot) if plot.exists() else None}


def log_results(loggers: list[Any], summary: dict[str, Any], out_dir: Path) -> None:
    """Send the confusion matrix and the summary to experiment trackers that take them (wandb)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            plot = out_dir / "confusion_matrix.png"
            if plot.is_file():
                logger.log_image("test/confusion_matrix", [str(plot)])
            logger.experiment.summary.update(
                {k: v for k, v in summary.items() if isinstance(v, int | float | str | dict) and v is not None}
            )
            logger.experiment.save(str(out_dir / SUMMARY_NAME), base_path=str(out_dir), policy="now")


__all__ = ["Prepared", "check_config", "fit_and_test", "train"]
