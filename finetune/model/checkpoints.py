"""Load a trained FinetuneModule back from a checkpoint file, without running code from the file.

Prediction and export both start here. A checkpoint is only ever read with
``torch.load(weights_only=True)``: a pickle that names Python classes or functions (a pickled
``nn.Module``, a checkpoint of some other program) is refused before anything in it is imported.
Our Lightning checkpoints pass, because ``save_hyperparameters`` stores plain types only.
"""

from __future__ import annotations

import inspect
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from finetune.errors import SetupError
from finetune.model.backbones import (
    Preprocessing,
    preprocessing_for,
    register_checkpoint_reader,
    strip_prefix,
    weights_source,
)
from finetune.model.frozen_weights import COMPILED_PREFIX, RECORD_KEY
from finetune.model.module import FinetuneModule

log = logging.getLogger(__name__)

EXPECTED = (
    "a Lightning checkpoint written by a finetune run (outputs/.../checkpoints/*.ckpt): a dict with "
    "'state_dict' and 'hyper_parameters' (backbone, num_classes, class_names, preprocessing, ...)"
)
REQUIRED_HPARAMS = ("backbone", "num_classes")


def load_module(path: str | Path) -> FinetuneModule:
    """The trained model of a finetune checkpoint, in eval mode, taking images (``input_stage=0``)."""
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    hparams = checkpoint_hparams(checkpoint, path)
    module = build_module(hparams, path, checkpoint.get(RECORD_KEY))
    checkpoint["state_dict"] = strip_compiled(checkpoint["state_dict"])
    module.complete_checkpoint(checkpoint, f"'{path}'")  # left-out frozen stages, fingerprint checked
    load_weights(module, checkpoint["state_dict"], path)
    module.input_stage = 0  # a run on cached features saved a module fed by the prefix's outputs
    return module.eval()


