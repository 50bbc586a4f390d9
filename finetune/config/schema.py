"""The config schema: one dataclass per group, the YAML in conf/ validated against it at composition.

Hydra merges every group's YAML into the typed nodes of :class:`FinetuneConfig` (registered as
``finetune_schema``, the first entry of conf/config.yaml's defaults list): a wrong type, an unknown
choice or an unknown key (also one added with ``+``) fails while the config is composed. Ranges and
cross-field rules live in each dataclass's ``validate()``; :func:`finetune.config.typed.to_typed` calls
the root's once, so code below the entry point reads attributes of checked objects.

Every field is declared once as result-defining (:func:`result`) or result-neutral (:func:`neutral`):
a run's identity (:mod:`finetune.config.identity`) is its result-defining part.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from finetune.config.problems import ConfigProblem
from finetune.errors import SetupError

# Field roles (dataclass field metadata "role"): what a run's identity is made of.
RESULT, NEUTRAL = "result", "neutral"


def result(default: Any = MISSING, *, factory: Any = None, doc: str = "") -> Any:
    """A field whose value changes what a run computes: resume, sweep skip and extension compare it."""
    return _field(RESULT, default, factory, doc)


def neutral(default: Any = MISSING, *, factory: Any = None, doc: str = "") -> Any:
    """A field that changes where files go, how a run is shown or where it runs, never its result."""
    return _field(NEUTRAL, default, factory, doc)


def _field(role: str, default: Any, factory: Any, doc: str) -> Any:
    meta = {"role": role, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Choice(str, Enum):
    """A closed set of words: OmegaConf refuses any other at composition; reads and prints as the word."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


TIMM_PREFIX = "timm/"  # the id of a timm model below the door: timm/<timm name> (conf/backbone/timm.yaml)


class BackboneLibrary(Choice):
    torchvision = "torchvision"
    timm = "timm"


class StrategyName(Choice):
    feature_extractor = "feature_extractor"
    partial_unfreeze = "partial_unfreeze"
    full_finetune = "full_finetune"
    gradual_unfreeze = "gradual_unfreeze"
    freeze_then_finetune = "freeze_then_finetune"
    linear_probe = "linear_probe"


class DataName(Choice):
    digits = "digits"
    folder = "folder"
    flowers102 = "flowers102"
    cifar10 = "cifar10"


class OptimizerName(Choice):
    adamw = "adamw"
    sgd = "sgd"


class SchedulerName(Choice):
    cosine = "cosine"
    none = "none"


class HeadType(Choice):
    linear = "linear"
    mlp = "mlp"


class DecodeMode(Choice):
    pil = "pil"
    pil_draft = "pil_draft"
    torchvision = "torchvision"
    device = "device"


class OnBadImage(Choice):
    skip = "skip"
    error = "error"


class CacheDtype(Choice):
    float32 = "float32"
    float16 = "float16"


class ProgressBar(Choice):
    rich = "rich"
    tqdm = "tqdm"
    none = "none"


class MonitorMode(Choice):
    auto = "auto"
    max = "max"
    min = "min"


class FrozenStagesInCheckpoints(Choice):
    reference = "reference"
    store = "store"


# Metrics finetune logs that can pick the best checkpoint (and be a sweep's objective).
MONITORS = ("val/acc", "val/mean_class_acc", "val/f1_macro", "val/top5", "val/loss", "train/acc", "train/loss_epoch")
# What Lightning 2.x accepts as trainer.precision.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64")
AUTO_BOOL = ("auto", True, False)


