"""Each piece of a run built from the typed config, in the order of DESIGN.md's data flow.

Module, datamodule (image loaders or the feature cache), callbacks, loggers and the Trainer. Every
function takes the checked :class:`~finetune.config.schema.FinetuneConfig` (or a part of it), never a
DictConfig, and reads attributes: the defaults live in the schema and the YAML, once.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class

from finetune.config.schema import (
    DataConfig,
    FinetuneConfig,
    ProgressBar,
    StrategyName,
)
from finetune.config.typed import plain
from finetune.data.datamodule import ImageDataModule, Transformed, resolve_num_workers
from finetune.data.datasets import Splits, class_counts, use_decoder
from finetune.data.device_decode import EncodedImages
from finetune.data.features import FeatureCacheDataModule, cache_key, code_identity, frozen_prefix, weights_identity
from finetune.data.images import image_loader
from finetune.data.transforms import describe, eval_transform, train_transform
from finetune.errors import SetupError
from finetune.model.backbones import Preprocessing, preprocessing_for, weights_source
from finetune.model.module import FinetuneModule
from finetune.model.unfreezing import StageUnfreezer
from finetune.progress import counted
from finetune.run import fast_log
from finetune.run.resume import (
    AtomicCheckpointIO,
    FiniteLoss,
    InterruptCheckpoint,
    ResumeInEpoch,
    RNGState,
)

log = logging.getLogger(__name__)


def build_module(cfg: FinetuneConfig, splits: Splits, identity: dict[str, Any] | None = None) -> FinetuneModule:
    prep = preprocessing_for(cfg.backbone.name).at_size(cfg.data.image_size)
    if not cfg.data.center_crop:
        prep = prep.without_border_crop()
    prep = replace(prep, decode=str(cfg.data.decode))
    return FinetuneModule(
        backbone=cfg.backbone.name,
        num_classes=splits.num_classes,
        weights=resolved_weights(cfg.backbone.weights),
        strategy=str(cfg.strategy.name),
        unfreeze_last=cfg.strategy.unfreeze_last,
        backbone_lr_ratio=float(cfg.strategy.backbone_lr_ratio),
        class_names=list(splits.classes),
        head=plain(cfg.head),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        label_smoothing=float(cfg.loss.label_smoothing),
        preprocessing={"resize_size": prep.resize_size, "crop_size": prep.crop_size,
                       "mean": list(prep.mean), "std": list(prep.std), "interpolation": prep.interpolation,
                       "decode": prep.decode},
        milestones=list(cfg.strategy.milestones or []) or None,
        freeze_epochs=cfg.strategy.freeze_epochs,
        class_weights=resolve_class_weights(cfg.loss.class_weights, splits),
        regularization=plain(cfg.regularization),
        checkpoint_frozen_stages=str(cfg.checkpoint_frozen_stages),
        identity=identity,
    )


def resolved_weights(weights: str) -> str:
    """'imagenet', 'none', or the weights file as an absolute path: checkpoints rebuild frozen stages from
    it, from whatever directory they are loaded."""
    if weights_source(weights) != "file":
        return str(weights)
    return str(Path(weights).expanduser().resolve())


def resolve_class_weights(value: Any, splits: Splits) -> list[float] | None:
    """``auto``: inverse class frequency of the train split (n / (classes x count)), as sklearn's 'balanced'."""
    if value is None:
        return None
    if value != "auto":
        weights = [float(w) for w in value]
        if len(weights) != splits.num_classes:
            raise SetupError(f"loss.class_weights has {len(weights)} values for {splits.num_classes} classes.")
        return weights
    counts = class_counts(splits.train, splits.num_classes)
    total = sum(counts)
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


def resolve_augment(data: DataConfig, strategy: StrategyName) -> bool:
    """``auto``: no augmentation for feature_extractor (the linear-probe protocol), else on."""
    if data.augment == "auto":
        return strategy not in (StrategyName.feature_extractor, StrategyName.linear_probe)
    return bool(data.augment)


def decide_cache(cfg: FinetuneConfig, frozen_prefix_len: int, augment: bool) -> tuple[bool, str]:
    """Whether the feature cache serves this run, and a one-line note when it does not."""
    if cfg.cache.enabled is False:
        return False, ""
    if frozen_prefix_len == 0:
        return False, "feature cache off: no leading stage is frozen (full_finetune)."
    if augment and cfg.cache.views <= 0:
        return False, ("feature cache off: train augmentation changes the input every epoch; set "
                       "data.augment=false (linear-probe protocol) or cache.views=K to cache K augmented views.")
    return True, ""


