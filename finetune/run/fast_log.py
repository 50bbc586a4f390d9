"""``self.log`` without Lightning rebuilding the logged metric on every call.

Each ``self.log`` moves the key's ``_ResultMetric`` to the value's device: Lightning's ``_ResultMetric.to``
rebuilds the metric's whole ``__dict__`` (about 47 attributes) through ``apply_to_collection``, deep-copying
its metadata dataclass, even when every tensor in it is already there. That is 0.15-0.3 ms a call on a CPU,
most of a call's cost: on cached features about a sixth of Lightning's time per epoch, and per step with the
progress bar on (its step loss is logged every batch). :func:`install` gives ``_ResultMetric`` a ``to`` that
returns at once when nothing would move, and runs Lightning's own otherwise. The result is the same: moving a
tensor to the device it is on returns that tensor, and the metadata holds no tensors.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch

try:  # Lightning's internals: without them (another release layout) nothing is patched
    from pytorch_lightning.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric
except ImportError:  # pragma: no cover - depends on the installed Lightning
    _ResultMetric = None  # type: ignore[assignment,misc]
    _Metadata = None  # type: ignore[assignment,misc]


CONTAINERS = (dict, list, tuple, collections.OrderedDict)


def already_on(obj: Any, device: torch.device) -> bool | None:
    """True when every tensor reachable the way ``apply_to_collection`` walks ``obj`` is on ``device``;
    None when ``obj`` holds something that walk would treat otherwise (a Metric, a module, another
    dataclass): then only Lightning's own ``to`` is sure to do the same."""
    if isinstance(obj, torch.Tensor):
        return obj.device == device
    if isinstance(obj, torch.nn.Module):
        return None  # apply_to_collection moves a torchmetrics Metric as a whole
    if isinstance(obj, dict):
        values: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return True if _Metadata is not None and type(obj) is _Metadata else None  # names and flags only
    else:
        return True  # apply_to_collection leaves it as it is
    for value in values:
        if value is None or isinstance(value, (bool, int, float, str)) or (type(value) in CONTAINERS and not value):
            continue  # most of a metric's __dict__: flags, names, empty hook dicts (the check is per self.log)
        verdict = already_on(value, device)
        if verdict is not True:
            return verdict
    return True


def install() -> bool:
    """Patch ``_ResultMetric.to`` once per process; False where this Lightning has no such method."""
    if _ResultMetric is None or not hasattr(_ResultMetric, "to"):
        return False
    if getattr(_ResultMetric.to, "finetune_fast_path", False):
        return True
    lightning_to = _ResultMetric.to

    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        device = args[0] if len(args) == 1 and not kwargs else None  # self.log's call: .to(value.device)
        if isinstance(device, torch.device) and already_on(self.__dict__, device) is True:
            return self
        return lightning_to(self, *args, **kwargs)

    to.finetune_fast_path = True  # type: ignore[attr-defined]
    to.lightning_to = lightning_to  # type: ignore[attr-defined]
    _ResultMetric.to = to  # type: ignore[method-assign]
    return True