def preprocessing_of(module: FinetuneModule) -> Preprocessing:
    """The checkpoint's own input protocol; the backbone's ImageNet default if it predates that field."""
    prep = module.hparams.get("preprocessing")
    if not prep:
        return preprocessing_for(module.hparams["backbone"])
    return Preprocessing(
        resize_size=int(prep["resize_size"]),
        crop_size=int(prep["crop_size"]),
        mean=tuple(float(v) for v in prep["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in prep["std"]),  # type: ignore[arg-type]
        interpolation=str(prep.get("interpolation", "bilinear")),  # checkpoints before the field: bilinear
        decode=str(prep.get("decode", "pil")),
    )


def class_names_of(module: FinetuneModule) -> list[str]:
    """Class names stored by the run, or the class indices when the module was built without them."""
    names = module.hparams.get("class_names")
    count = int(module.hparams["num_classes"])
    return [str(n) for n in names] if names and len(names) == count else [str(i) for i in range(count)]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as plain data; a SetupError says what the file holds when it is not one of ours."""
    if not path.is_file():
        raise SetupError(f"Checkpoint '{path}' does not exist or is not a file. Expected {EXPECTED}.")
    refuse_code_pickles(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = why_unreadable(path, error)
        raise SetupError(f"Cannot read '{path}' as a checkpoint: {reason}. Expected {EXPECTED}.") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
            and isinstance(obj.get("hyper_parameters"), dict)):
        raise SetupError(f"'{path}' holds {describe(obj)}, not a finetune checkpoint. Expected {EXPECTED}.")
    return obj


def refuse_code_pickles(path: Path) -> None:
    """Name the classes a pickle would import, before ``torch.load`` gets to refuse it with a long story.

    Only torch's zip format can be inspected this way; other files fall through to
    ``torch.load(weights_only=True)``, which refuses them too, just less clearly.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch archive after all: torch.load will say so
        return
    if unsafe:
        shown = ", ".join(sorted(unsafe)[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise SetupError(
            f"Refused to load '{path}': it is a pickle of Python objects ({shown}), and loading it would "
            f"import and run code from the file. Expected {EXPECTED}; a pickled model can be turned into "
            f"one only by the code that made it (trainer.save_checkpoint, or re-train with python -m finetune)."
        )


def why_unreadable(path: Path, error: Exception) -> str:
    """Say what the file is rather than repeat torch's advice to load it with weights_only=False."""
    first_line = (str(error).splitlines() or [""])[0][:200]
    if "weights only load failed" in first_line.lower():
        with path.open("rb") as f:
            head = f.read(8)
        if not head.startswith(b"\x80"):  # every pickle since protocol 2 starts with PROTO (0x80)
            return f"it is neither a torch.save archive nor a pickle (it starts with the bytes {head!r})"
        return ("it is a pickle that torch.load(weights_only=True) refuses: not written by torch.save, or holding "
                "Python objects that only running code from the file could rebuild")
    return f"torch.load failed ({type(error).__name__}: {first_line})"


def describe(obj: Any) -> str:
    """A few words on what a loaded object is, for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        keys = list(obj)
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a state_dict of {len(keys)} tensors (keys like {keys[:3]}) without hyper_parameters"
        return f"a dict with keys {keys[:8]}" + (" ..." if len(keys) > 8 else "")
    return f"a {type(obj).__name__}"


def checkpoint_hparams(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The constructor arguments saved by ``save_hyperparameters``, checked against ours."""
    hparams = dict(checkpoint["hyper_parameters"])
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise SetupError(
            f"'{path}' is a Lightning checkpoint, but not of a finetune model: its hyper_parameters "
            f"{sorted(hparams)[:10]} lack {missing}. Expected {EXPECTED}."
        )
    accepted = set(inspect.signature(FinetuneModule.__init__).parameters) - {"self"}
    unknown = sorted(set(hparams) - accepted)
    if unknown:
        raise SetupError(
            f"'{path}' was written by another version of finetune: hyper_parameters {unknown} are unknown "
            f"to this one. Load it with the finetune version that trained it."
        )
    return hparams


def build_module(hparams: dict[str, Any], path: Path, record: dict[str, Any] | None = None) -> FinetuneModule:
    """The same architecture. Pretrained weights are fetched only for frozen stages the checkpoint left
    out (``record``); the checkpoint overwrites everything else."""
    weights = hparams.get("weights", "none") if record else "none"
    try:
        return FinetuneModule(**{**hparams, "weights": weights, "input_stage": 0})
    except SetupError as error:
        because = (f" Its frozen stages ({', '.join(record['stages'])}) are not stored in it: they are rebuilt "
                   f"from their weights source, {weights}." if record else "")
        raise SetupError(f"Cannot rebuild the model of '{path}'.{because} {error}") from None


def strip_compiled(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state_dict of a torch.compile'd module, under the plain module's keys."""
    return strip_prefix(state_dict, COMPILED_PREFIX)


def load_weights(module: FinetuneModule, state_dict: dict[str, Any], path: Path) -> None:
    """Strict load: a missing or extra tensor means the file does not describe this model."""
    state_dict = strip_compiled(state_dict)
    own = module.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & state_dict.keys()
                        if getattr(state_dict[k], "shape", None) != own[k].shape)
    if missing or unexpected or mismatched:
        raise SetupError(
            f"The weights in '{path}' do not fit the model its hyper_parameters describe "
            f"({module.hparams['backbone']}, {module.hparams['num_classes']} classes): "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:2]}). The file is damaged or was edited."
        )
    module.load_state_dict(state_dict, strict=True)


_COMPLETING: set[Path] = set()  # checkpoints being completed now (a source that leads back is a cycle)


def finetune_checkpoint_state(path: Path, checkpoint: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The full state_dict of a finetune checkpoint (FinetuneModule keys), for use as backbone weights.

    * Another backbone than ``name`` is refused, naming the one the checkpoint holds.
    * Frozen stages the checkpoint left out (``checkpoint_frozen_stages=reference``) are rebuilt from
      their recorded source and fingerprint-checked exactly as :func:`finetune.model.checkpoints.load_module`
      does (``build_module`` + ``FinetuneModule.complete_checkpoint``); a missing or changed source is
      refused.
    * EMA: with ``regularization.ema_decay`` Lightning's EMAWeightAveraging saves the averaged weights as
      ``state_dict`` and the raw ones as ``current_model_state``. The averaged ones are used: they are
      the weights the run validated (and picked its best checkpoint by), tested, and that predict and
      export load; the raw ones are kept only to resume training. Frozen stages are equal in both.
    * The head stays in the result; :func:`_load_into` drops it (the new run builds its own).
    """
    hparams = checkpoint_hparams(checkpoint, path)
    held = str(hparams["backbone"])
    if name is not None and held != name:
        raise SetupError(
            f"backbone.weights='{path}' is a finetune checkpoint of backbone '{held}' "
            f"({hparams['num_classes']} classes), but this run builds backbone '{name}'. Start from it with "
            f"backbone={held}, or give weights saved from a {name}."
        )
    checkpoint["state_dict"] = strip_compiled(checkpoint["state_dict"])
    record = checkpoint.get(RECORD_KEY)
    if record:
        source = str(record.get("weights"))
        stages = ", ".join(record.get("stages", []))
        if weights_source(source) == "file" and not Path(source).expanduser().is_file():
            raise SetupError(
                f"backbone.weights='{path}' is a finetune checkpoint that does not hold its frozen stages "
                f"({stages}): it records that they are rebuilt from their weights source, '{source}', and that "
                f"file does not exist. Put that file back at that path, or use a checkpoint of a run with "
                f"checkpoint_frozen_stages=store (which keeps every stage inside its checkpoints)."
            )
        resolved = path.resolve()
        if resolved in _COMPLETING:
            raise SetupError(
                f"'{path}' records itself as the source of its frozen stages ({stages}) through '{source}': "
                f"a run overwrote the checkpoint it started from. Use a checkpoint of a run with "
                f"checkpoint_frozen_stages=store, or one whose weights source still exists unchanged."
            )
        _COMPLETING.add(resolved)
        try:
            module = build_module(hparams, path, record)
            module.complete_checkpoint(checkpoint, f"'{path}'")  # the fingerprint is checked here
        except SetupError as error:
            raise SetupError(f"Cannot use '{path}' as backbone.weights: {error}") from None
        finally:
            _COMPLETING.discard(resolved)
    log.info("backbone.weights: the %s backbone of finetune checkpoint '%s'%s%s.", held, path,
             f", frozen stages {', '.join(record['stages'])} rebuilt from {record['weights']}" if record else "",
             " (EMA-averaged weights)" if "current_model_state" in checkpoint else "")
    return checkpoint["state_dict"]


register_checkpoint_reader(finetune_checkpoint_state)
