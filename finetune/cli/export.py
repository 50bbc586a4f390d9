"""Export a trained checkpoint for serving: ``python -m finetune.export ckpt=PATH format=onnx|torchscript``.

Writes ``model.onnx`` or ``model.ts`` (float32 NCHW RGB images in, logits out, any batch size) and
``preprocessing.json`` beside it: what a server must do to a picture before the model sees it.
The export is then run on sample inputs and compared with the checkpoint's own logits; a
mismatch is an error (exit 1), because a model that loads but computes something else is the
worst kind of export failure.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING
from rich.console import Console
from rich.text import Text
from torch import nn

from finetune.cli.args import run_command
from finetune.config.schema import Choice, at_least
from finetune.errors import SetupError
from finetune.model.checkpoints import class_names_of, load_module, preprocessing_of
from finetune.model.module import FinetuneModule
from finetune.progress import progress

PROG = "python -m finetune.export"
OPSET = 18  # >= 17 (LayerNorm and friends); 18 is what torch's dynamo exporter writes natively
EXAMPLE_BATCH = 2  # traced with this batch ...
CHECK_BATCH = 3  # ... and checked with another, so a batch size baked into the graph shows up
RTOL = 1e-3  # allowed max |exported - checkpoint| as a fraction of the largest logit (at least 1e-3 absolute)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ONNX_MISSING = (
    "ONNX export needs the onnx, onnxscript and onnxruntime packages: pip install onnx onnxscript onnxruntime "
    "(or pip install 'finetune[export]')."
)


class ExportFormat(Choice):
    onnx = "onnx"
    torchscript = "torchscript"


FORMATS = {ExportFormat.onnx: "model.onnx", ExportFormat.torchscript: "model.ts"}


@dataclass
class ExportOptions:
    """Which checkpoint, which format, which folder."""

    ckpt: Path = field(default=MISSING, metadata={"doc": "the trained checkpoint (.ckpt)"})
    format: ExportFormat = field(default=MISSING, metadata={"doc": "onnx (onnxruntime and other runtimes) or "
                                                                   "torchscript (libtorch, TorchServe)"})
    out: Path | None = field(default=None, metadata={"doc": "folder for the model and preprocessing.json "
                                                            "(null: CKPT_STEM-FORMAT beside the checkpoint)"})
    opset: int = field(default=OPSET, metadata={"doc": "ONNX opset version, >= 17"})

    def validate(self) -> None:
        at_least("opset", self.opset, 17, "LayerNorm and friends need 17; 18 is what torch writes natively.")

    @property
    def folder(self) -> Path:
        """``out``, or a folder beside the checkpoint named after it and the format."""
        if self.out is not None:
            return self.out.expanduser()
        ckpt = self.ckpt.expanduser()
        return ckpt.parent / f"{ckpt.stem}-{self.format}"


@dataclass(frozen=True)
class ExportResult:
    """Where the files went and how closely the export reproduces the checkpoint."""

    model: Path
    preprocessing: Path
    max_abs_diff: float
    tolerance: float

    @property
    def matches(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def main(argv: Sequence[str] | None = None) -> int:
    """Export and verify; SetupError -> exit 2, logits that differ from the checkpoint -> exit 1."""
    return run_command(ExportOptions, argv, _export_and_verify, prog=PROG,
                       summary="Export a trained checkpoint for serving (ONNX or TorchScript) and verify its logits.")


def _export_and_verify(options: ExportOptions) -> int:
    """Export, print where the files went and whether the export computes what the checkpoint does."""
    console = Console(soft_wrap=True)
    result = export(options)
    console.print(Text(f"wrote {result.model} and {result.preprocessing}"))
    verdict = f"max abs diff to the checkpoint's logits {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    if not result.matches:
        Console(stderr=True, soft_wrap=True).print(Text(
            f"MISMATCH: {verdict}. The exported model does not compute what the checkpoint does; do not serve it.",
            style="bold red"))
        return 1
    console.print(Text(f"OK: {verdict}.", style="bold green"))
    return 0


def export(options: ExportOptions) -> ExportResult:
    """Write the model file and preprocessing.json into ``options.folder``, then verify the model file."""
    if options.format == ExportFormat.onnx:
        require_onnx()
    # three steps of seconds each on a large model: load the checkpoint, export, run both and compare
    with progress(f"export to {options.format}: load, export, verify", 3, unit="steps") as advance:
        module = load_module(options.ckpt.expanduser())
        network = inference_network(module)
        crop = preprocessing_of(module).crop_size
        folder = options.folder
        folder.mkdir(parents=True, exist_ok=True)
        model_path = folder / FORMATS[options.format]
        generator = torch.Generator().manual_seed(0)  # the same sample inputs on every run
        example = torch.randn(EXAMPLE_BATCH, 3, crop, crop, generator=generator)
        advance(1)
        if options.format == ExportFormat.onnx:
            export_onnx(network, example, model_path, options.opset)
            run_exported = onnx_runner(model_path)
        else:
            export_torchscript(network, model_path)
            run_exported = torchscript_runner(model_path)
        prep_path = folder / "preprocessing.json"
        write_json(prep_path, preprocessing_json(module, str(options.format), model_path.name, options.opset))
        advance(1)
        diff, tolerance = compare(module, run_exported, torch.randn(CHECK_BATCH, 3, crop, crop, generator=generator))
        advance(1)
    return ExportResult(model_path, prep_path, diff, tolerance)


def inference_network(module: FinetuneModule) -> nn.Sequential:
    """The checkpoint's model as one flat Sequential: stages, then head.

    ``Backbone.forward`` carries the training-time machinery (a no-grad frozen prefix, a start
    stage for cached features); exporters need none of it, and a plain Sequential traces,
    scripts and exports the same way with every exporter.
    """
    features = module.backbone.network()  # a timm model: the model whole, as timm scripts and exports it
    parts = list(features) if isinstance(features, nn.Sequential) else [features]
    return nn.Sequential(*parts, module.head).eval()


def export_onnx(network: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    """ONNX with a dynamic batch axis: torch.export's (dynamo) exporter, the TorchScript-based one as fallback.

    The dynamo exporter is the one torch maintains, and it handles what the deprecated
    TorchScript-based one refuses (VGG's adaptive pooling at any input size but 224 px).
    """
    try:
        export_onnx_dynamo(network, example, path, opset)
    except Exception as dynamo_error:
        try:
            export_onnx_legacy(network, example, path, opset)
        except Exception as legacy_error:
            raise RuntimeError(
                f"Both ONNX exporters failed. torch.export-based: {type(dynamo_error).__name__}: "
                f"{first_line(dynamo_error)}; TorchScript-based: {type(legacy_error).__name__}: "
                f"{first_line(legacy_error)}"
            ) from legacy_error


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def export_onnx_legacy(network: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        torch.onnx.export(
            network, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def export_onnx_dynamo(network: nn.Module, example: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    with torch.no_grad():
        torch.onnx.export(
            network, (example,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
            verbose=False,
        )


def export_torchscript(network: nn.Module, path: Path) -> None:
    """``torch.jit.script``: keeps every shape dynamic (tracing would only record the example's path).

    TorchScript is deprecated in favour of torch.export, but it is still what C++ (libtorch) and
    TorchServe load; the warning says nothing the user can act on here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        scripted = torch.jit.script(network)
        torch.jit.save(scripted, str(path))


def require_onnx() -> None:
    """Fail before the slow part when the ONNX tools are not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's dynamo exporter writes the graph with it)
    except ImportError:
        raise SetupError(ONNX_MISSING) from None


def onnx_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The exported file run by onnxruntime on the CPU, as a server would load it."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {input_name: x.numpy()})[0])


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The saved file loaded back with ``torch.jit.load``: what the user's program will do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def compare(
    module: FinetuneModule, run_exported: Callable[[torch.Tensor], np.ndarray], inputs: torch.Tensor
) -> tuple[float, float]:
    """(max |exported - checkpoint| over the logits, tolerance); the reference is the module's own forward."""
    with torch.no_grad():
        expected = module.cpu()(inputs).numpy()
    got = run_exported(inputs)
    if got.shape != expected.shape:
        return float("inf"), 0.0
    tolerance = RTOL * max(1.0, float(np.abs(expected).max()))
    return float(np.abs(got - expected).max()), tolerance


def preprocessing_json(module: FinetuneModule, fmt: str, model_file: str, opset: int) -> dict[str, Any]:
    """Everything a server needs to feed the model the way the checkpoint was tested."""
    prep = preprocessing_of(module)
    return {
        "model_file": model_file,
        "format": fmt,
        **({"opset": opset} if fmt == "onnx" else {}),
        "backbone": module.hparams["backbone"],
        "num_classes": int(module.hparams["num_classes"]),
        "class_names": class_names_of(module),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "color": "RGB", "dtype": "float32",
                  "shape": ["batch", 3, prep.crop_size, prep.crop_size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(module.hparams["num_classes"])],
                   "meaning": "logits; softmax over axis 1 gives class probabilities"},
        "resize_size": prep.resize_size,
        "crop_size": prep.crop_size,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "decode": prep.decode,
        "steps": [
            "decode to 8-bit RGB (EXIF orientation applied, alpha composited on white)",
            f"resize the shorter side to {prep.resize_size} ({prep.interpolation}, antialiased)",
            f"center crop {prep.crop_size}x{prep.crop_size}",
            "scale to 0..1 (divide by 255)",
            "subtract mean, divide by std (per channel)",
        ],
    }


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