def in_range(key: str, value: float, low: float, high: float, hint: str, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """A ConfigProblem for a number outside [low, high] (open ends as flagged), naming the key."""
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigProblem(key, value, f"is outside {interval}", hint)


def one_of(key: str, value: Any, allowed: tuple[Any, ...], hint: str = "") -> None:
    if value not in allowed:
        words = ", ".join("null" if a is None else str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise ConfigProblem(key, value, f"is not one of {words}", hint)


def at_least(key: str, value: int | float | None, low: int | float, hint: str = "", *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        raise ConfigProblem(key, value, f"must be >= {low}", hint)


def unused(key: str, value: Any, where: str) -> None:
    """A key set for a choice that does not read it: refused rather than silently ignored."""
    if value is not None:
        raise ConfigProblem(key, value, f"is not read by {where}", "remove it, or choose the option it belongs to.")


@dataclass
class BackboneConfig:
    name: str = result(MISSING, doc="torchvision model name (conf/backbone/ lists them), or timm's (library=timm)")
    weights: str = result("imagenet", doc="imagenet | none | path to a state_dict or finetune checkpoint")
    library: BackboneLibrary = result(BackboneLibrary.torchvision, doc="torchvision | timm (backbone=timm sets it)")

    def __post_init__(self) -> None:
        # One id per model below the door (summary.json, checkpoints, the registry): a timm model's is timm/<name>.
        if self.library == BackboneLibrary.timm and not str(self.name).startswith(TIMM_PREFIX):
            self.name = f"{TIMM_PREFIX}{self.name}"
        elif str(self.name).startswith(TIMM_PREFIX):
            self.library = BackboneLibrary.timm

    def validate(self) -> None:
        if not str(self.weights).strip():
            raise ConfigProblem("backbone.weights", self.weights, "is empty", "use imagenet, none or a file path.")


@dataclass
class StrategyConfig:
    name: StrategyName = result(MISSING, doc="which stages train")
    unfreeze_last: int | None = result(None, doc="partial_unfreeze: the last N stages train")
    backbone_lr_ratio: float = result(0.1, doc="backbone LR = optimizer.lr x this")
    milestones: list[int] | None = result(None, doc="gradual_unfreeze: epochs at which one more stage trains")
    freeze_epochs: int | None = result(None, doc="freeze_then_finetune: head-only epochs")
    c_min: float | None = result(None, doc="linear_probe: smallest C of the grid")
    c_max: float | None = result(None, doc="linear_probe: largest C of the grid")
    c_num: int | None = result(None, doc="linear_probe: grid size")
    max_iter: int | None = result(None, doc="linear_probe: L-BFGS iterations")

    def validate(self) -> None:
        name = StrategyName(self.name)
        in_range("strategy.backbone_lr_ratio", self.backbone_lr_ratio, 0, math.inf, "e.g. 0.1 (0 freezes in effect).")
        if name == StrategyName.partial_unfreeze:
            at_least("strategy.unfreeze_last", self.unfreeze_last, 1, "the number of last stages that train, e.g. 2.")
        # unfreeze_last is left alone for other strategies: a -m grid over strategies shares it (and an Optuna
        # search samples it) while only partial_unfreeze reads it. The keys below belong to one strategy each.
        if name == StrategyName.gradual_unfreeze:
            if not self.milestones:
                raise ConfigProblem("strategy.milestones", self.milestones, "must list epochs", "e.g. [2,4,6].")
            if any(m < 1 for m in self.milestones) or sorted(set(self.milestones)) != list(self.milestones):
                raise ConfigProblem("strategy.milestones", self.milestones, "must be increasing epochs >= 1",
                                    "e.g. strategy.milestones=[2,4,6].")
        else:
            unused("strategy.milestones", self.milestones, f"strategy={name}")
        if name == StrategyName.freeze_then_finetune:
            at_least("strategy.freeze_epochs", self.freeze_epochs, 1, "head-only epochs before every stage trains.")
        else:
            unused("strategy.freeze_epochs", self.freeze_epochs, f"strategy={name}")
        probe = {"c_min": self.c_min, "c_max": self.c_max, "c_num": self.c_num, "max_iter": self.max_iter}
        if name == StrategyName.linear_probe:
            for key, value in probe.items():
                if value is None or value <= 0:
                    raise ConfigProblem(f"strategy.{key}", value, "must be > 0", "see conf/strategy/linear_probe.yaml.")
            if self.c_min > self.c_max:  # type: ignore[operator]
                raise ConfigProblem("strategy.c_min", self.c_min, f"is above strategy.c_max={self.c_max}",
                                    "the grid runs from c_min to c_max.")
        else:
            for key, value in probe.items():
                unused(f"strategy.{key}", value, f"strategy={name}")


@dataclass
class DataConfig:
    name: DataName = result(MISSING, doc="the dataset source")
    root: str | None = result(None, doc="where the data lives (data=folder: your image tree)")
    download: bool = neutral(False, doc="download torchvision datasets when missing")
    image_size: int | None = result(None, doc="crop size; null: the weights' own")
    center_crop: bool = result(True, doc="false: resize the short side to image_size, no border cut off (small "
                                         "sources such as CIFAR's 32 px photos lose 12.5% of each side otherwise)")
    batch_size: int = result(32)
    num_workers: Any = neutral("auto", doc="auto (from the machine) or an integer >= 0")
    augment: Any = result("auto", doc="auto | true | false")
    hflip: bool = result(True)
    val_fraction: float | None = result(None, doc="share of the images held out for val (unsplit data)")
    test_fraction: float | None = result(None, doc="share held out for test (unsplit data)")
    split_seed: int = result(0)
    balanced_sampler: bool = result(False, doc="draw every class equally often in training")
    min_per_class: int | None = result(None, doc="data=folder: refuse a class with fewer usable images")
    check: bool = neutral(True, doc="scan every image before training (data=folder)")
    on_bad_image: OnBadImage = neutral(OnBadImage.skip, doc="skip | error")
    max_pixels: int = neutral(89_478_485, doc="decompression-bomb limit per image")
    decode: DecodeMode = result(DecodeMode.torchvision,
                                doc="torchvision (torchvision.io.decode_jpeg for RGB JPEGs, Pillow for the rest) | pil "
                                    "| pil_draft (JPEG at 1/2-1/8 scale when the resize allows) | device (JPEGs "
                                    "decoded in batches on the training device, nvjpeg on CUDA, the crop, resize, "
                                    "flip and normalise there)")

    def validate(self) -> None:
        if self.image_size is not None and self.image_size < 32:
            raise ConfigProblem("data.image_size", self.image_size, "is too small",
                                "backbones downsample by 32: use >= 32, or null for the weights' own size.")
        at_least("data.batch_size", self.batch_size, 1, "e.g. data.batch_size=32.")
        if self.num_workers != "auto" and not (isinstance(self.num_workers, int) and not isinstance(
                self.num_workers, bool) and self.num_workers >= 0):
            raise ConfigProblem("data.num_workers", self.num_workers, "must be auto or an integer >= 0",
                                "auto sizes it from the machine.")
        one_of("data.augment", self.augment, AUTO_BOOL, "auto: off for feature_extractor, on otherwise.")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if value is not None:
                in_range(f"data.{key}", value, 0, 1, "a share of the images, e.g. 0.1; an empty split has nothing "
                         "to measure.", low_open=True, high_open=True)
        if (self.val_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ConfigProblem("data.val_fraction", self.val_fraction, f"plus data.test_fraction={self.test_fraction} "
                                "leaves no training images", "keep their sum below 1, e.g. 0.1 and 0.1.")
        at_least("data.max_pixels", self.max_pixels, 1, "pixels per image above which a file counts as a bomb.")
        at_least("data.min_per_class", self.min_per_class, 1, "null turns the check off.", optional=True)
        if self.name == DataName.folder and self.root is None:
            raise SetupError("data.root has no value and needs one: data=folder reads your images from "
                             "data.root=/path/to/images (class folders inside, or train/ val/ test/ of them).")


@dataclass
class OptimizerConfig:
    name: OptimizerName = result(MISSING)
    lr: float = result(1e-3, doc="head LR")
    weight_decay: float = result(1e-4)
    no_decay_norm_bias: bool = result(True, doc="no weight decay on biases and norm layers")
    layer_decay: float | None = result(None, doc="stage LR = lr x layer_decay^(distance from the head)")
    fused: Any = result("auto", doc="auto (on CUDA or CPU) | true | false")
    momentum: float | None = result(None, doc="sgd")
    nesterov: bool | None = result(None, doc="sgd")

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigProblem("optimizer.lr", self.lr, "must be > 0", "e.g. optimizer.lr=1e-3.")
        in_range("optimizer.weight_decay", self.weight_decay, 0, math.inf, "e.g. 1e-4, or 0 for none.")
        if self.layer_decay is not None:
            in_range("optimizer.layer_decay", self.layer_decay, 0, 1, "each earlier stage's LR is multiplied by it "
                     "(e.g. 0.7); null turns it off.", low_open=True)
        one_of("optimizer.fused", self.fused, AUTO_BOOL, "auto: one fused kernel per step on CUDA or CPU.")
        if self.name == OptimizerName.sgd:
            in_range("optimizer.momentum", 0.0 if self.momentum is None else self.momentum, 0, 1, "e.g. 0.9.",
                     high_open=True)
        else:
            unused("optimizer.momentum", self.momentum, f"optimizer={self.name}")
            unused("optimizer.nesterov", self.nesterov, f"optimizer={self.name}")


def _signature_defaults(cls: type, skip: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(name, default) of each named argument of ``cls``, in order, except ``skip``."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    return [(p.name, p.default) for p in params if p.kind in named and p.name not in ("self", *skip)]


# Trainer arguments that change where or how visibly a run executes, not its numbers.
NEUTRAL_TRAINER_ARGS = frozenset({
    "accelerator", "devices", "num_nodes", "strategy", "enable_checkpointing", "enable_progress_bar",
    "enable_model_summary", "log_every_n_steps", "profiler", "detect_anomaly", "barebones", "num_sanity_val_steps",
    "enable_autolog_hparams", "model_registry", "inference_mode", "_target_",
})
# Set by finetune itself (from callbacks, logger and paths): not keys of trainer.
TRAINER_OWN = ("logger", "callbacks", "plugins", "default_root_dir")
TRAINER_TYPES: dict[str, Any] = {
    "max_epochs": int | None, "min_epochs": int | None, "max_steps": int, "min_steps": int | None,
    "num_nodes": int, "log_every_n_steps": int | None, "num_sanity_val_steps": int | None,
    "accumulate_grad_batches": int, "gradient_clip_val": float | None, "check_val_every_n_epoch": int | None,
    "reload_dataloaders_every_n_epochs": int, "fast_dev_run": Any, "enable_model_summary": bool | None,
    "enable_checkpointing": bool | None, "enable_progress_bar": bool | None, "sync_batchnorm": bool,
    "use_distributed_sampler": bool, "inference_mode": bool, "detect_anomaly": bool, "barebones": bool,
}


def _trainer_config() -> type:
    """Every ``pytorch_lightning.Trainer`` argument as a field: any real one works, a typo fails."""
    import pytorch_lightning as pl

    fields: list[tuple[str, Any, Any]] = [("_target_", str, neutral("pytorch_lightning.Trainer"))]
    for name, default in _signature_defaults(pl.Trainer, TRAINER_OWN):
        role = neutral if name in NEUTRAL_TRAINER_ARGS else result
        fields.append((name, TRAINER_TYPES.get(name, Any), role(default)))
    return dataclasses.make_dataclass("TrainerConfig", fields, namespace={"validate": _validate_trainer})


def _validate_trainer(self: Any) -> None:
    if self.precision is not None and str(self.precision) not in PRECISIONS:
        raise ConfigProblem("trainer.precision", self.precision, "is not a precision Lightning knows",
                            f"use one of {', '.join(PRECISIONS)} (bf16-mixed on a recent GPU, 32-true on a CPU).")
    epochs = self.max_epochs
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise ConfigProblem("trainer.max_epochs", epochs, "trains nothing", "use >= 1 (or -1 with trainer.max_steps).")
    at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1, optional=True)
    at_least("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
    if self.gradient_clip_val is not None:
        in_range("trainer.gradient_clip_val", self.gradient_clip_val, 0, math.inf, "e.g. 1.0, or null for none.")


TrainerConfig = _trainer_config()


def _checkpoint_config() -> type:
    """``ModelCheckpoint`` arguments as fields (paths and bookkeeping: result-neutral)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    fields: list[tuple[str, Any, Any]] = [("_target_", str, neutral("pytorch_lightning.callbacks.ModelCheckpoint"))]
    types = {"save_top_k": int, "every_n_epochs": int | None, "auto_insert_metric_name": bool,
             "enable_version_counter": bool, "save_last": bool | None}
    for name, default in _signature_defaults(ModelCheckpoint, ("mode",)):  # mode: from monitor_mode
        fields.append((name, types.get(name, Any), neutral(default)))
    return dataclasses.make_dataclass("CheckpointConfig", fields)


CheckpointConfig = _checkpoint_config()


@dataclass
class EarlyStoppingConfig:
    enabled: bool = result(False)
    patience: int = result(5)
    min_delta: float = result(0.0)

    def validate(self) -> None:
        at_least("callbacks.early_stopping.patience", self.patience, 0)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = neutral(factory=CheckpointConfig, doc="the best checkpoint (on monitor)")
    last_checkpoint: CheckpointConfig = neutral(factory=CheckpointConfig, doc="last.ckpt every epoch (resume reads it)")
    early_stopping: EarlyStoppingConfig = result(factory=EarlyStoppingConfig)
    lr_monitor: bool = neutral(True)
    progress_bar: ProgressBar = neutral(ProgressBar.rich, doc="rich | tqdm | none")


@dataclass
class CSVLoggerConfig:
    _target_: str = neutral("pytorch_lightning.loggers.CSVLogger")
    save_dir: str = neutral(MISSING)
    name: str = neutral("csv")
    version: Any = neutral("")


@dataclass
class TensorBoardLoggerConfig:
    _target_: str = neutral("pytorch_lightning.loggers.TensorBoardLogger")
    save_dir: str = neutral(MISSING)
    name: str = neutral("tensorboard")
    version: Any = neutral("")


@dataclass
class WandbLoggerConfig:
    _target_: str = neutral("pytorch_lightning.loggers.WandbLogger")
    project: str = neutral("finetune")
    save_dir: str = neutral(MISSING)
    offline: bool | None = neutral(None, doc="null: offline unless WANDB_API_KEY is set")
    group: str | None = neutral(None, doc="null: the sweep folder's name in a multirun")
    name: str | None = neutral(None)
    entity: str | None = neutral(None)
    tags: list[str] | None = neutral(None)
    log_model: Any = neutral(False)


@dataclass
class LoggerConfig:
    csv: CSVLoggerConfig | None = neutral(None)
    tensorboard: TensorBoardLoggerConfig | None = neutral(None)
    wandb: WandbLoggerConfig | None = neutral(None)


@dataclass
class PathsConfig:
    data_dir: str = neutral("./data")
    cache_dir: str = neutral("./.cache/finetune")
    output_dir: str = neutral(MISSING, doc="the run directory (Hydra's)")


@dataclass
class HeadConfig:
    type: HeadType = result(HeadType.linear)
    hidden_dim: int = result(512, doc="mlp")
    dropout: float = result(0.0)

    def validate(self) -> None:
        in_range("head.dropout", self.dropout, 0, 1, "a probability, e.g. head.dropout=0.2.", high_open=True)
        at_least("head.hidden_dim", self.hidden_dim, 1, "e.g. head.hidden_dim=512.")


@dataclass
class LossConfig:
    label_smoothing: float = result(0.0)
    class_weights: Any = result(None, doc="null | auto | one weight per class")

    def __post_init__(self) -> None:
        if self.class_weights in ("none", "null", False):  # every spelling of "no class weights": one setting
            self.class_weights = None

    def validate(self) -> None:
        in_range("loss.label_smoothing", self.label_smoothing, 0, 1, "e.g. loss.label_smoothing=0.1.", high_open=True)
        weights = self.class_weights
        if weights in (None, "auto"):
            return
        if not isinstance(weights, list | tuple) or not weights or not all(
                isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights):
            raise ConfigProblem("loss.class_weights", weights, "is not null, auto or a list of weights >= 0",
                                "e.g. loss.class_weights=auto or loss.class_weights=[1.0,2.5].")


@dataclass
class RegularizationConfig:
    mixup_alpha: float = result(0.0)
    cutmix_alpha: float = result(0.0)
    mix_prob: float = result(1.0)
    ema_decay: float | None = result(None)
    tta_hflip: bool = result(False)

    def validate(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            in_range(f"regularization.{key}", getattr(self, key), 0, math.inf, "0 turns it off, timm uses 0.2-1.0.")
        in_range("regularization.mix_prob", self.mix_prob, 0, 1, "the chance a batch is mixed.")
        if self.ema_decay is not None:
            in_range("regularization.ema_decay", self.ema_decay, 0, 1, "e.g. 0.999, or null to turn EMA off.",
                     low_open=True, high_open=True)


@dataclass
class TuneConfig:
    lr_find: bool = result(False, doc="Lightning's LR range test before fit")


@dataclass
class CacheConfig:
    enabled: Any = result("auto", doc="auto | true | false")
    views: int = result(0, doc="augmented views cached per train image")
    dtype: CacheDtype = result(CacheDtype.float32)
    batch_size: int | None = result(None, doc="extraction batch; null: data.batch_size")
    dir: str = neutral(MISSING)
    resident: Any = neutral("auto", doc="auto | true | false: cached train features on the training device")
    steps_per_block: int = neutral(256, doc="optimizer steps per Lightning step on resident features, at most "
                                   "(fewer where a block would pass 64 MiB)")

    def validate(self) -> None:
        one_of("cache.enabled", self.enabled, AUTO_BOOL)
        one_of("cache.resident", self.resident, AUTO_BOOL)
        at_least("cache.views", self.views, 0, "0: no augmented views.")
        at_least("cache.batch_size", self.batch_size, 1, optional=True)
        at_least("cache.steps_per_block", self.steps_per_block, 1, "1: one optimizer step per Lightning step.")


@dataclass
class SpeedConfig:
    channels_last: Any = result("auto", doc="auto | true | false")
    compile: bool = result(False)
    tf32: Any = result("auto", doc="auto | true | false")

    def validate(self) -> None:
        one_of("speed.channels_last", self.channels_last, AUTO_BOOL)
        one_of("speed.tf32", self.tf32, AUTO_BOOL)


@dataclass
class SchedulerConfig:
    name: SchedulerName = result(SchedulerName.cosine, doc="cosine (with linear warmup) | none")
    warmup_epochs: int = result(1)
    min_lr_ratio: float = result(0.01)

    def validate(self) -> None:
        at_least("scheduler.warmup_epochs", self.warmup_epochs, 0, "0: no warmup.")
        in_range("scheduler.min_lr_ratio", self.min_lr_ratio, 0, 1, "the final LR as a share of the peak.")


@dataclass
class FinetuneConfig:
    """The whole composed config of one run (conf/config.yaml)."""

    backbone: BackboneConfig = result(factory=BackboneConfig)
    strategy: StrategyConfig = result(factory=StrategyConfig)
    data: DataConfig = result(factory=DataConfig)
    optimizer: OptimizerConfig = result(factory=OptimizerConfig)
    trainer: TrainerConfig = result(factory=TrainerConfig)
    logger: LoggerConfig = neutral(factory=LoggerConfig)
    callbacks: CallbacksConfig = result(factory=CallbacksConfig)
    paths: PathsConfig = neutral(factory=PathsConfig)
    seed: int = result(42)
    resume: str | None = neutral(None, doc="null | auto | a checkpoint path")
    monitor: str = result("val/acc")
    monitor_mode: MonitorMode = result(MonitorMode.auto)
    checkpoint_frozen_stages: FrozenStagesInCheckpoints = neutral(FrozenStagesInCheckpoints.reference)
    head: HeadConfig = result(factory=HeadConfig)
    loss: LossConfig = result(factory=LossConfig)
    regularization: RegularizationConfig = result(factory=RegularizationConfig)
    tune: TuneConfig = result(factory=TuneConfig)
    cache: CacheConfig = result(factory=CacheConfig)
    speed: SpeedConfig = result(factory=SpeedConfig)
    scheduler: SchedulerConfig = result(factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.resume in ("none", "null", "false", "False", ""):  # every spelling of "start fresh"
            self.resume = None

    def validate(self) -> None:
        for node in (self.backbone, self.strategy, self.data, self.optimizer, self.trainer, self.head, self.loss,
                     self.regularization, self.cache, self.speed, self.scheduler, self.callbacks.early_stopping):
            node.validate()
        in_range("seed", self.seed, 0, 2**32 - 1, "any integer from 0 to 2^32-1.")
        if self.strategy.name != StrategyName.linear_probe:
            one_of("monitor", self.monitor, MONITORS, "the metric that picks the best checkpoint.")

    def best_mode(self) -> str:
        """max or min for ``monitor``: ``monitor_mode=auto`` is min for a loss, max for every other metric."""
        if self.monitor_mode == MonitorMode.auto:
            return "min" if self.monitor.endswith("loss") else "max"
        return str(self.monitor_mode)


def register() -> None:
    """Put the schema into Hydra's ConfigStore; conf/config.yaml names it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)


register()
