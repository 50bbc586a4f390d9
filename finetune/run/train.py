"""The train function: config in, trained model + test metrics + summary.json out.

Builds each piece from the composed Hydra config, in the order of DESIGN.md's data
flow, and returns the summary (whose ``objective`` an Optuna sweep reads).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.data.datamodule import ImageDataModule, Transformed, resolve_num_workers
from finetune.data.datasets import Splits, class_counts, load_splits
from finetune.data.features import FeatureCacheDataModule, cache_key, frozen_prefix, weights_identity
from finetune.data.transforms import describe, eval_transform, train_transform
from finetune.errors import SetupError
from finetune.model.backbones import Preprocessing, preprocessing_for, weights_source
from finetune.model.frozen_weights import MODES
from finetune.model.module import FinetuneModule, fused_setting
from finetune.model.unfreezing import StageUnfreezer
from finetune.run.outputs import TrainingPeakMemory, reset_peak_memory
from finetune.run.resume import (
    AtomicCheckpointIO,
    FiniteLoss,
    InterruptCheckpoint,
    ResumeInEpoch,
    RNGState,
    check_resume_matches,
    resolve_resume,
)
from finetune.run.run_dir import CONFIG_NAME, SUMMARY_NAME, claim_run_dir, set_aside
from finetune.run.summary import device_name, make_summary, write_run_files

log = logging.getLogger(__name__)

# Frozen stages are in eval mode on purpose (their BatchNorm statistics must not move).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def build_module(cfg: DictConfig, splits: Splits) -> FinetuneModule:
    prep = preprocessing_for(cfg.backbone.name).at_size(cfg.data.get("image_size"))
    return FinetuneModule(
        backbone=cfg.backbone.name,
        num_classes=splits.num_classes,
        weights=resolved_weights(cfg.backbone.weights),
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
        milestones=list(cfg.strategy.get("milestones") or []) or None,
        freeze_epochs=cfg.strategy.get("freeze_epochs"),
        class_weights=resolve_class_weights(cfg.loss.get("class_weights"), splits),
        regularization=OmegaConf.to_container(cfg.get("regularization") or {}, resolve=True),
        checkpoint_frozen_stages=str(cfg.get("checkpoint_frozen_stages", "reference")),
    )


def resolved_weights(weights: Any) -> str:
    """'imagenet', 'none', or the weights file as an absolute path: checkpoints rebuild frozen stages from
    it, from whatever directory they are loaded."""
    if weights is None or weights_source(str(weights)) != "file":
        return "none" if weights is None else str(weights)
    return str(Path(str(weights)).expanduser().resolve())


def resolve_class_weights(value: Any, splits: Splits) -> list[float] | None:
    """``auto``: inverse class frequency of the train split (n / (classes x count)), as sklearn's 'balanced'."""
    if value in (None, "none", False):
        return None
    if value != "auto":
        weights = [float(w) for w in value]
        if len(weights) != splits.num_classes:
            raise SetupError(f"loss.class_weights has {len(weights)} values for {splits.num_classes} classes.")
        return weights
    counts = class_counts(splits.train, splits.num_classes)
    total = sum(counts)
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


def resolve_augment(data_cfg: DictConfig, strategy: str) -> bool:
    """``auto``: no augmentation for feature_extractor (the linear-probe protocol), else on."""
    value = data_cfg.get("augment", "auto")
    if value == "auto":
        return strategy not in ("feature_extractor", "linear_probe")
    return bool(value)


def decide_cache(cfg: DictConfig, frozen_prefix_len: int, augment: bool) -> tuple[bool, str]:
    """Whether the feature cache serves this run, and a one-line note when it does not."""
    enabled = cfg.cache.get("enabled", "auto")
    if enabled is False or enabled == "false":
        return False, ""
    if frozen_prefix_len == 0:
        return False, "feature cache off: no leading stage is frozen (full_finetune)."
    if augment and int(cfg.cache.get("views", 0)) <= 0:
        return False, ("feature cache off: train augmentation changes the input every epoch; set "
                       "data.augment=false (linear-probe protocol) or cache.views=K to cache K augmented views.")
    return True, ""


