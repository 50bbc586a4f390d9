"""The LightningModule: trainable part of the backbone + a new head, loss, metrics, optimizer."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from finetune.config.schema import (
    HeadConfig,
    OptimizerConfig,
    OptimizerName,
    RegularizationConfig,
    SchedulerConfig,
)
from finetune.config.typed import plain
from finetune.errors import SetupError
from finetune.model.backbones import build_backbone, weights_source
from finetune.model.blocks import FeatureBlock
from finetune.model.frozen_weights import (
    MODES,
    RECORD_KEY,
    STAGE_KEYS_PREFIX,
    DetachedStage,
    HeldStages,
    fingerprint,
    pop_stages,
    weight_dicts,
)
from finetune.model.strategies import freeze_stages, param_groups, trainable_at, unfreeze_schedule


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


def group_lr_lambda(start: int, warmup: int, total: int, min_ratio: float, cosine: bool):
    """LR multiplier of a group that starts training at step ``start``."""

    def multiplier(step: int) -> float:
        if step < start:
            return 0.0
        if not cosine:
            return min(1.0, (step - start + 1) / warmup) if warmup > 0 else 1.0
        return warmup_cosine(step - start, warmup, max(1, total - start), min_ratio)

    return multiplier


def fused_setting(value: Any) -> str:
    """``optimizer.fused`` as auto, true or false (YAML may give a bool); anything else is refused."""
    setting = str(value).lower()
    if setting not in ("auto", "true", "false"):
        raise SetupError(f"optimizer.fused={value} is not one of auto, true, false (auto: fused on CUDA).")
    return setting


def use_fused(value: Any, groups: list[dict[str, Any]], clips_under_amp: bool = False) -> bool | None:
    """True for one fused optimizer kernel per step; None leaves torch's default (foreach on CUDA).

    auto fuses where every parameter is on CUDA or every one on the CPU. On CUDA the foreach update is
    ~10 launches per step, a large part of what a head on cached features costs; on a CPU torch's default
    is a Python loop over the parameters, one op per moment: fused AdamW's step measured 2.7-3.5x faster
    on resnet18's 11.7M parameters and 1.4-1.6x on a cached head's two (BENCHMARKS.md). ``clips_under_amp``:
    gradient clipping under a *-mixed precision, which Lightning refuses for a fused optimizer (it could
    own the unscaling), so auto does not fuse then.
    """
    setting = fused_setting(value)
    if setting == "auto" and clips_under_amp:
        return None
    if setting == "auto":
        kinds = {p.device.type for g in groups for p in g["params"]}
        return True if kinds in ({"cuda"}, {"cpu"}) else None
    return True if setting == "true" else None


# Hooks Lightning calls per optimizer step in manual optimization, around backward and the step.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def hookless_steps(trainer: pl.Trainer) -> bool:
    """Whether ``loss.backward()`` and the optimizer's own step do all that Lightning's manual path would.

    True when one process trains in 32-true or bf16-mixed (no gradient scaler) and neither a callback nor
    the module overrides a per-step hook: Lightning's path then only dispatches those hooks (three
    passes over every callback per step, a third of a cached head step's cost on a CPU).
    """
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision
    from pytorch_lightning.strategies import SingleDeviceStrategy
    from pytorch_lightning.utilities.model_helpers import is_overridden

    plugin = trainer.precision_plugin
    if not (type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)):
        return False
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        return False
    module = trainer.lightning_module
    if any(is_overridden(hook, module, pl.LightningModule) for hook in (*STEP_HOOKS, "backward")):
        return False
    return not any(is_overridden(hook, callback, pl.Callback) for callback in trainer.callbacks for hook in STEP_HOOKS)


def optimizer_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps the run will take: Lightning's estimate, or, with blocks of several steps per batch
    (:class:`~finetune.data.resident.BlockLoader`), the same count from its minibatches."""
    total = int(trainer.estimated_stepping_batches)  # sets up the train loader when it is not yet
    per_epoch = getattr(getattr(trainer, "train_dataloader", None), "optimizer_steps_per_epoch", None)
    if per_epoch is None or trainer.max_epochs is None or trainer.max_epochs < 0:
        return total
    total = int(per_epoch) * max(int(trainer.max_epochs), 1)
    return min(total, int(trainer.max_steps)) if trainer.max_steps != -1 else total


