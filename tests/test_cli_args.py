"""The one key=value parser of check, predict, export, report and compare: --help, refusals, exit 2.

Offline, CPU, no model: every case is refused (or answered) before anything is loaded or measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from finetune.cli import check, compare, export, predict, report
from finetune.cli.args import option_keys, parse_args
from finetune.errors import SetupError

REPO = Path(__file__).resolve().parents[1]

# name: (main, options dataclass, a value of the wrong type, its key)
COMMANDS: dict[str, tuple[Callable[[list[str]], int], type, str | None, str | None]] = {
    "check": (check.main, check.CheckOptions, "workers=abc", "workers"),
    "predict": (predict.main, predict.PredictOptions, "topk=abc", "topk"),
    "export": (export.main, export.ExportOptions, "opset=abc", "opset"),
    "report": (report.main, report.ReportSettings, "steps=abc", "steps"),
    "compare": (compare.main, compare.CompareOptions, None, None),
}
TYPED = [name for name, (_, _, token, _) in COMMANDS.items() if token]


def one_paragraph(text: str) -> bool:
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text


@pytest.mark.parametrize("name", COMMANDS)
def test_help_exits_0_and_lists_every_option(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main, schema, _, _ = COMMANDS[name]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m finetune.{name}")
    assert all(key in out for key in option_keys(schema))
    assert main(["-h", "nosuchkey=1"]) == 0  # help wins over what else is on the line


@pytest.mark.parametrize("name", COMMANDS)
def test_unknown_key_exits_2_naming_it(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main, schema, _, _ = COMMANDS[name]
    assert main(["nosuchkey=1"]) == 2
    err = capsys.readouterr().err
    assert one_paragraph(err) and "nosuchkey" in err
    assert all(key in err for key in option_keys(schema))  # the message says what is accepted


@pytest.mark.parametrize("name", TYPED)
def test_wrong_type_exits_2_naming_key_and_type(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main, _, token, key = COMMANDS[name]
    assert main([token]) == 2  # type: ignore[list-item]
    err = capsys.readouterr().err
    assert one_paragraph(err) and f"{key}=abc" in err and "integer" in err


def test_a_word_without_equals_is_refused_where_there_is_no_positional(capsys: pytest.CaptureFixture[str]) -> None:
    assert predict.main(["photos/"]) == 2
    err = capsys.readouterr().err
    assert one_paragraph(err) and "'photos/'" in err and "key=value" in err


def test_predict_as_a_process_exits_2_without_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "finetune.predict", "nosuchkey=1"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nosuchkey" in proc.stderr and "Traceback" not in proc.stderr


def parse(schema: type, *tokens: str) -> object:
    return parse_args(schema, tokens, prog="test")


def test_hydra_prefixes_and_text_values_kept_as_typed() -> None:
    options = parse(predict.PredictOptions, "++ckpt=runs/best-epoch=04.ckpt", "+images=on", "out=007", "topk=3")
    assert options == predict.PredictOptions(ckpt=Path("runs/best-epoch=04.ckpt"), images=Path("on"),
                                             out=Path("007"), topk=3)


@pytest.mark.parametrize(("schema", "tokens", "message"), [
    (predict.PredictOptions, ["images=x"], "ckpt has no value"),
    (predict.PredictOptions, ["ckpt=x", "images=x", "topk=0"], "topk=0 must be >= 1"),
    (predict.PredictOptions, ["ckpt=x", "images=x", "workers=some"], "workers=some must be auto or an integer"),
    (export.ExportOptions, ["ckpt=x", "format=tflite"], "format=tflite is not one of the allowed choices: onnx, "
                                                        "torchscript"),
    (check.CheckOptions, ["data=cifar10", "data.root=x"], "only data=folder"),
    (check.CheckOptions, ["data.root=x", "data.on_bad_image=maybe"], "skip, error"),
    (report.ReportSettings, ["strategy=full_finetune,freeze_all"], "freeze_all is not one of the allowed choices"),
    (compare.CompareOptions, ["out=x"], "Say which DIR"),
    (compare.CompareOptions, ["a", "b"], "takes one DIR"),
])
def test_refusals_name_the_key_and_what_is_allowed(schema: type, tokens: list[str], message: str) -> None:
    with pytest.raises(SetupError, match=message):
        parse(schema, *tokens)


def test_defaults_positional_aliases_and_lists() -> None:
    options = parse(check.CheckOptions, "data=folder", "data.root=~/images")
    assert options.data.root == Path("~/images") and options.data.on_bad_image == "skip"  # DataConfig's default
    assert options.out is None and options.workers is None
    assert parse(compare.CompareOptions, "runs/x", "out=y") == compare.CompareOptions(Path("runs/x"), Path("y"))
    assert parse(compare.CompareOptions, "root=r").root == Path("r")
    settings = parse(report.ReportSettings, "backbone=vgg11,resnet18,vgg11", "strategy=[linear_probe]")
    assert settings.backbone == ["vgg11", "resnet18"] and settings.strategy == ["linear_probe"]
    assert parse(export.ExportOptions, "ckpt=a/best.ckpt", "format=onnx").folder == Path("a/best-onnx")


def test_parse_args_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(export.ExportOptions, "--help")
    assert exit_info.value.code == 0
    assert "format=onnx|torchscript" in capsys.readouterr().out