def use_channels_last(cfg: DictConfig) -> bool:
    """``auto``: channels_last, for training and for the frozen-prefix extraction alike, on CPU and CUDA.

    Measured (BENCHMARKS.md): 1.2-1.4x faster inference forward and ~5-10% faster training steps on a
    CPU core, 1.5x for bf16 on an H200. Extraction and training must use the same layout: on CPU the
    cached features are then bit-identical to what the uncached path computes (per-sample results do
    not depend on the batch size there), so a cached run reproduces an uncached one exactly.
    """
    value = cfg.get("speed", {}).get("channels_last", "auto")
    if value == "auto":
        return True
    return bool(value)


def apply_tf32(value: Any) -> None:
    """``speed.tf32``: auto = PyTorch's defaults (cuDNN convolutions in TF32, matmuls in full fp32).

    true: convolutions and matmuls in TF32 (faster on Ampere and later); false: both in full fp32
    (closer results, e.g. cached vs uncached features; BENCHMARKS.md, cache fidelity). Set for the
    whole process, so every run applies its own (also ``auto``: a sweep's jobs do not inherit).
    Through the API Lightning itself reads (``get_float32_matmul_precision``): torch refuses a mix
    of that and the newer ``fp32_precision`` attributes.
    """
    if value in (None, "auto"):
        conv, matmul = True, "highest"
    elif value in (True, "true"):
        conv, matmul = True, "high"
    elif value in (False, "false"):
        conv, matmul = False, "highest"
    else:
        raise SetupError(f"speed.tf32={value} must be auto, true or false.")
    torch.backends.cudnn.allow_tf32 = conv
    torch.set_float32_matmul_precision(matmul)


def build_datamodule(
    cfg: DictConfig, splits: Splits, module: FinetuneModule
) -> ImageDataModule | FeatureCacheDataModule:
    """Image loaders, or cached frozen-prefix outputs (then ``module.input_stage`` skips the prefix)."""
    prep = Preprocessing(**module.hparams.preprocessing)  # one source: what the checkpoint records
    augment = resolve_augment(cfg.data, cfg.strategy.name)
    train_tf = train_transform(prep, augment, bool(cfg.data.get("hflip", True)))
    eval_tf = eval_transform(prep)
    images = {"train": Transformed(splits.train, train_tf), "val": Transformed(splits.val, eval_tf),
              "test": Transformed(splits.test, eval_tf)}
    prefix_len = module.cacheable_prefix
    cached, note = decide_cache(cfg, prefix_len, augment)
    if note:
        log.info(note)
    if not cached:
        return ImageDataModule(images["train"], images["val"], images["test"], batch_size=cfg.data.batch_size,
                               num_workers=cfg.data.get("num_workers", "auto"),
                               balanced=bool(cfg.data.get("balanced_sampler", False)), seed=int(cfg.seed))
    views = max(1, int(cfg.cache.get("views", 0))) if augment else 1
    meta = {
        "backbone": cfg.backbone.name,
        "weights": weights_identity(cfg.backbone.name, cfg.backbone.weights, int(cfg.seed)),
        "frozen_stages": module.backbone.stage_names[:prefix_len],
        "train_transform": describe(train_tf),
        "eval_transform": describe(eval_tf),
        "data": hashlib.sha256(splits.fingerprint.encode()).hexdigest(),
        "split_sizes": [len(splits.train), len(splits.val), len(splits.test)],
        "views": views,
        "dtype": str(cfg.cache.get("dtype", "float32")),
    }
    folder = Path(str(cfg.cache.dir)).expanduser() / f"{cfg.backbone.name}-{cache_key(meta)}"
    module.input_stage = prefix_len
    return FeatureCacheDataModule(
        images, frozen_prefix(module.backbone, prefix_len), folder, meta, batch_size=int(cfg.data.batch_size),
        num_workers=resolve_num_workers(cfg.data.get("num_workers", "auto")), dtype=meta["dtype"],
        train_views=views, channels_last=use_channels_last(cfg),
        balanced=bool(cfg.data.get("balanced_sampler", False)),
        extract_batch_size=cfg.cache.get("batch_size"), seed=int(cfg.seed),
    )


MONITORS = ("val/acc", "val/mean_class_acc", "val/f1_macro", "val/top5", "val/loss", "train/acc", "train/loss_epoch")