def training_processes(cfg: FinetuneConfig) -> int | None:
    """How many processes Lightning will train in (None: not known before it starts)."""
    trainer = cfg.trainer
    if int(trainer.num_nodes or 1) > 1:
        return None
    if str(trainer.strategy) not in ("auto", "single_device"):
        return None  # ddp, fsdp, deepspeed ... (a world of one too: its hooks differ)
    devices = trainer.devices
    if devices in ("auto", -1, "-1"):
        if str(trainer.accelerator) == "cpu" or not torch.cuda.is_available():
            return 1
        return max(1, torch.cuda.device_count())
    if isinstance(devices, int):
        return devices
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return None


SCALED_PRECISIONS = ("16-mixed", "16")  # a GradScaler: gradients are unscaled inside Lightning's optimizer step


def decide_blocks(cfg: FinetuneConfig) -> tuple[int, str]:
    """Optimizer steps per Lightning step on cached features (0: one step per batch), and why not when 0.

    Blocks need manual optimization, where Lightning does not accumulate gradients (the module clips them
    itself, except under a gradient scaler, 16-mixed, whose unscaling happens inside Lightning's step), and
    train batches that are whole blocks (no batch limits, no mid-epoch validation, no lr_find sweep); the
    resident features are one process's (no DDP).
    """
    if cfg.cache.resident is False:
        return 0, ""
    trainer = cfg.trainer
    why = ""
    if training_processes(cfg) != 1:
        why = "the run is not a single process (trainer.devices, strategy or num_nodes)"
    elif int(trainer.accumulate_grad_batches) != 1:
        why = "trainer.accumulate_grad_batches is set"
    elif trainer.gradient_clip_val and str(trainer.precision) in SCALED_PRECISIONS:
        why = f"trainer.gradient_clip_val is set under trainer.precision={trainer.precision} (a gradient scaler)"
    elif cfg.tune.lr_find:
        why = "tune.lr_find is on"
    elif trainer.fast_dev_run:
        why = "trainer.fast_dev_run is on"
    elif trainer.limit_train_batches not in (None, 1, 1.0) or trainer.overfit_batches not in (None, 0, 0.0):
        why = "trainer.limit_train_batches or overfit_batches is set"
    elif trainer.val_check_interval not in (None, 1, 1.0):
        why = "trainer.val_check_interval is set"
    if not why:
        return int(cfg.cache.steps_per_block), ""
    if cfg.cache.resident is True:
        raise SetupError(f"cache.resident=true cannot hold this run's train features on the device: {why}. Set "
                         f"cache.resident=auto (batches are then read from the cache files), or change that setting.")
    return 0, f"feature cache: one optimizer step per batch read from the cache files, because {why}."


def use_channels_last(cfg: FinetuneConfig) -> bool:
    """``auto``: channels_last, for training and for the frozen-prefix extraction alike, on CPU and CUDA.

    Measured (BENCHMARKS.md): 1.2-1.4x faster inference forward and ~5-10% faster training steps on a
    CPU core, 1.5x for bf16 on an H200. Extraction and training must use the same layout: on CPU the
    cached features are then bit-identical to what the uncached path computes (per-sample results do
    not depend on the batch size there), so a cached run reproduces an uncached one exactly.
    """
    return True if cfg.speed.channels_last == "auto" else bool(cfg.speed.channels_last)


def apply_tf32(value: Any) -> None:
    """``speed.tf32``: auto = PyTorch's defaults (cuDNN convolutions in TF32, matmuls in full fp32).

    true: convolutions and matmuls in TF32 (faster on Ampere and later); false: both in full fp32
    (closer results, e.g. cached vs uncached features; BENCHMARKS.md, cache fidelity). Set for the
    whole process, so every run applies its own (also ``auto``: a sweep's jobs do not inherit).
    Through the API Lightning itself reads (``get_float32_matmul_precision``): torch refuses a mix
    of that and the newer ``fp32_precision`` attributes.
    """
    conv, matmul = {"auto": (True, "highest"), True: (True, "high"), False: (False, "highest")}[value]
    torch.backends.cudnn.allow_tf32 = conv
    torch.set_float32_matmul_precision(matmul)


