"""``data.decode=device``: batches decoded on the training device, transformed there as tensors.

On a CPU the device is the CPU, so these tests run the path itself (batched torchvision.io.decode_jpeg, the
v2.functional crops), and hold it to ``data.decode=torchvision``: the same pixels, the same random crops and
flips, the same trained weights. On CUDA the decode is nvjpeg (benchmarks/decode_pipeline.py measures it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from finetune.data.datamodule import ImageDataModule, Transformed
from finetune.data.datasets import ImageFileDataset
from finetune.data.device_decode import DevicePlan, EncodedBatch, EncodedImages
from finetune.data.images import BadImageError, EncodedJpeg, image_loader
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import SetupError
from finetune.model.backbones import preprocessing_for


def _photo(path: Path, width: int, height: int, seed: int, orientation: int | None = None) -> Path:
    """Gradients, a block and some noise: detail for the resize to blend, smooth enough for JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 180 + 30
    pixels[height // 4: height // 2, width // 3: width // 2] = rng.integers(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90, exif=exif)
    return path


def _tree(root: Path, per_class: int = 6) -> list[tuple[Path, int]]:
    samples = []
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            samples.append((_photo(root / f"c{c}" / f"{i}.jpg", 90 + 7 * i, 70 + 5 * c, 10 * c + i), c))
    return samples


def _both(samples: list[tuple[Path, int]], transform: v2.Compose, side: int) -> tuple[Transformed, EncodedImages]:
    cpu = Transformed(ImageFileDataset(samples, image_loader("torchvision", side)), transform)
    device = EncodedImages(ImageFileDataset(samples, image_loader("device", side)), transform)
    return cpu, device


@pytest.mark.parametrize("augment", [False, True])
def test_device_batches_are_the_torchvision_path_pixels_crops_and_flips(tmp_path: Path, augment: bool) -> None:
    samples = _tree(tmp_path)
    prep = preprocessing_for("resnet50").at_size(48)
    cpu, device = _both(samples, train_transform(prep, augment), prep.resize_size)
    torch.manual_seed(7)
    expected = torch.stack([cpu[i][0] for i in range(len(samples))])
    torch.manual_seed(7)
    items = [device[i] for i in range(len(samples))]
    assert all(data.ndim == 1 for data, *_ in items)  # the worker left every RGB JPEG undecoded
    x, y = device.collate(items).to("cpu")
    assert x.dtype == torch.float32 and x.shape == expected.shape == (len(samples), 3, 48, 48)
    assert torch.equal(x, expected)
    assert y.tolist() == [label for _, label in samples]
    if augment:  # crops really are random (and drawn as the CPU path draws them)
        assert len({tuple(p[:4].tolist()) for p in device.collate(items).params}) == len(samples)


def test_files_the_worker_decodes_are_within_a_level(tmp_path: Path) -> None:
    """Grayscale, PNG, CMYK and EXIF-rotated files are decoded in the worker (as data.decode=pil does) and
    only resized on the device: tensor resize against PIL's resize, at most one 8-bit level apart."""
    gray, png, cmyk = tmp_path / "gray.jpg", tmp_path / "a.png", tmp_path / "cmyk.jpg"
    base = _photo(tmp_path / "base.jpg", 96, 72, 1)
    Image.open(base).convert("L").save(gray)
    Image.open(base).save(png)
    Image.open(base).convert("CMYK").save(cmyk)
    rotated = _photo(tmp_path / "rotated.jpg", 96, 72, 2, orientation=6)
    samples = [(p, 0) for p in (gray, png, cmyk, rotated)]
    prep = preprocessing_for("resnet50").at_size(48)
    cpu, device = _both(samples, eval_transform(prep), prep.resize_size)
    items = [device[i] for i in range(len(samples))]
    assert all(data.ndim == 3 and data.dtype == torch.uint8 for data, *_ in items)
    assert tuple(items[3][0].shape) == (3, 96, 72)  # upright: the EXIF rotation was applied in the worker
    x, _ = device.collate(items).to("cpu")
    std = torch.tensor(prep.std).view(1, 3, 1, 1) * 255
    expected = torch.stack([cpu[i][0] for i in range(len(samples))])
    assert float(((x - expected) * std).abs().max()) <= 1.01


def test_a_batch_with_a_file_that_stops_decoding(tmp_path: Path, caplog) -> None:
    """A truncated JPEG passes the header check in the worker; the device's decode refuses it. skip: the next
    image of the batch takes its place (the batch keeps its size) and the log names the file; error: a
    SetupError names it."""
    good = [_photo(tmp_path / f"{i}.jpg", 80, 64, i) for i in range(3)]
    whole = good[0].read_bytes()
    broken = tmp_path / "broken.jpg"
    scan = whole.index(b"\xff\xda") + 20  # a bad marker inside the scan; header and end marker intact
    broken.write_bytes(whole[:scan] + b"\xff\x99" + whole[scan + 2:])
    samples = [(good[0], 0), (broken, 1), (good[1], 0), (good[2], 1)]
    prep = preprocessing_for("resnet18").at_size(32)
    for policy in ("skip", "error"):
        device = EncodedImages(ImageFileDataset(samples, image_loader("device", prep.resize_size)),
                               eval_transform(prep), policy)
        batch = device.collate([device[i] for i in range(len(samples))])
        assert batch.images[1].ndim == 1  # the header is fine: it reaches the device undecoded
        if policy == "skip":
            with caplog.at_level(logging.WARNING):
                x, y = batch.to("cpu")
            assert x.shape[0] == 4 and y.tolist() == [0, 0, 0, 1]
            assert torch.equal(x[1], x[2])  # good[1], with its own crop, in the broken file's place
            assert "broken.jpg" in caplog.text
        else:
            with pytest.raises(SetupError, match=r"broken\.jpg could not be decoded on cpu"):
                batch.to("cpu")


def test_the_datamodule_moves_undecoded_batches_through_lightning(tmp_path: Path) -> None:
    """With workers and the train sampler, Lightning's batch transfer (anything with ``.to``) gives the batches
    the torchvision path gives, in the same order with the same augmentation."""
    from lightning_fabric.utilities.apply_func import move_data_to_device

    samples = _tree(tmp_path, per_class=8)
    prep = preprocessing_for("resnet18").at_size(32)
    transform = train_transform(prep, True)
    cpu, device = _both(samples, transform, prep.resize_size)
    eval_cpu, eval_device = _both(samples, eval_transform(prep), prep.resize_size)
    expected_dm = ImageDataModule(cpu, eval_cpu, eval_cpu, batch_size=5, num_workers=2, seed=3)
    device_dm = ImageDataModule(device, eval_device, eval_device, batch_size=5, num_workers=2, seed=3)
    for make in ("train_dataloader", "val_dataloader"):
        expected = list(getattr(expected_dm, make)())
        got = list(getattr(device_dm, make)())
        assert all(isinstance(batch, EncodedBatch) for batch in got)
        assert len(got) == len(expected)
        for (x, y), batch in zip(expected, got, strict=True):
            dx, dy = move_data_to_device(batch, torch.device("cpu"))
            assert torch.equal(dx, x) and torch.equal(dy, y)


def test_device_plan_refuses_a_transform_it_would_run_differently() -> None:
    prep = preprocessing_for("resnet18").at_size(32)
    assert DevicePlan.of(eval_transform(prep)).crop is None
    assert DevicePlan.of(train_transform(prep, True, hflip=False)).flip is None
    with pytest.raises(ValueError, match="cannot run"):
        DevicePlan.of(v2.Compose([v2.ColorJitter(0.2), *eval_transform(prep).transforms]))


def test_the_worker_reads_bytes_only_for_upright_rgb_jpegs(tmp_path: Path) -> None:
    """Other files, and JPEGs without their end marker (truncated), are decoded in the worker: a truncated file
    is refused there as on every other path, whatever the device's decoder would make of it."""
    read = image_loader("device", 116)
    whole = _photo(tmp_path / "whole.jpg", 120, 90, 0).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadImageError, match="truncated or corrupt"):
        read(tmp_path / "cut.jpg")
    upright = read(_photo(tmp_path / "a.jpg", 120, 90, 0))
    assert isinstance(upright, EncodedJpeg) and (upright.height, upright.width) == (90, 120)
    assert upright.data.dtype == torch.uint8 and upright.data.ndim == 1
    rotated = read(_photo(tmp_path / "r.jpg", 120, 90, 0, orientation=6))
    assert isinstance(rotated, Image.Image) and rotated.size == (90, 120)


