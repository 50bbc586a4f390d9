"""finetune.cli.predict and finetune.cli.export on a checkpoint made the way users make one: a real training run.

One module-scoped run (resnet18, weights=none, 32 px, one epoch, the default feature_extractor
strategy, so the checkpoint comes from a run on cached features) feeds every test.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image
from torch import nn

from finetune import config_dir
from finetune.cli import export as export_cli
from finetune.cli import predict as predict_cli
from finetune.data.images import open_rgb
from finetune.data.transforms import eval_transform
from finetune.errors import SetupError
from finetune.model.checkpoints import load_module, preprocessing_of
from finetune.run.train import train

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best checkpoint of a one-epoch run on a tiny image folder, composed from the real conf/."""
    root = tmp_path_factory.mktemp("run")
    images = write_training_folder(root / "images")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "backbone=resnet18", "backbone.weights=none", "data=folder", f"data.root={images}",
            "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "trainer.max_epochs=1",
            "logger=none", "trainer.enable_model_summary=false",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "out")
        cfg.paths.cache_dir = str(root / "cache")
        cfg.callbacks.progress_bar = "none"
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
    summary = train(cfg)
    assert summary["feature_cache"], "the checkpoint should come from a run fed by cached features"
    return Path(summary["best_checkpoint"])


def write_training_folder(root: Path, per_class: int = 6) -> Path:
    """Class-coloured noise, one folder per class (conftest's image_folder is function-scoped)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.normal(30, 25, size=(32, 32, 3))
            pixels[..., c] += 170
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three good images (PNG, JPEG, grayscale JPEG in a subfolder), one truncated JPEG, a text file to ignore."""
    rng = np.random.default_rng(0)
    target = tmp_path / "photos"
    (target / "sub").mkdir(parents=True)
    pixels = [rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(pixels[0]).save(target / "good_0.png")
    Image.fromarray(pixels[1]).save(target / "good_1.jpg")
    Image.fromarray(pixels[2]).convert("L").save(target / "sub" / "good_2.jpg")
    (target / "broken.jpg").write_bytes((target / "good_1.jpg").read_bytes()[:300])
    (target / "notes.txt").write_text("not an image")
    return target


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_load_module_gives_eval_image_fed_model(ckpt: Path) -> None:
    module = load_module(ckpt)
    assert not module.training and module.input_stage == 0
    assert module.hparams["class_names"] == CLASSES
    assert preprocessing_of(module).crop_size == 32
    with torch.no_grad():
        assert module(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_predict_folder_reports_bad_file_and_exits_0(ckpt: Path, photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pred.csv"
    code = predict_cli.main([f"ckpt={ckpt}", f"images={photos}", f"out={out}", "topk=3", "workers=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) == 3 and len(rows) == 4  # notes.txt is not an image file
    for row in good:
        probs = [float(row[f"prob_{k}"]) for k in (1, 2, 3)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert probs == sorted(probs, reverse=True)
        assert sorted(row[f"class_{k}"] for k in (1, 2, 3)) == CLASSES
    assert [Path(r["path"]).name for r in bad] == ["broken.jpg"]
    assert "truncated" in bad[0]["error"]
    assert "1 unreadable" in captured.err and "broken.jpg" in captured.err and "notes.txt" in captured.err
    assert "good_0" in captured.out  # the on-screen table


def test_predict_api_uses_the_checkpoints_preprocessing(ckpt: Path, photos: Path) -> None:
    """predict() equals softmax(model(eval_transform(image))) with the checkpoint's own resize/crop/mean/std."""
    module = load_module(ckpt)
    paths = sorted(photos.rglob("good_*"))
    rows = predict_cli.predict(module, paths, topk=1, batch_size=2, device="cpu")
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    transform = eval_transform(preprocessing_of(module))
    with torch.no_grad():
        probs = module(torch.stack([transform(open_rgb(p)) for p in paths])).softmax(1)
    for row, expected in zip(rows, probs, strict=True):
        assert row["error"] is None and len(row["classes"]) == 1
        assert row["classes"][0] == CLASSES[int(expected.argmax())]
        assert row["probs"][0] == pytest.approx(float(expected.max()), abs=1e-5)


def test_predict_cli_subprocess_caps_topk_and_writes_beside_the_run(ckpt: Path, photos: Path, tmp_path: Path) -> None:
    """Without out=, the CSV goes into the checkpoint's run folder (never the current one), and the console says so."""
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.predict", f"ckpt={ckpt}", f"images={photos / 'good_0.png'}"],
        cwd=tmp_path, env={**ENV, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = ckpt.parent.parent / "predictions.csv"
    assert str(out) in proc.stdout and not (tmp_path / "predictions.csv").exists()
    rows = read_rows(out)
    assert len(rows) == 1 and "class_3" in rows[0] and "class_4" not in rows[0]  # topk=5 capped at 3 classes


def test_a_transform_failure_is_that_files_row_not_a_traceback(photos: Path) -> None:
    def exploding(image):
        raise MemoryError("cannot allocate 3.65M x 73 px")

    files = predict_cli.ImageFiles([photos / "good_0.png"], exploding)
    index, image, reason = files[0]
    assert index == 0 and image is None and reason.startswith("could not be preprocessed (MemoryError")


@pytest.mark.parametrize(("args", "message"), [
    (["bogus=1"], "bogus"),
    (["topk=0"], "topk"),
    (["device=cuda:0"] if not torch.cuda.is_available() else ["device=nonsense"], "device"),
])
def test_predict_bad_arguments_exit_2(ckpt: Path, photos: Path, capsys, args: list[str], message: str) -> None:
    assert predict_cli.main([f"ckpt={ckpt}", f"images={photos}", "workers=0", *args]) == 2
    assert message in capsys.readouterr().err


def test_predict_nothing_readable_exits_2(ckpt: Path, photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.csv"
    assert predict_cli.main([f"ckpt={ckpt}", f"images={photos / 'broken.jpg'}", f"out={out}"]) == 2
    assert "None of the 1" in capsys.readouterr().err
    assert read_rows(out)[0]["error"]


def test_export_onnx_matches_checkpoint(ckpt: Path, tmp_path: Path, capsys) -> None:
    import onnxruntime

    assert export_cli.main([f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = load_module(ckpt)(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    check_preprocessing_json(tmp_path / "preprocessing.json", ckpt, "onnx")


def test_export_onnx_falls_back_to_torchscript_based_exporter(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("dynamo exporter unavailable")

    monkeypatch.setattr(export_cli, "export_onnx_dynamo", broken)
    assert export_cli.main([f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}"]) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_matches_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    assert export_cli.main([f"ckpt={ckpt}", "format=torchscript", f"out={tmp_path}"]) == 0
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), load_module(ckpt)(x), atol=1e-4, rtol=1e-4)
    check_preprocessing_json(tmp_path / "preprocessing.json", ckpt, "torchscript")


def check_preprocessing_json(path: Path, ckpt: Path, fmt: str) -> None:
    content = json.loads(path.read_text())
    prep = load_module(ckpt).hparams["preprocessing"]
    assert content["format"] == fmt and content["backbone"] == "resnet18"
    assert content["class_names"] == CLASSES and content["num_classes"] == 3
    assert (content["resize_size"], content["crop_size"]) == (prep["resize_size"], prep["crop_size"]) == (37, 32)
    assert content["mean"] == pytest.approx(prep["mean"]) and content["std"] == pytest.approx(prep["std"])
    assert content["input"]["layout"] == "NCHW" and content["input"]["color"] == "RGB"
    assert content["input"]["dtype"] == "float32"


def test_export_mismatch_exits_1(ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    real = export_cli.torchscript_runner
    monkeypatch.setattr(export_cli, "torchscript_runner", lambda path: (lambda x: real(path)(x) + 0.5))
    assert export_cli.main([f"ckpt={ckpt}", "format=torchscript", f"out={tmp_path}"]) == 1
    assert "MISMATCH" in capsys.readouterr().err


def test_export_without_onnxruntime_says_what_to_install(ckpt: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    assert export_cli.main([f"ckpt={ckpt}", "format=onnx", f"out={tmp_path}"]) == 2
    assert "pip install onnx" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_export_unknown_format_exits_2(ckpt: Path, capsys) -> None:
    assert export_cli.main([f"ckpt={ckpt}", "format=tflite"]) == 2
    assert "onnx, torchscript" in capsys.readouterr().err


def test_pickled_module_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(SetupError, match="run code"):
        load_module(path)
    assert predict_cli.main([f"ckpt={path}", f"images={tmp_path}"]) == 2
    assert "torch.nn.modules" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b"\x00\x01 not a checkpoint " * 50, "neither a torch.save archive nor a pickle"),
    (None, "state_dict of"),
])
def test_non_checkpoint_files_are_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "file.ckpt"
    if content is None:
        torch.save(nn.Linear(2, 2).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(SetupError, match=message):
        load_module(path)


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="does not exist"):
        load_module(tmp_path / "nope.ckpt")


def test_weights_that_do_not_fit_the_hparams_are_refused(ckpt: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["num_classes"] = 4
    checkpoint["hyper_parameters"]["class_names"] = [*CLASSES, "extra"]
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(SetupError, match="do not fit"):
        load_module(edited)