def build_datamodule(
    cfg: FinetuneConfig, splits: Splits, module: FinetuneModule
) -> ImageDataModule | FeatureCacheDataModule:
    """Image loaders, or cached frozen-prefix outputs (then ``module.input_stage`` skips the prefix)."""
    prep = Preprocessing(**module.hparams.preprocessing)  # one source: what the checkpoint records
    augment = resolve_augment(cfg.data, cfg.strategy.name)
    train_tf = train_transform(prep, augment, cfg.data.hflip)
    eval_tf = eval_transform(prep)
    policy = str(cfg.data.on_bad_image)
    use_decoder(splits, image_loader(prep.decode, prep.resize_size, cfg.data.max_pixels))
    # device: the same transforms, run on the training device after a batched decode there
    wrap = EncodedImages if prep.decode == "device" else Transformed
    images = {"train": wrap(splits.train, train_tf, policy), "val": wrap(splits.val, eval_tf, policy),
              "test": wrap(splits.test, eval_tf, policy)}
    prefix_len = module.cacheable_prefix
    cached, note = decide_cache(cfg, prefix_len, augment)
    if note:
        log.info(note)
    if not cached:
        return ImageDataModule(images["train"], images["val"], images["test"], batch_size=cfg.data.batch_size,
                               num_workers=cfg.data.num_workers, balanced=cfg.data.balanced_sampler, seed=cfg.seed)
    views = max(1, cfg.cache.views) if augment else 1
    meta = {
        "backbone": cfg.backbone.name,
        "weights": weights_identity(cfg.backbone.name, cfg.backbone.weights, cfg.seed),
        "frozen_stages": module.backbone.stage_names[:prefix_len],
        "train_transform": describe(train_tf),
        "eval_transform": describe(eval_tf),
        "data": hashlib.sha256(splits.fingerprint.encode()).hexdigest(),
        "split_sizes": [len(splits.train), len(splits.val), len(splits.test)],
        "views": views,
        "dtype": str(cfg.cache.dtype),
        "code": code_identity(cfg.backbone.name),
        **({"decode": prep.decode} if prep.decode != "pil" else {}),  # pil: the key of caches made before the field
    }
    folder = Path(cfg.cache.dir).expanduser() / f"{cfg.backbone.name.replace('/', '_')}-{cache_key(meta)}"
    module.input_stage = prefix_len
    steps_per_block, note = decide_blocks(cfg)
    if note:
        log.info(note)
    if steps_per_block:
        clip = cfg.trainer.gradient_clip_val
        module.use_blocks(steps_per_block, clip=(float(clip), str(cfg.trainer.gradient_clip_algorithm or "norm"))
                          if clip else None)
    return FeatureCacheDataModule(
        images, frozen_prefix(module.backbone, prefix_len), folder, meta, batch_size=cfg.data.batch_size,
        num_workers=resolve_num_workers(cfg.data.num_workers), dtype=meta["dtype"],
        train_views=views, channels_last=use_channels_last(cfg), balanced=cfg.data.balanced_sampler,
        extract_batch_size=cfg.cache.batch_size, seed=cfg.seed, steps_per_block=steps_per_block,
        resident=cfg.cache.resident,
    )


def build_callbacks(cfg: FinetuneConfig, has_logger: bool = True) -> list[pl.Callback]:
    from pytorch_lightning.callbacks import (
        EarlyStopping,
        LearningRateMonitor,
    )

    from finetune.run.bars import FittingRichBar, FittingTqdmBar
    from finetune.run.interrupts import CtrlCAtBatchEnd
    from finetune.run.model_summary import StageSummary

    cb = cfg.callbacks
    mode = cfg.best_mode()
    callbacks: list[pl.Callback] = [
        instantiate_node(cb.checkpoint, mode=mode),
        instantiate_node(cb.last_checkpoint),
        RNGState(),
        InterruptCheckpoint(Path(cfg.paths.output_dir) / "checkpoints"),
        CtrlCAtBatchEnd(),
        ResumeInEpoch(),
        FiniteLoss(),
        StageUnfreezer(),
    ]
    if cfg.trainer.enable_model_summary is not False:
        callbacks.append(StageSummary())  # instead of Lightning's, which counts a cached prefix as 0
    if cfg.regularization.ema_decay:
        from pytorch_lightning.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=float(cfg.regularization.ema_decay)))
    if cb.early_stopping.enabled:
        callbacks.append(EarlyStopping(monitor=cfg.monitor, mode=mode, patience=cb.early_stopping.patience,
                                       min_delta=cb.early_stopping.min_delta))
    if cb.lr_monitor and has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if cb.progress_bar == ProgressBar.rich:
        callbacks.append(FittingRichBar())
    elif cb.progress_bar == ProgressBar.tqdm:
        callbacks.append(FittingTqdmBar())
    return callbacks


