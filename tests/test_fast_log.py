"""self.log's fast path (finetune/run/fast_log.py): the same logged values, Lightning's rebuild skipped only where
nothing would move."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.run import fast_log


class Logs(pl.LightningModule):
    """Logs the ways finetune does: per step (bar), epoch means with batch sizes, sync_dist, a dict, a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.layer(x), y)
        self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train/seen", float(len(y)), on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.layer(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        self.log_dict({"val/acc": (logits.argmax(1) == y).float().mean(), "val/top": logits.max()}, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Any, name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    train = DataLoader(TensorDataset(x, y), batch_size=6)  # a short last batch: batch sizes matter in the means
    val = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=7)
    logged: list[dict[str, float]] = []

    class Rows(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            logged.append({k: float(v) for k, v in trainer.logged_metrics.items()})

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path / name, callbacks=[Rows()], log_every_n_steps=1,
                         accelerator="cpu", devices=1)  # the default progress bar on
    trainer.fit(Logs(), train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"metrics": metrics, "bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
            "rows": logged}


@pytest.fixture
def lightning_to(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Lightning's own ``_ResultMetric.to`` in place (whatever an earlier test installed), counting its calls;
    the test's patch is undone after it."""
    original = getattr(_ResultMetric.to, "lightning_to", _ResultMetric.to)
    calls = [0]

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_ResultMetric, "to", counted)
    return calls


def test_fast_path_logs_the_same_values_and_skips_lightnings_rebuild(tmp_path: Any, lightning_to: list[int]) -> None:
    plain = fit(tmp_path, "lightning")
    rebuilt = lightning_to[0]
    assert rebuilt >= 2 * (7 + 3) * 3  # every self.log call rebuilt the metric (7 train + 3 val batches an epoch)

    assert fast_log.install()
    assert fast_log.install()  # once per process: a second call patches nothing more
    lightning_to[0] = 0
    fast = fit(tmp_path, "fast")
    assert lightning_to[0] == 0  # on one device nothing ever moves: Lightning's rebuild never ran
    assert fast == plain  # the same epoch means, sums, bar values and logged rows, to the bit
    assert plain["metrics"]["train/seen"] == 40.0 and len(plain["rows"]) == 14  # a sum and every step's row


def test_a_metric_elsewhere_still_moves(lightning_to: list[int]) -> None:
    assert fast_log.install()
    results = _ResultCollection(training=True)
    results.log("training_step", "a", torch.tensor(2.0), on_step=True, on_epoch=True, batch_size=1)
    metric = results["training_step.a"]
    lightning_to[0] = 0
    assert metric.to(torch.device("cpu")) is metric and lightning_to[0] == 0  # already there: the fast path
    assert metric.to("cpu") is metric and lightning_to[0] == 1  # not a torch.device: Lightning's own
    metric.to(torch.device("meta"))  # a value on another device: Lightning's move
    assert lightning_to[0] == 2
    assert metric.value.device.type == "meta" and metric.cumulated_batch_size.device.type == "meta"


def test_already_on_defers_to_lightning_for_what_its_walk_treats_otherwise() -> None:
    cpu = torch.device("cpu")
    assert fast_log.already_on({"a": [torch.zeros(1), (torch.ones(1), 3)], "f": len, "s": {1}}, cpu) is True
    assert fast_log.already_on({"a": [torch.zeros(1, device="meta")]}, cpu) is False
    assert fast_log.already_on({"m": nn.Linear(1, 1)}, cpu) is None  # a Metric / module moves as a whole
    assert fast_log.already_on({"d": fast_log.dataclasses.make_dataclass("D", ["t"])(torch.zeros(1))}, cpu) is None
