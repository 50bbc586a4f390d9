"""The literature's linear probe (Kornblith et al. 2019) on cached features, with scikit-learn.

L-BFGS multinomial logistic regression, C chosen on val by mean per-class accuracy from a
log-spaced grid, refit on train+val, evaluated once on test. The fitted classifier is folded back
into the model's linear head, so the checkpoint works with predict/export like any other run.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score
from sklearn.preprocessing import StandardScaler

from finetune.atomic import write_atomic
from finetune.config.schema import FinetuneConfig, HeadType
from finetune.data.features import FeatureCacheDataModule
from finetune.errors import SetupError
from finetune.model.module import FinetuneModule
from finetune.progress import progress
from finetune.run.builders import build_datamodule, build_module, resolve_augment
from finetune.run.setup import prepare_run
from finetune.run.summary import device_name, make_summary, write_run_files


def _arrays(datamodule: FeatureCacheDataModule, split: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = datamodule.datasets[split]
    x = np.asarray(dataset.features, dtype=np.float32).reshape(len(dataset), -1)
    return x, np.asarray(dataset.labels)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs").fit(scaler.transform(x), y)
    return scaler, clf


def _full_probabilities(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over all classes, also when a class was absent from the fit."""
    proba = np.zeros((len(x), num_classes))
    proba[:, clf.classes_] = clf.predict_proba(x)
    return proba


def fold_into_head(module: FinetuneModule, scaler: StandardScaler, clf: LogisticRegression) -> None:
    """Write (x - mean) / scale -> W x + b into the model's nn.Linear head on raw features."""
    linear = module.head[-1]
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row (class 1 vs class 0)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    weight = np.zeros((linear.out_features, linear.in_features))
    bias = np.full((linear.out_features,), -1e4)  # classes absent from the fit are never predicted
    weight[clf.classes_] = coef / scale
    bias[clf.classes_] = intercept - (coef * scaler.mean_ / scale).sum(axis=1)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))


def probe(cfg: FinetuneConfig) -> dict[str, Any]:
    """The linear-probe job: extract (or reuse) features, fit the probe, write checkpoint + summary.json like a
    trained run."""
    run = prepare_run(cfg)
    if isinstance(run, dict):
        return run
    module = build_module(cfg, run.splits, run.identity)
    datamodule = build_datamodule(cfg, run.splits, module)
    if not isinstance(datamodule, FeatureCacheDataModule):
        raise SetupError("strategy=linear_probe works on cached features: keep cache.enabled=auto and "
                         "data.augment=false (or auto).")
    if cfg.head.type != HeadType.linear:
        raise SetupError("strategy=linear_probe fits a linear classifier: use head.type=linear.")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    datamodule.prepare(device=device)
    splits, out_dir, started = run.splits, run.out_dir, run.started
    fit_started = time.perf_counter()
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (_arrays(datamodule, s) for s in ("train", "val", "test"))
    grid = np.logspace(np.log10(cfg.strategy.c_min), np.log10(cfg.strategy.c_max), int(cfg.strategy.c_num))
    max_iter = int(cfg.strategy.max_iter)
    scores = []
    with progress("linear probe: C grid and refit", len(grid) + 1, unit="fits") as advance:
        for c in grid:
            scaler, clf = _fit(x_train, y_train, float(c), max_iter)
            scores.append(balanced_accuracy_score(y_val, clf.predict(scaler.transform(x_val))))
            advance(1)
        best = int(np.argmax(scores))
        scaler, clf = _fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), float(grid[best]),
                           max_iter)
        advance(1)
    fit_seconds = time.perf_counter() - fit_started

    n = splits.num_classes
    proba = _full_probabilities(clf, scaler.transform(x_test), n)
    pred = proba.argmax(1)
    labels = np.arange(n)
    clipped = np.clip(proba, 1e-12, 1)  # a class absent from the fit has probability 0: log_loss needs > 0
    test = {
        "acc": float((pred == y_test).mean()),
        "mean_class_acc": float(balanced_accuracy_score(y_test, pred)),
        "f1_macro": float(f1_score(y_test, pred, average="macro", labels=labels, zero_division=0)),
        "loss": float(log_loss(y_test, clipped / clipped.sum(1, keepdims=True), labels=labels)),
    }
    if n >= 5:
        test["top5"] = float(top_k_accuracy_score(y_test, proba, k=5, labels=labels))
    confusion = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(y_test, pred, strict=True):
        confusion[t, p] += 1

    fold_into_head(module, scaler, clf)
    ckpt = out_dir / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": pl.__version__}
    module.on_save_checkpoint(checkpoint)  # frozen stages as in every run's checkpoints (checkpoint_frozen_stages)
    write_atomic(ckpt, lambda f: torch.save(checkpoint, f))
    summary = make_summary(
        cfg, splits, module, out_dir, augment=resolve_augment(cfg.data, cfg.strategy.name),
        feature_cache=str(datamodule.folder),
        epochs_run=0, global_steps=0,
        best_val_metric=float(scores[best]), best_checkpoint=str(ckpt), test=test,
        seconds={"feature_extraction": datamodule.extract_seconds, "training": fit_seconds, "test": 0.0,
                 "total": time.perf_counter() - started},
        device=device_name(device), monitor="val/mean_class_acc",
    )
    summary["linear_probe"] = {"c_grid": grid.tolist(), "val_mean_class_acc": scores, "best_c": float(grid[best])}
    write_run_files(summary, confusion, splits.classes, out_dir)
    return summary