def instantiate_node(node: Any, **overrides: Any) -> Any:
    """A ``_target_`` dataclass node as its object: only the arguments it sets away from the target's defaults."""
    kwargs = {k: v for k, v in plain(node).items() if k != "_target_"}
    target = get_class(node._target_)
    params = inspect.signature(target.__init__).parameters
    kwargs = {k: v for k, v in kwargs.items()
              if k not in params or type(v) is not type(params[k].default) or v != params[k].default}
    return target(**{**kwargs, **overrides})


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


def build_loggers(cfg: FinetuneConfig) -> list[Any]:
    """Loggers from the config; wandb goes offline without an API key (sync later with `wandb sync`)."""
    loggers = []
    if cfg.logger.csv is not None:
        loggers.append(instantiate_node(cfg.logger.csv))
    if cfg.logger.tensorboard is not None:
        loggers.append(instantiate_node(cfg.logger.tensorboard))
    if cfg.logger.wandb is not None:
        node = cfg.logger.wandb
        offline = node.offline if node.offline is not None else not os.environ.get("WANDB_API_KEY")
        Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate_node(node, offline=bool(offline), group=node.group or _sweep_group()))
    for logger in loggers:
        logger.log_hyperparams(plain(cfg))
    return loggers


def build_trainer(cfg: FinetuneConfig, callbacks: list[pl.Callback], loggers: list[Any],
                  train_images: int | None = None, manual_optimization: bool = False) -> pl.Trainer:
    """The Trainer; with ``train_images``, step logging no sparser than once per epoch (small data).

    ``manual_optimization`` (cached blocks): the module clips gradients itself (FinetuneModule.use_blocks), and
    Lightning refuses a Trainer-level gradient_clip_val under manual optimization."""
    fast_log.install()  # self.log without Lightning's rebuild of the logged metric per call
    extra: dict[str, Any] = {"enable_model_summary": False}  # StageSummary (build_callbacks) tells the truth
    if manual_optimization:
        extra["gradient_clip_val"] = None
    if train_images is not None and cfg.trainer.log_every_n_steps is not None:
        extra["log_every_n_steps"] = logging_interval(cfg, train_images)
    if cfg.callbacks.progress_bar == ProgressBar.none:
        extra["enable_progress_bar"] = False
    return instantiate_node(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                            default_root_dir=cfg.paths.output_dir, plugins=[AtomicCheckpointIO()], **extra)


def logging_interval(cfg: FinetuneConfig, train_images: int) -> int:
    """``trainer.log_every_n_steps``, at most the train batches per epoch and rank: on small data the step
    loss is then still logged each epoch, and Lightning has no "fewer batches than the interval" to warn of."""
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0 else 1
    world = devices * max(1, int(cfg.trainer.num_nodes or 1))
    batches = max(1, train_images // cfg.data.batch_size // world)
    return max(1, min(int(cfg.trainer.log_every_n_steps), batches))


def check_data(cfg: FinetuneConfig) -> Any:
    """Scan a folder dataset before training (nothing written yet); None for other sources or data.check=false.

    Files unchanged since an earlier run's check (size, mtime) are not decoded again (memo in the cache dir).
    """
    data = cfg.data
    if data.name != "folder" or not data.check:
        return None
    from finetune.data.checks import check_image_tree

    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise SetupError(f"data.root='{data.root}' does not exist or is not a folder (data=folder needs it).")
    root = root.absolute()
    memo_name = f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    memo = Path(cfg.cache.dir).expanduser() / "data_checks" / memo_name
    with counted("checking images") as report:
        return check_image_tree(root, data.max_pixels, progress=report, memo=memo)