@pytest.mark.parametrize("overrides", [
    ("strategy=full_finetune", "data.augment=true"),
    # the precision's input cast: Lightning's runs before the move, this batch is pixels only after it
    ("strategy=full_finetune", "data.augment=false", "trainer.precision=bf16-true"),
    ("strategy=feature_extractor",),  # the cache's extraction decodes through the same batches
])
def test_a_device_decode_run_trains_what_a_torchvision_decode_run_trains(compose_cfg, tmp_path: Path, overrides,
                                                                        one_torch_thread) -> None:
    from finetune.run.train import train

    root = tmp_path / "images"
    _tree(root, per_class=6)
    results = {}
    for decode in ("torchvision", "device"):
        cfg = compose_cfg("backbone=resnet18", "backbone.weights=none", "data=folder", f"data.root={root}",
                          "data.image_size=32", "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=2",
                          "logger=none", f"data.decode={decode}", *overrides)
        cfg.paths.output_dir = str(tmp_path / f"run-{decode}")
        summary = train(cfg)
        state = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        results[decode] = (summary["test"], state)
    (test_tv, state_tv), (test_dev, state_dev) = results["torchvision"], results["device"]
    assert test_tv == test_dev
    assert state_tv.keys() == state_dev.keys()
    assert all(torch.equal(state_tv[k], state_dev[k]) for k in state_tv), "weights differ"


