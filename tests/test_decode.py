"""JPEG draft decoding (``data.decode=pil_draft``): fewer pixels decoded, the same image within a few levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.images import BadImageError, image_loader, open_rgb, per_file_decode
from finetune.data.transforms import eval_transform
from finetune.model.backbones import preprocessing_for


def _photo(path: Path, size: int, orientation: int | None = None) -> Path:
    """A smooth photo-like picture (gradients and a few shapes; JPEG's home ground) at ``size`` px."""
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + 20
    pixels[size // 4: size // 2, size // 4: size // 2] = [230, 40, 40]
    image = Image.fromarray(pixels.astype(np.uint8)).resize((size, size * 3 // 4))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize(("side", "decoded_short"), [(200, 288), (110, 144), (48, 72), (20, 36)])
def test_draft_decodes_the_smallest_scale_that_keeps_the_shorter_side(tmp_path: Path, side: int,
                                                                     decoded_short: int) -> None:
    path = _photo(tmp_path / "a.jpg", 384)  # 384 x 288
    full = open_rgb(path)
    drafted = open_rgb(path, draft_side=side)
    assert full.size == (384, 288)
    assert min(drafted.size) == decoded_short and min(drafted.size) >= side
    assert drafted.size[0] * 3 == drafted.size[1] * 4  # aspect kept


def test_draft_leaves_other_formats_and_small_jpegs_alone(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    Image.new("RGB", (400, 300), (10, 20, 30)).save(png)
    assert open_rgb(png, draft_side=50).size == (400, 300)
    small = _photo(tmp_path / "b.jpg", 200)  # 200 x 150: not twice 110
    assert open_rgb(small, draft_side=110).size == (200, 150)


def test_draft_keeps_exif_orientation(tmp_path: Path) -> None:
    path = _photo(tmp_path / "rotated.jpg", 384, orientation=6)  # stored 384 x 288, shown 288 x 384
    assert open_rgb(path).size == (288, 384)
    assert open_rgb(path, draft_side=110).size == (144, 192)


@pytest.mark.parametrize("size", [64, 112])
def test_draft_gives_the_eval_tensor_within_a_few_levels(tmp_path: Path, size: int) -> None:
    path = _photo(tmp_path / "a.jpg", 384)
    prep = preprocessing_for("resnet50").at_size(size)
    transform = eval_transform(prep)
    std = torch.tensor(prep.std).view(3, 1, 1) * 255
    full = transform(open_rgb(path)) * std
    drafted = transform(open_rgb(path, draft_side=prep.resize_size)) * std
    assert full.shape == drafted.shape == (3, size, size)
    diff = (full - drafted).abs()
    assert float(diff.mean()) < 2.0 and float(diff.max()) < 40.0, (float(diff.mean()), float(diff.max()))


# --- data.decode=torchvision: torchvision.io.decode_jpeg where it gives the same image, PIL for the rest --------


def test_torchvision_decode_gives_the_eval_tensor_within_a_level(tmp_path: Path) -> None:
    path = _photo(tmp_path / "a.jpg", 384)
    prep = preprocessing_for("resnet50").at_size(112)
    transform = eval_transform(prep)
    decoded = image_loader("torchvision", prep.resize_size)(path)
    assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.uint8 and decoded.shape == (3, 288, 384)
    std = torch.tensor(prep.std).view(3, 1, 1) * 255
    diff = (transform(decoded) * std - transform(open_rgb(path)) * std).abs()
    assert float(diff.max()) <= 2.0 and float(diff.mean()) < 0.1


def test_torchvision_decode_keeps_exif_orientation_and_the_bad_image_rules(tmp_path: Path) -> None:
    load = image_loader("torchvision", 116)
    rotated = _photo(tmp_path / "rotated.jpg", 384, orientation=6)
    assert tuple(load(rotated).shape[1:]) == (384, 288)  # shown upright: 288 wide, 384 high
    whole = _photo(tmp_path / "whole.jpg", 384).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        load(truncated)
    with pytest.raises(BadImageError, match="too large"):
        image_loader("torchvision", 116, max_pixels=1000)(tmp_path / "whole.jpg")
    gray = tmp_path / "gray.jpg"
    Image.new("L", (64, 48), 128).save(gray)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 48), (0, 128, 255, 0)).save(cmyk)
    png = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(png)
    for other in (gray, cmyk, png):  # PIL's conversions, exactly as data.decode=pil
        assert np.array_equal(np.asarray(load(other)), np.asarray(open_rgb(other))), other.name


@pytest.mark.parametrize("decode", ["pil_draft", "torchvision", "device"])
def test_a_run_records_its_decode_and_predict_decodes_the_same_way(compose_cfg, tmp_path: Path, decode: str,
                                                                   monkeypatch, one_torch_thread) -> None:
    import finetune.cli.predict as predict_cli
    from finetune.model.checkpoints import load_module, preprocessing_of
    from finetune.run.train import train

    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            _photo(root / f"c{c}" / f"{i}.jpg", 160 + 8 * i + 40 * c)
    cfg = compose_cfg("backbone=resnet18", "backbone.weights=none", "data=folder", f"data.root={root}",
                      "data.image_size=32", "data.num_workers=0", "trainer.max_epochs=1", "logger=none",
                      f"data.decode={decode}")
    summary = train(cfg)
    module = load_module(summary["best_checkpoint"])
    assert preprocessing_of(module).decode == decode
    asked = []
    monkeypatch.setattr(predict_cli, "image_loader", lambda *args: asked.append(args) or image_loader(*args))
    rows = predict_cli.predict(module, sorted(root.rglob("*.jpg"))[:3], topk=1)
    assert [row["error"] for row in rows] == [None] * 3
    # device: predict reads files one by one, decoded as torchvision decodes them (the same pixels on a CPU)
    assert asked == [(per_file_decode(decode), preprocessing_of(module).resize_size)]