def monitor_mode(cfg: DictConfig) -> str:
    """max or min for ``monitor``: ``monitor_mode=auto`` means min for a loss, max for every other metric."""
    mode = str(cfg.get("monitor_mode", "auto"))
    if mode == "auto":
        return "min" if str(cfg.monitor).endswith("loss") else "max"
    if mode not in ("max", "min"):
        raise SetupError(f"monitor_mode={mode} must be auto, max or min.")
    return mode


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
        RichProgressBar,
        TQDMProgressBar,
    )

    cb = cfg.callbacks
    mode = monitor_mode(cfg)
    callbacks: list[pl.Callback] = [
        instantiate(cb.checkpoint, mode=mode),
        instantiate(cb.last_checkpoint),
        RNGState(),
        InterruptCheckpoint(Path(cfg.paths.output_dir) / "checkpoints"),
        ResumeInEpoch(),
        FiniteLoss(),
        StageUnfreezer(),
    ]
    ema = (cfg.get("regularization") or {}).get("ema_decay")
    if ema:
        from pytorch_lightning.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=float(ema)))
    if cb.early_stopping.enabled:
        callbacks.append(EarlyStopping(monitor=cfg.monitor, mode=mode, patience=int(cb.early_stopping.patience)))
    if cb.lr_monitor and has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cb.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    elif cb.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar())
    return callbacks


