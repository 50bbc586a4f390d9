"""The network: backbone registry, freeze strategies, unfreezing, frozen weights, the LightningModule.

Importing the package wires the finetune-checkpoint reader (``checkpoints``, which builds whole modules)
into the backbone registry, so ``backbone.weights=run.ckpt`` works wherever a backbone is built.
"""

from finetune.model import checkpoints as _checkpoints  # noqa: F401  (registers the reader)
