"""summary.json: what one run measured, assembled in one place and written last, atomically."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import torch

from finetune.atomic import write_json_atomic
from finetune.config.schema import FinetuneConfig
from finetune.config.typed import plain
from finetune.data.datasets import class_counts
from finetune.model.backbones import weights_source
from finetune.model.module import FinetuneModule
from finetune.model.strategies import count_params
from finetune.model.unfreezing import unfreeze_events
from finetune.run.outputs import peak_memory, plot_confusion_matrix
from finetune.run.run_dir import CONFIG_NAME, SUMMARY_NAME


def device_name(root: torch.device) -> str:
    if root.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(root)}"
    return root.type


def make_summary(
    cfg: FinetuneConfig, splits: Any, module: FinetuneModule, out_dir: Path, *, augment: bool,
    feature_cache: str | None,
    epochs_run: int, global_steps: int, best_val_metric: float | None, best_checkpoint: str | None,
    test: dict[str, float], seconds: dict[str, float], device: str, monitor: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's content (DESIGN.md): the machine-readable truth of one run."""
    source = weights_source(cfg.backbone.weights)
    return {
        "backbone": cfg.backbone.name,
        "weights": source,
        "weights_path": str(cfg.backbone.weights) if source == "file" else None,
        "strategy": str(cfg.strategy.name),
        "unfreeze_last": cfg.strategy.unfreeze_last,
        "trainable_stages": list(module.trainable),
        "dataset": str(cfg.data.name),
        "augment": augment,
        "feature_cache": feature_cache,
        "num_classes": splits.num_classes,
        "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "class_counts": {name: class_counts(getattr(splits, name), splits.num_classes)
                         for name in ("train", "val", "test")},
        "image_size": module.hparams.preprocessing["crop_size"],
        "params_total": count_params(module),
        "params_trainable": count_params(module, trainable_only=True),
        "unfreeze_events": unfreeze_events(module, epochs_run),
        "recipe": recipe(cfg, augment),
        "epochs_run": epochs_run,
        "global_steps": global_steps,
        "monitor": monitor or cfg.monitor,
        "best_val_metric": best_val_metric,
        "best_checkpoint": best_checkpoint,
        "test": test,
        "wall_seconds": {k: round(float(v), 3) for k, v in seconds.items()},
        "peak_memory": peak_memory(),
        "device": device,
        "precision": str(cfg.trainer.precision),
        "config_path": str(out_dir / CONFIG_NAME),
        "run_dir": str(out_dir),
        "seed": cfg.seed,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "objective": best_val_metric,
        **(extra or {}),
    }


def recipe(cfg: FinetuneConfig, augment: bool) -> dict[str, Any]:
    """The training recipe in effect, so a sweep's table can say what each job did."""
    return {
        "strategy": plain(cfg.strategy),
        "optimizer": plain(cfg.optimizer),
        "scheduler": plain(cfg.scheduler),
        "loss": plain(cfg.loss),
        "head": plain(cfg.head),
        "regularization": plain(cfg.regularization),
        "augment": augment,
        "balanced_sampler": cfg.data.balanced_sampler,
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
    }


def write_run_files(summary: dict[str, Any], confusion: torch.Tensor | None, classes: list[str], out_dir: Path) -> None:
    """The plot first, summary.json last (atomically): a present summary means a finished run."""
    if confusion is not None:
        plot_confusion_matrix(confusion, classes, out_dir / "confusion_matrix.png")
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
