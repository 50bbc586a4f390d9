"""Quiet by default: third-party notices a finetune user cannot act on, filtered by their exact text.

``FINETUNE_VERBOSE=1`` shows everything. Nothing else is hidden: a warning finetune has not named here
still prints.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category): warnings whose cause is inside a library, not in the user's run
WARNINGS = (
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", Warning),  # Lightning's pytree copy on torch >= 2.10
    (r".*module\(s\) in eval mode.*", Warning),  # frozen stages are in eval on purpose (BatchNorm stays put)
)
# Lightning compares log_every_n_steps with its batches; a block of several optimizer steps is one batch,
# and the step loss is logged per optimizer step (FinetuneModule._manual_steps): the warning is wrong there.
BLOCKS_WARNING = r"The number of training batches \(\d+\) is smaller than the logging interval"
# Lightning's advertisements and bookkeeping, logged at INFO on every run
LOG_PREFIXES = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches",
                "`weights_only` was not set")  # lr_find's save of its temp checkpoint; finetune's own saves say it
# lr_find saves the model to a temp file before its sweep and restores it after: three INFO lines about a file the
# user never made (restoring a run's own checkpoint still prints)
LR_FIND_TEMP = ".lr_find_"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not (message.startswith(LOG_PREFIXES) or LR_FIND_TEMP in message)


def quiet_known_noise() -> None:
    """Install the filters (idempotent); no-op with FINETUNE_VERBOSE=1."""
    if os.environ.get("FINETUNE_VERBOSE", "") not in ("", "0"):
        return
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "pytorch_lightning.trainer.connectors.checkpoint_connector",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def quiet_block_logging_warning() -> None:
    """For runs whose train batches are blocks of optimizer steps (cache.resident)."""
    if os.environ.get("FINETUNE_VERBOSE", "") in ("", "0"):
        warnings.filterwarnings("ignore", message=BLOCKS_WARNING)