class EpochMeans:
    """Per-step losses (and correct predictions) of one epoch, kept on the device and reduced once at its end.

    On cached features a self.log call per step, or a few kernel launches per step, cost more than
    the head's own step; this costs one append per value and nothing that waits for the device.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def add(self, loss: torch.Tensor, size: int, hits: torch.Tensor | None = None) -> None:
        self.losses.append(loss.detach())
        self.sizes.append(size)
        if hits is not None:
            self.hits.append(hits)

    def add_hits(self, hits: torch.Tensor) -> None:
        """Correct predictions of samples whose losses were added (one count may cover several minibatches)."""
        self.hits.append(hits)

    def means(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Per-sample mean loss (float32, also under bf16/16-true) and accuracy (None without hits)."""
        if not self.sizes:
            return None
        seen = sum(self.sizes)
        sizes = torch.tensor(self.sizes, dtype=torch.float32, device=self.losses[0].device)
        loss = (torch.stack(self.losses).float() * sizes).sum() / seen
        return loss, torch.stack(self.hits).sum().float() / seen if self.hits else None


# The step loss as the progress bar shows it (logger=False; loggers get train/loss_step).
BAR_LOSS_KEY = "loss"


class FinetuneModule(pl.LightningModule):
    """Backbone (frozen prefix + trainable suffix) and head; checkpoints describe themselves.

    ``input_stage`` > 0 means batches hold the cached output of the frozen prefix
    (stages before ``input_stage``) instead of images; the prefix may then be detached
    (:meth:`detach_frozen_prefix`) so that it stays off the device while training.
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
        milestones: list[int] | None = None,
        freeze_epochs: int | None = None,
        class_weights: list[float] | None = None,
        regularization: dict | None = None,
        checkpoint_frozen_stages: str = "reference",
        identity: dict | None = None,
    ) -> None:
        super().__init__()
        if checkpoint_frozen_stages not in MODES:
            raise SetupError(f"checkpoint_frozen_stages='{checkpoint_frozen_stages}' must be one of {MODES}: "
                             f"reference (rebuild frozen stages from their weights source) or store (keep them in).")
        self.save_hyperparameters()
        # built for the crop size: ViT's position embeddings and MaxViT's windows depend on it
        self.backbone = build_backbone(backbone, weights, image_size=(preprocessing or {}).get("crop_size"))
        self.schedule = unfreeze_schedule(self.backbone.stage_names, strategy, unfreeze_last, milestones,
                                          freeze_epochs)
        self.trainable = trainable_at(self.schedule, 0)
        freeze_stages(self.backbone, self.trainable)
        # Each dict is its schema node (finetune.config.schema) as plain data; its defaults fill what a bare
        # module, or a checkpoint of an earlier version, leaves out.
        head = {**plain(HeadConfig()), **(head or {})}
        self.head = build_head(self.backbone.feature_dim, num_classes, head["type"], int(head["hidden_dim"]),
                               float(head["dropout"]))
        self.optimizer_cfg = {**plain(OptimizerConfig(name=OptimizerName.adamw)), **(optimizer or {})}
        self.scheduler_cfg = {**plain(SchedulerConfig()), **(scheduler or {})}
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.regularization = {**plain(RegularizationConfig()), **(regularization or {})}
        self.input_stage = input_stage
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.confusion_matrix: torch.Tensor | None = None
        self.held: HeldStages | None = None  # the frozen prefix while detached
        self.epoch_means = {"train": EpochMeans(), "val": EpochMeans(), "test": EpochMeans()}  # this epoch's
        self._fingerprints: dict[tuple[str, ...], str] = {}
        self.steps_per_block = 1  # optimizer steps per train batch at most (use_blocks)
        self.block_clip: tuple[float, str] | None = None  # gradient clipping the module does itself (use_blocks)
        self._step_plan: tuple[bool, list] = (False, [])  # direct steps?, EMA callbacks (on_train_start)
        if self.omitted_stages:  # now, as the source gave them: later the module may be cast (bf16-true)
            self.frozen_fingerprint(self.omitted_stages)

    @property
    def ever_trainable(self) -> list[str]:
        """Stages that train at some epoch of the schedule (their optimizer groups exist from the start)."""
        return [stage for _, stages in self.schedule for stage in stages]

    @property
    def cacheable_prefix(self) -> int:
        """Leading stages frozen for the whole run: their outputs may be cached."""
        names = self.backbone.stage_names
        ever = set(self.ever_trainable)
        return next((i for i, name in enumerate(names) if name in ever), len(names))

    @property
    def omitted_stages(self) -> list[str]:
        """Stages frozen all run whose weights source can rebuild them: checkpoints leave them out."""
        if self.hparams.get("checkpoint_frozen_stages", "reference") != "reference":
            return []
        if weights_source(self.hparams.get("weights")) == "none":  # a random init is not reproducible
            return []
        return self.backbone.stage_names[:self.cacheable_prefix]

    def frozen_state(self, stages: list[str]) -> dict[str, torch.Tensor]:
        """Tensors of frozen ``stages`` under their module keys, whether attached or held."""
        held = self.held.stages if self.held is not None else {}
        return {f"{STAGE_KEYS_PREFIX}{name}.{key}": value for name in stages
                for key, value in (held[name] if name in held else self.backbone.stages[name]).state_dict().items()}

    def frozen_fingerprint(self, stages: list[str]) -> str:
        """Fingerprint of frozen stages (computed once: they do not change during a run)."""
        key = tuple(stages)
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(self.frozen_state(stages))
        return self._fingerprints[key]

    def detach_frozen_prefix(self) -> None:
        """Take the stages before ``input_stage`` out of the module (their outputs are cached).

        They stay on the host, outside ``parameters()``: not moved to the device, not in DDP, not in
        an EMA copy. :meth:`attach_frozen_prefix` puts them back.
        """
        if self.held is not None or self.input_stage == 0:
            return
        names = self.backbone.stage_names[:self.input_stage]
        self.held = HeldStages({name: self.backbone.stages[name] for name in names})
        for name in names:
            self.backbone.stages[name] = DetachedStage(name)

    def attach_frozen_prefix(self) -> None:
        """Put detached stages back, on the device of the rest of the module."""
        if self.held is None:
            return
        device = next(self.head.parameters()).device
        for name, stage in self.held.stages.items():
            self.backbone.stages[name] = stage.to(device)
        self.held = None
        freeze_stages(self.backbone, self.trainable)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave rebuildable frozen stages out (recording source + fingerprint); put held ones in otherwise."""
        omitted = self.omitted_stages
        for state in weight_dicts(checkpoint):
            if omitted:
                pop_stages(state, omitted)
            elif self.held is not None:
                state.update(self.frozen_state(list(self.held.stages)))
        if omitted:
            checkpoint[RECORD_KEY] = {"stages": omitted, "weights": str(self.hparams.get("weights")),
                                      "fingerprint": self.frozen_fingerprint(omitted)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.complete_checkpoint(checkpoint, "The checkpoint")

    def complete_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Make a checkpoint's state dicts fit this module as it is now (prefix attached or held).

        Stages the checkpoint left out are filled from this module's own (rebuilt) tensors after
        their fingerprint is checked; stored tensors of held stages are loaded into them.
        """
        record = checkpoint.get(RECORD_KEY)
        if record:
            found = self.frozen_fingerprint(list(record["stages"]))
            if found != record["fingerprint"]:
                raise SetupError(
                    f"{source} was trained on frozen stages {', '.join(record['stages'])} from "
                    f"{record['weights']}, and left them out to be rebuilt from there; but the weights found "
                    f"there now differ (fingerprint {found}, expected {record['fingerprint']}): the file was "
                    f"changed or replaced. Restore the weights it was trained with; runs with "
                    f"checkpoint_frozen_stages=store keep frozen stages inside their checkpoints."
                )
        for state in weight_dicts(checkpoint):
            if self.held is not None:
                taken = pop_stages(state, self.held.stages)
                if taken:
                    self.held.load(taken)
                    self._fingerprints.clear()
            elif record:
                for name, value in self.frozen_state(list(record["stages"])).items():
                    state.setdefault(name, value)

    def apply_schedule(self, epoch: int) -> list[str]:
        """Make exactly the stages of ``epoch`` trainable; returns the stages that just unfroze."""
        wanted = trainable_at(self.schedule, epoch)
        added = [s for s in wanted if s not in self.trainable]
        if added or len(wanted) != len(self.trainable):
            freeze_stages(self.backbone, wanted)
            self.trainable = wanted
        return added

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name around every hook call, ~50 times per training step; nn.Module's
        # __setattr__ (parameter/buffer/submodule checks) made that 6% of a cached run's training time.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x, start=self.input_stage))

    def _mixed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / CutMix (timm-style alphas) on the batch; returns the logits and the mixed loss."""
        reg = self.regularization
        mixup, cutmix = float(reg["mixup_alpha"]), float(reg["cutmix_alpha"])
        use_cutmix = cutmix > 0 and x.ndim == 4 and (mixup <= 0 or torch.rand(()) < 0.5)
        alpha = cutmix if use_cutmix else mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        if use_cutmix:
            h, w = x.shape[-2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = lam * x + (1 - lam) * x[perm]
        logits = self(x)
        return logits, lam * self.criterion(logits, y) + (1 - lam) * self.criterion(logits, y[perm])

    def on_train_start(self) -> None:
        """What each manual step takes, decided once per fit: direct steps or Lightning's, and the EMA callbacks."""
        if not self.automatic_optimization:
            from pytorch_lightning.callbacks import WeightAveraging

            trainer = self.trainer
            self._step_plan = (hookless_steps(trainer),
                               [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)])

    def on_train_end(self) -> None:
        self._step_plan = (False, [])  # no callback references kept past the fit

    def _clips_under_amp(self) -> bool:
        """Gradient clipping (the Trainer's, or the module's own in blocks) under a *-mixed precision plugin."""
        from pytorch_lightning.plugins.precision import MixedPrecision

        trainer = self._trainer
        if trainer is None or not isinstance(getattr(trainer, "precision_plugin", None), MixedPrecision):
            return False
        return bool(getattr(trainer, "gradient_clip_val", None)) or self.block_clip is not None

    def use_blocks(self, steps_per_block: int, clip: tuple[float, str] | None = None) -> None:
        """Train with manual optimization: a batch may be a :class:`~finetune.model.blocks.FeatureBlock` of
        several minibatches, each one optimizer step (cache.resident; :meth:`_manual_steps`). ``clip``:
        (trainer.gradient_clip_val, algorithm), applied before each step as Lightning's automatic loop does."""
        self.automatic_optimization = False
        self.steps_per_block = int(steps_per_block)
        self.block_clip = clip

    def _train_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss of one training minibatch (Mixup / CutMix drawn per minibatch); its loss is kept for
        the epoch mean (correct predictions: by the caller)."""
        reg = self.regularization
        mixing = float(reg["mixup_alpha"]) > 0 or float(reg["cutmix_alpha"]) > 0
        if mixing and torch.rand(()) < float(reg["mix_prob"]):
            logits, loss = self._mixed(x, y)
        else:
            logits = self(x)
            loss = self.criterion(logits, y)
        # Epoch loss and accuracy are reduced once per epoch (EpochMeans), not logged per step.
        self.epoch_means["train"].add(loss, len(y))
        return logits, loss

    def _show_on_bar(self, loss: torch.Tensor) -> None:
        """The step loss on the progress bar, only when there is one (Lightning reads bar values to the host)."""
        trainer = self._trainer
        # Each key is always logged with the same arguments; only whether it is logged depends on the trainer.
        # Lightning keeps a key's arguments for the trainer's lifetime, across fits, and refuses other ones:
        # lr_find's sweep runs a fit of the same trainer with its own callbacks only (no bar) before the
        # real fit (issue 17), so a prog_bar that followed the bar crashed the real fit.
        if trainer is None or trainer.progress_bar_callback is not None:
            self.log(BAR_LOSS_KEY, loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if not self.automatic_optimization:
            return self._manual_steps(batch, batch_idx)
        x, y = batch
        logits, loss = self._train_loss(x, y)
        self.epoch_means["train"].add_hits((logits.argmax(1) == y).sum())
        self._show_on_bar(loss)
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        # the step loss is logged only when a logger writes this step
        if connector is None or connector.should_update_logs or trainer.fast_dev_run:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    def _manual_steps(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """One optimizer step per minibatch of a block (a plain ``(x, y)`` batch is a block of one).

        Each step is what Lightning's automatic loop does per batch, in its order: forward, zero_grad,
        backward (through Lightning's precision plugin), optimizer step, LR scheduler step, then the
        weight average's update. So a block of K minibatches trains exactly what K batches would, without
        paying the loop's hooks, logging and loader per minibatch. Logging stays per optimizer step: the
        step loss goes to the loggers at the steps the automatic loop logs (``log_every_n_steps``), and the
        loop's logging step counter advances by the steps taken, so every metric keeps its step number.
        """
        block = batch if isinstance(batch, FeatureBlock) else FeatureBlock(batch[0], batch[1], len(batch[1]))
        trainer = self.trainer
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        direct, averaging = self._step_plan
        log_every = int(trainer.log_every_n_steps) if trainer.loggers else 0
        first = trainer.global_step
        steps = block.steps if trainer.max_steps < 0 else max(0, min(block.steps, trainer.max_steps - first))
        raw = optimizer.optimizer
        losses, logits = [], []
        for i in range(steps):
            x, y = block.minibatch(i)
            out, loss = self._train_loss(x, y)
            raw.zero_grad()
            if direct:  # what Lightning's path does when no hook listens and the precision adds nothing
                loss.backward()
                if self.block_clip:  # the automatic loop's clip_gradients, right before the step
                    self.clip_gradients(raw, *self.block_clip)
                optimizer._on_before_step()  # the loop's step count (trainer.global_step)
                raw.step()
                optimizer._on_after_step()
            else:
                self.manual_backward(loss)
                if self.block_clip:  # no scaler here (decide_blocks); on_before_optimizer_step sees clipped grads
                    self.clip_gradients(raw, *self.block_clip)
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for callback in averaging:  # its update reads trainer.global_step, once per optimizer step
                callback.on_train_batch_end(trainer, self, loss, batch, batch_idx)
            if log_every and (first + i + 1) % log_every == 0:
                row = {"train/loss_step": loss.detach(), "epoch": trainer.current_epoch}  # as Lightning's row
                trainer._logger_connector.log_metrics(row, step=first + i)
            losses.append(loss.detach())
            logits.append(out.detach())
        if logits:  # the block's correct predictions in one reduction, not three kernels per step
            seen = sum(len(o) for o in logits)
            self.epoch_means["train"].add_hits((torch.cat(logits).argmax(1) == block.y[:seen]).sum())
        if not losses:
            return {"loss": None}
        # Lightning adds one after the batch: the loggers' step then counts optimizer steps, as without blocks
        trainer.fit_loop.epoch_loop._batches_that_stepped += len(losses) - 1
        self._show_on_bar(losses[-1])
        return {"loss": losses[-1], "losses": torch.stack(losses)}  # FiniteLoss checks each step's

    def on_train_epoch_start(self) -> None:
        self.epoch_means["train"] = EpochMeans()

    def on_train_epoch_end(self) -> None:
        means = self.epoch_means["train"].means()
        self.epoch_means["train"] = EpochMeans()
        if means is not None:
            # averaged over DDP ranks (once per epoch, so the sync costs nothing worth counting)
            self.log("train/loss_epoch", means[0], on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
            self.log("train/acc", means[1], on_step=False, on_epoch=True, sync_dist=True)

    def _eval_logits(self, batch: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of an eval batch, or of every minibatch of a block (each forward at the batch size
        the DataLoader would give, so the logits are the same); each minibatch's loss kept for the epoch mean."""
        parts = [batch.minibatch(i) for i in range(batch.steps)] if isinstance(batch, FeatureBlock) else [batch]
        outputs = []
        for x, y in parts:
            logits = self(x)
            if split == "test" and self.regularization["tta_hflip"] and self.input_stage == 0 and x.ndim == 4:
                logits = (logits.softmax(1) + self(x.flip(-1)).softmax(1)).log()  # average of probabilities
            self.epoch_means[split].add(self.criterion(logits, y), len(y))
            outputs.append(logits)
        if len(parts) == 1:
            return outputs[0], parts[0][1]
        return torch.cat(outputs), batch.y  # the metrics count: one update for the block is the same

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, y = self._eval_logits(batch, "val")
        self.val_metrics.update(logits, y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        logits, y = self._eval_logits(batch, "test")
        self.test_metrics.update(logits, y)
        self.test_confusion.update(logits, y)

    def _log_eval(self, split: str, metrics: MetricCollection, prog_bar: bool) -> None:
        means = self.epoch_means[split].means()
        self.epoch_means[split] = EpochMeans()
        if means is None:
            return
        self.log(f"{split}/loss", means[0], sync_dist=True)
        self.log_dict(metrics.compute(), prog_bar=prog_bar)  # torchmetrics gathers every rank's state itself
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_metrics, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_metrics, prog_bar=False)
        self.confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        # ``optimizer`` is finetune.config.schema.OptimizerConfig as a plain dict: every key is there
        layer_decay = cfg["layer_decay"]
        groups = param_groups(self.backbone, self.head, float(cfg["lr"]), float(cfg["weight_decay"]),
                              float(self.hparams.backbone_lr_ratio), bool(cfg["no_decay_norm_bias"]),
                              float(layer_decay) if layer_decay is not None else None, stages=self.ever_trainable)
        fused = use_fused(cfg["fused"], groups, self._clips_under_amp())
        if cfg["name"] == "adamw":
            optimizer = torch.optim.AdamW(groups, fused=fused)
        elif cfg["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=float(cfg["momentum"] or 0.0),
                                        nesterov=bool(cfg["nesterov"]), fused=fused)
        else:
            raise SetupError(f"Unknown optimizer '{cfg['name']}'. Choose adamw or sgd.")
        sched = self.scheduler_cfg
        if sched["name"] == "none" and len(self.schedule) == 1:
            return optimizer
        total = optimizer_steps(self.trainer)
        epochs = max(1, int(self.trainer.max_epochs or 1))
        per_epoch = max(1, total // epochs)
        warmup = round(float(sched["warmup_epochs"]) * per_epoch)
        min_ratio = float(sched["min_lr_ratio"])
        starts = {stage: epoch * per_epoch for epoch, stages in self.schedule for stage in stages}
        cosine = sched["name"] == "cosine"
        # One multiplier per group: zero until its stage unfreezes, then its own warmup (+ cosine).
        lambdas = [group_lr_lambda(starts.get(g["stage"], 0), warmup, total, min_ratio, cosine)
                   for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