def test_a_cached_run_with_a_file_that_stops_decoding_fills_every_row(compose_cfg, tmp_path: Path,
                                                                      one_torch_thread) -> None:
    """feature_extractor with the data check off: the extraction's batch keeps its size, so every cached row
    holds a real image's features and label (a shorter batch left the last rows unwritten)."""
    from finetune.run.train import train

    root = tmp_path / "images"
    samples = _tree(root, per_class=6)
    whole = samples[0][0].read_bytes()
    scan = whole.index(b"\xff\xda") + 20  # header and end marker intact: the device's decode refuses it
    samples[0][0].write_bytes(whole[:scan] + b"\xff\x99" + whole[scan + 2:])
    cfg = compose_cfg("backbone=resnet18", "backbone.weights=none", "data=folder", f"data.root={root}",
                      "data.image_size=32", "data.num_workers=0", "data.batch_size=4", "trainer.max_epochs=1",
                      "logger=none", "data.decode=device", "data.check=false", "strategy=feature_extractor")
    summary = train(cfg)
    cache = Path(summary["feature_cache"])
    for labels in cache.glob("*.labels.npy"):
        assert set(np.load(labels).tolist()) <= {0, 1}, labels.name
        features = np.load(str(labels).replace(".labels.", ".features."))
        assert (np.abs(features.reshape(len(features), -1)).sum(axis=1) > 0).all(), f"unwritten rows: {labels.name}"
    assert 0.0 <= summary["test"]["acc"] <= 1.0


def test_a_batch_leaves_its_worker_as_two_tensors(tmp_path: Path) -> None:
    """Each tensor crossing from a worker costs a shared-memory file descriptor: a batch of 256 images must not
    cost 256. Under a 64-descriptor limit the loader still reads every file (one tensor per image failed)."""
    import os
    import subprocess
    import sys

    samples = _tree(tmp_path / "images", per_class=4)
    code = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from pathlib import Path
from torch.utils.data import DataLoader
from finetune.data.datasets import ImageFileDataset
from finetune.data.device_decode import EncodedImages
from finetune.data.images import image_loader
from finetune.data.transforms import train_transform
from finetune.model.backbones import preprocessing_for
prep = preprocessing_for("resnet18").at_size(32)
samples = [(Path(p), y) for p, y in {[(str(p), y) for p, y in samples]!r}] * 128
data = EncodedImages(ImageFileDataset(samples, image_loader("device", prep.resize_size)), train_transform(prep, True))
seen = sum(len(batch.to("cpu")[1]) for batch in DataLoader(data, batch_size=256, num_workers=2,
                                                          collate_fn=data.collate))
print("seen", seen)
"""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(len(samples) * 128)
    assert "Too many open files" not in proc.stderr, proc.stderr[-2000:]
    data = EncodedImages(ImageFileDataset(samples, image_loader("device", 37)),
                         eval_transform(preprocessing_for("resnet18").at_size(32)))
    packed = data.collate([data[i] for i in range(len(samples))])
    assert sum(isinstance(v, torch.Tensor) for v in vars(packed).values()) == 2
