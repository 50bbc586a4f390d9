"""The LightningModule: trainable part of the backbone + a new head, loss, metrics, optimizer."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.backbones import build_backbone
from finetune.errors import SetupError
from finetune.strategies import freeze_stages, param_groups, trainable_stages


def build_head(in_features: int, num_classes: int, kind: str = "linear", hidden_dim: int = 512,
               dropout: float = 0.0) -> nn.Module:
    """The new classifier on pooled features: linear (default) or a one-hidden-layer MLP."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )
    raise SetupError(f"Unknown head.type '{kind}'. Choose linear or mlp.")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "mean_class_acc": MulticlassAccuracy(num_classes, average="macro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class FinetuneModule(pl.LightningModule):
    """Backbone (frozen prefix + trainable suffix) and head; checkpoints describe themselves.

    ``input_stage`` > 0 means batches hold the cached output of the frozen prefix
    (stages before ``input_stage``) instead of images.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        weights: str | None = "none",
        strategy: str = "feature_extractor",
        unfreeze_last: int | None = None,
        backbone_lr_ratio: float = 0.1,
        class_names: list[str] | None = None,
        head: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        input_stage: int = 0,
        preprocessing: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, weights)
        self.trainable = trainable_stages(self.backbone.stage_names, strategy, unfreeze_last)
        freeze_stages(self.backbone, self.trainable)
        head = dict(head or {})
        self.head = build_head(self.backbone.feature_dim, num_classes, head.get("type", "linear"),
                               int(head.get("hidden_dim", 512)), float(head.get("dropout", 0.0)))
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4})
        self.scheduler_cfg = dict(scheduler or {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.01})
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.input_stage = input_stage
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.confusion_matrix: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x, start=self.input_stage))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True,
                 batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.criterion(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.val_metrics.update(logits, y)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test/loss", self.criterion(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.test_metrics.update(logits, y)
        self.test_confusion.update(logits, y)
        self.log_dict(self.test_metrics, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        groups = param_groups(self.backbone, self.head, float(cfg["lr"]), float(cfg.get("weight_decay", 0.0)),
                              float(self.hparams.backbone_lr_ratio), bool(cfg.get("no_decay_norm_bias", True)))
        if cfg["name"] == "adamw":
            optimizer = torch.optim.AdamW(groups)
        elif cfg["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=float(cfg.get("momentum", 0.9)),
                                        nesterov=bool(cfg.get("nesterov", True)))
        else:
            raise SetupError(f"Unknown optimizer '{cfg['name']}'. Choose adamw or sgd.")
        sched = self.scheduler_cfg
        if sched.get("name", "none") == "none":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        warmup = round(float(sched.get("warmup_epochs", 0)) * total / epochs)
        min_ratio = float(sched.get("min_lr_ratio", 0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