def _sweep_group() -> str | None:
    """In a Hydra multirun, the sweep folder's name: wandb groups the sweep's jobs under it."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.sweep.dir).name
    except ValueError:  # not running under @hydra.main (tests, notebooks)
        pass
    return None


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Loggers from the config; wandb goes offline without an API key (sync later with `wandb sync`)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if name == "wandb":
            offline = node.get("offline")
            if offline is None:
                offline = not os.environ.get("WANDB_API_KEY")
            group = node.get("group") or _sweep_group()
            Path(str(node.save_dir)).mkdir(parents=True, exist_ok=True)
            loggers.append(instantiate(node, offline=bool(offline), group=group))
        else:
            loggers.append(instantiate(node))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loggers


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


def check_data(data_cfg: DictConfig, out_dir: Path, cache_dir: str | None = None) -> dict[str, Any]:
    """Scan a folder dataset before training; returns the loader's ``skip`` set (bad files).

    Files unchanged since an earlier run's check (size, mtime) are not decoded again (memo in ``cache_dir``).
    The report (bad_files.txt, data_check.json) is written before any error is raised, so the
    list the message points to exists.
    """
    if data_cfg.name != "folder" or not data_cfg.get("check", True):
        return {}
    from finetune.data.checks import apply_policy, check_image_tree

    if data_cfg.root is None or not Path(str(data_cfg.root)).expanduser().is_dir():
        raise SetupError(f"data.root='{data_cfg.root}' does not exist or is not a folder (data=folder needs it).")
    root = Path(str(data_cfg.root)).expanduser().absolute()
    memo_name = f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    memo = Path(str(cache_dir)).expanduser() / "data_checks" / memo_name
    report = check_image_tree(root, int(data_cfg.get("max_pixels", 89_478_485)), memo=memo if cache_dir else None)
    report.write(out_dir)
    skip = apply_policy(report, str(data_cfg.get("on_bad_image", "skip")))
    if skip:
        log.warning("data check: skipping %d unreadable file(s), listed in %s", len(skip), out_dir / "bad_files.txt")
    for line in report.warnings():
        log.warning("data check: %s", line)
    return {"skip": set(skip)}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test with the best checkpoint, write summary.json; returns the summary."""
    started = time.perf_counter()
    reset_peak_memory()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim = claim_run_dir(cfg, out_dir)  # refuses to overwrite a finished run; resume=auto skips a matching one
    if claim.finished is not None:
        return claim.finished
    pl.seed_everything(int(cfg.seed), workers=True)
    apply_tf32((cfg.get("speed") or {}).get("tf32", "auto"))

    splits = load_splits(cfg.data, **check_data(cfg.data, out_dir, cfg.cache.get("dir")))
    if cfg.monitor == "val/top5" and splits.num_classes < 5:
        raise SetupError(f"monitor=val/top5 needs 5 or more classes; this data has {splits.num_classes}. "
                         f"Use val/acc or val/mean_class_acc.")
    resume_from = None
    if cfg.strategy.name != "linear_probe":
        resume_from = resolve_resume(cfg.get("resume"), out_dir)
        if resume_from is not None:  # before anything is written: a refused resume leaves the folder as it was
            check_resume_matches(resume_from, cfg, splits.num_classes)
            log.info("resuming from %s", resume_from)
    module = build_module(cfg, splits)
    if claim.extends is not None:
        set_aside(claim.extends)
    (out_dir / CONFIG_NAME).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.strategy.name == "linear_probe":
        from finetune.run.linear_probe import run_linear_probe

        return run_linear_probe(cfg, splits, module, build_datamodule(cfg, splits, module), out_dir, started,
                                augment=resolve_augment(cfg.data, cfg.strategy.name))
    datamodule = build_datamodule(cfg, splits, module)
    if use_channels_last(cfg):
        module = module.to(memory_format=torch.channels_last)
    fit_module = torch.compile(module) if cfg.get("speed", {}).get("compile", False) else module

    loggers = build_loggers(cfg)
    trainer_kwargs: dict[str, Any] = {}
    if cfg.callbacks.progress_bar == "none":
        trainer_kwargs["enable_progress_bar"] = False
    memory = TrainingPeakMemory()
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=[*build_callbacks(cfg, has_logger=bool(loggers)), memory], logger=loggers or False,
        default_root_dir=str(out_dir), plugins=[AtomicCheckpointIO()], **trainer_kwargs,
    )
    extra: dict[str, Any] = {}
    # On cached features the frozen prefix is not needed until the run ends: off the device, out of DDP.
    module.detach_frozen_prefix()
    try:
        if (cfg.get("tune") or {}).get("lr_find") and resume_from is None:
            extra["lr_find"] = find_lr(trainer, module, datamodule, out_dir)
        fit_started = time.perf_counter()
        trainer.fit(fit_module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        feature_seconds = getattr(datamodule, "extract_seconds", 0.0)
        train_seconds = time.perf_counter() - fit_started - feature_seconds
        checkpoint = trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "") or None
        best_score = getattr(checkpoint, "best_model_score", None)

        test_started = time.perf_counter()
        ckpt_path = best_path
        if best_path and (cfg.get("regularization") or {}).get("ema_decay"):
            # Lightning's weight averaging would restore the raw weights from the checkpoint's
            # `current_model_state`; the averaged ones (its `state_dict`) are what val picked.
            best = torch.load(best_path, map_location="cpu", weights_only=True)
            module.complete_checkpoint(best, f"'{best_path}'")
            module.load_state_dict(best["state_dict"])
            ckpt_path = None
        results = trainer.test(fit_module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        test_seconds = time.perf_counter() - test_started
    finally:
        module.attach_frozen_prefix()
    test = {k.removeprefix("test/"): float(v) for k, v in (results[0] if results else {}).items()}
    extra["peak_memory"] = memory.overall()
    extra["peak_memory_training"] = memory.training

    summary = make_summary(
        cfg, splits, module, out_dir, augment=resolve_augment(cfg.data, cfg.strategy.name),
        feature_cache=str(datamodule.folder) if isinstance(datamodule, FeatureCacheDataModule) else None,
        epochs_run=int(trainer.current_epoch), global_steps=int(trainer.global_step),
        best_val_metric=float(best_score) if best_score is not None else None, best_checkpoint=best_path,
        test=test, seconds={"feature_extraction": feature_seconds, "training": train_seconds, "test": test_seconds,
                            "total": time.perf_counter() - started},
        device=device_name(trainer.strategy.root_device), extra=extra,
    )
    if trainer.is_global_zero:
        write_run_files(summary, module.confusion_matrix, splits.classes, out_dir)
        log_results(loggers, summary, out_dir)
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
    frozen = cfg.get("checkpoint_frozen_stages", "reference")
    if frozen not in MODES:
        raise SetupError(f"checkpoint_frozen_stages={frozen} must be reference (frozen stages rebuilt from their "
                         f"weights source on load) or store (kept in every checkpoint).")
    check_training_values(cfg)
    check_monitor(cfg)


def _in_range(name: str, value: Any, low: float, high: float, hint: str, low_open: bool = False,
              high_open: bool = False) -> None:
    """One clear error for a number outside [low, high] (open ends as flagged), naming the key."""
    number = float(value)
    if number < low or number > high or (low_open and number == low) or (high_open and number == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise SetupError(f"{name}={value} is outside {interval}; {hint}")


# what Lightning 2.x accepts as trainer.precision
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")


def check_training_values(cfg: DictConfig) -> None:
    """Values that would otherwise fail deep inside torch, or train silently on something else."""
    head, reg, opt = cfg.get("head") or {}, cfg.get("regularization") or {}, cfg.optimizer
    _in_range("head.dropout", head.get("dropout", 0.0), 0, 1, "a probability, e.g. head.dropout=0.2.", high_open=True)
    if int(head.get("hidden_dim", 512)) < 1:
        raise SetupError(f"head.hidden_dim={head.get('hidden_dim')} must be >= 1 (e.g. head.hidden_dim=512).")
    _in_range("loss.label_smoothing", (cfg.get("loss") or {}).get("label_smoothing", 0.0), 0, 1,
              "e.g. loss.label_smoothing=0.1.", high_open=True)
    if reg.get("ema_decay") is not None:
        _in_range("regularization.ema_decay", reg.ema_decay, 0, 1, "e.g. 0.999, or null to turn EMA off.",
                  low_open=True, high_open=True)
    for key in ("mixup_alpha", "cutmix_alpha"):
        _in_range(f"regularization.{key}", reg.get(key, 0.0), 0, math.inf, "0 turns it off, timm uses 0.2-1.0.")
    _in_range("regularization.mix_prob", reg.get("mix_prob", 1.0), 0, 1, "the chance a batch is mixed.")
    _in_range("optimizer.weight_decay", opt.get("weight_decay", 0.0), 0, math.inf, "e.g. 1e-4, or 0 for none.")
    if opt.get("layer_decay") is not None:
        _in_range("optimizer.layer_decay", opt.layer_decay, 0, 1, "each earlier stage's LR is multiplied by it "
                  "(e.g. 0.7); null turns it off.", low_open=True)
    fused_setting(opt.get("fused", "auto"))
    dtype = str(cfg.cache.get("dtype", "float32"))
    if dtype not in ("float32", "float16"):
        raise SetupError(f"cache.dtype={dtype} is not a storage type of the feature cache: use float32 or float16 "
                         f"(half the size).")
    workers = cfg.data.get("num_workers", "auto")
    if workers not in (None, "auto") and not str(workers).isdigit():
        raise SetupError(f"data.num_workers={workers} must be auto (sized from the machine) or an integer >= 0.")
    precision = cfg.trainer.get("precision", "32-true")
    if precision is not None and str(precision) not in PRECISIONS:  # None: Lightning's default
        raise SetupError(f"trainer.precision={precision} is not one Lightning knows: use one of "
                         f"{', '.join(PRECISIONS)} (e.g. bf16-mixed on a recent GPU, 32-true on a CPU).")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (int(epochs) == 0 or int(epochs) < -1):
        raise SetupError(f"trainer.max_epochs={epochs} trains nothing: use >= 1 (or -1 with trainer.max_steps).")


def check_monitor(cfg: DictConfig) -> None:
    """A misspelt monitor would fail only after the first epoch, with nothing saved: refuse it now."""
    if cfg.strategy.name != "linear_probe" and cfg.monitor not in MONITORS:
        raise SetupError(f"monitor={cfg.monitor} is not a metric finetune logs: use one of {', '.join(MONITORS)}.")
    mode = monitor_mode(cfg)
    direction = sweep_direction()
    wanted = {"max": "maximize", "min": "minimize"}[mode]
    if direction is not None and direction != wanted:
        raise SetupError(f"monitor={cfg.monitor} is best when it is {mode}imal, but this sweep's "
                         f"hydra.sweeper.direction={direction}: it would look for the worst runs. Set "
                         f"hydra.sweeper.direction={wanted} (or monitor_mode to match).")


def sweep_direction() -> str | None:
    """The Optuna sweeper's direction when this job runs in one (a single string), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        direction = (HydraConfig.get().get("sweeper") or {}).get("direction")
    except Exception:  # no Hydra context (train() called from Python)
        return None
    return str(direction) if isinstance(direction, str) else None
