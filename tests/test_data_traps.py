"""Data traps measured on real trees (issue 15): link loops, byte copies, one-image classes, aspect-ratio
bombs, and the splits.csv record. Every tree is written into tmp_path with real PNG/JPEG files."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from finetune.cli.check import main as check_main
from finetune.data.checks import LOOP, OUTSIDE, RELISTED, apply_policy, check_image_tree, image_files
from finetune.data.datasets import (
    SPLIT_COLUMNS,
    ImageFileDataset,
    TorchvisionDataset,
    load_digits_splits,
    load_folder_splits,
    split_rows,
    stratified_split,
    write_splits_csv,
)
from finetune.data.images import MAX_ASPECT, BadImageError, open_rgb
from finetune.errors import SetupError
from tests.conftest import write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")


def _cfg(root: Path, val: float = 0.2, test: float = 0.2, seed: int = 0) -> SimpleNamespace:
    return SimpleNamespace(root=str(root), val_fraction=val, test_fraction=test, split_seed=seed)


def _samples(splits) -> dict[str, list[tuple[Path, int]]]:
    return {name: getattr(splits, name).samples for name in ("train", "val", "test")}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_labels_are_folders(splits, root: Path, depth: int) -> None:
    """Each sample's label is the class folder the real file lies in (``depth``: 0 flat, 1 under train/)."""
    for samples in _samples(splits).values():
        for path, label in samples:
            assert splits.classes[label] == path.resolve().relative_to(root.resolve()).parts[depth], path


# ---------------------------------------------------------------- 1. symbolic links


def test_link_loop_inside_a_class_folder_is_not_followed(tmp_path: Path) -> None:
    """`ln -s .. train/class_0/loop` once made train grow from 24 to 984 images, bees labelled ants."""
    root = tmp_path / "data"
    write_image_folder(root / "train", classes=2, per_class=12)
    loop = root / "train" / "class_0" / "loop"
    os.symlink("..", loop)

    report = check_image_tree(root)
    assert report.images == {"train": {"class_0": 12, "class_1": 12}}
    assert [(link.path, link.reason) for link in report.links] == [(loop, LOOP)]
    assert any("class_0/loop" in line and LOOP in line for line in report.warnings())
    report.write(tmp_path / "run")
    written = json.loads((tmp_path / "run" / "data_check.json").read_text())
    assert written["links"][0]["path"] == str(loop) and any("class_0/loop" in w for w in written["warnings"])

    splits = load_folder_splits(_cfg(root), skip=set(apply_policy(report, "error")))
    assert sum(len(s) for s in _samples(splits).values()) == 24
    _assert_labels_are_folders(splits, root, depth=1)
    assert not any("loop" in p.relative_to(root).parts for s in _samples(splits).values() for p, _ in s)


def test_self_loop_in_a_flat_tree_repeats_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ln -s . daisy/again` listed every daisy file again (and again) under daisy/again/."""
    root = write_image_folder(tmp_path / "flowers", classes=2, per_class=12)
    again = root / "class_0" / "again"
    os.symlink(".", again)
    assert len(image_files(root / "class_0")) == 12

    report = check_image_tree(root)
    assert report.images == {"all": {"class_0": 12, "class_1": 12}}
    assert [(link.path, link.reason) for link in report.links] == [(again, LOOP)]
    splits = load_folder_splits(_cfg(root))
    listed = [p for s in _samples(splits).values() for p, _ in s]
    assert len(listed) == len(set(listed)) == 24
    _assert_labels_are_folders(splits, root, depth=0)

    assert check_main([f"data.root={root}"]) == 0  # the user-facing check names the link, not "clean" alone
    out = capsys.readouterr().out
    assert "class_0/again" in out and "loops back" in out


def test_links_outside_the_root_and_to_listed_files(tmp_path: Path) -> None:
    """A folder link out of data.root is not followed; a file linked twice counts once, under its own class."""
    root = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    elsewhere = write_image_folder(tmp_path / "elsewhere", classes=1, per_class=3) / "class_0"
    os.symlink(elsewhere, root / "class_0" / "borrowed")
    os.symlink("../class_0/img_001.jpg", root / "class_1" / "alias.jpg")  # class_0's file, linked into class_1
    os.symlink("img_002.jpg", root / "class_1" / "again.jpg")  # class_1's own file, twice
    os.symlink("../class_1", root / "class_0" / "sibling")  # a whole other class folder

    report = check_image_tree(root)
    assert report.images == {"all": {"class_0": 4, "class_1": 4}}
    reasons = {link.path.relative_to(root).as_posix(): link.reason for link in report.links}
    assert reasons["class_0/borrowed"] == OUTSIDE
    assert reasons["class_1/alias.jpg"] == RELISTED and reasons["class_1/again.jpg"] == RELISTED
    assert all(reason == RELISTED for name, reason in reasons.items() if name.startswith("class_0/sibling/"))
    warnings = " ".join(report.warnings())
    assert OUTSIDE in warnings and "class_0/borrowed" in warnings and "counted once" in warnings
    assert report.duplicates == []  # a link is not a copy: it is simply not counted again

    splits = load_folder_splits(_cfg(root, 0.25, 0.25))
    listed = [p for s in _samples(splits).values() for p, _ in s]
    assert sorted(p.relative_to(root).as_posix() for p in listed) == sorted(
        f"class_{c}/img_{i:03d}.{'png' if i == 0 else 'jpg'}" for c in range(2) for i in range(4)
    )


# ---------------------------------------------------------------- 2. byte copies


def _tree_with_copies(root: Path) -> Path:
    """3 classes of 12, plus copies inside each class: one image three times more, five images once more."""
    write_image_folder(root, classes=3, per_class=12)
    for c in range(3):
        folder = root / f"class_{c}"
        for i in (1, 2, 3, 5, 6):
            (folder / f"copy_{i}.jpg").write_bytes((folder / f"img_{i:03d}.jpg").read_bytes())
        for k in range(3):
            (folder / f"again_{k}.png").write_bytes((folder / "img_000.png").read_bytes())
    return root


def test_copies_never_land_on_two_sides_of_an_automatic_split(tmp_path: Path) -> None:
    root = _tree_with_copies(tmp_path / "data")
    report = check_image_tree(root)
    inside = [pair for pair in report.duplicates if pair.kind == "within a class"]
    assert len(inside) == 3 * (5 + 3)
    assert any("within a class" in line and "class_0/again_0.png = class_0/img_000.png" in line
               for line in report.warnings())
    assert sum(pair["kind"] == "within a class" for pair in report.to_dict()["duplicates"]) == 24

    for hashes in (None, report.hashes):  # hashed here, or the check's hashes reused
        for seed in range(5):
            splits = load_folder_splits(_cfg(root, seed=seed), hashes=hashes)
            sides = {name: {_sha(p) for p, _ in samples} for name, samples in _samples(splits).items()}
            assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"]
            assert not sides["val"] & sides["test"]
            assert sum(len(s) for s in _samples(splits).values()) == 3 * 20
            assert {y for _, y in splits.val.samples} == {y for _, y in splits.test.samples} == {0, 1, 2}


def test_copies_across_split_folders_stay_a_leak_warning(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image_folder(root / "train", classes=2, per_class=4)
    write_image_folder(root / "test", classes=2, per_class=2, seed=1)
    (root / "test" / "class_0" / "leak.jpg").write_bytes((root / "train" / "class_0" / "img_001.jpg").read_bytes())
    report = check_image_tree(root)
    assert [pair.kind for pair in report.duplicates] == ["across splits"]
    assert any("across splits" in line and "test/class_0/leak.jpg" in line for line in report.warnings())


def test_unsplit_data_splits_as_before() -> None:
    """No copies, no small class: the very split the earlier stratified_split gave (run identities hold)."""
    labels = [0] * 30 + [1] * 17 + [2] * 9
    remaining, parts = np.arange(len(labels)), []
    for frac in (0.15, 0.1):  # the earlier algorithm, for reference
        size = max(round(frac * len(labels)), 3)
        remaining, part = train_test_split(remaining, test_size=size, stratify=np.asarray(labels)[remaining],
                                           random_state=3)
        parts.append(sorted(part.tolist()))
    assert stratified_split(labels, [0.15, 0.1], 3) == [sorted(remaining.tolist()), *parts]


# ---------------------------------------------------------------- 3. small classes


def test_a_one_image_class_stays_in_train_and_the_rest_stay_stratified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_image_folder(tmp_path / "data", classes=3, per_class=12)
    write_image_folder(tmp_path / "one", classes=4, per_class=1, seed=7)
    (root / "class_3").mkdir()
    (root / "class_3" / "only.png").write_bytes((tmp_path / "one" / "class_3" / "img_000.png").read_bytes())

    for seed in range(5):  # the unstratified fallback this replaces lost a class for most seeds
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="finetune.data.datasets"):
            splits = load_folder_splits(_cfg(root, seed=seed))
        assert [p.name for p, y in splits.train.samples if y == 3] == ["only.png"]
        for part in (splits.val, splits.test):
            assert {y for _, y in part.samples} == {0, 1, 2}
        assert "'class_3'" in caplog.text and "val" in caplog.text and "test" in caplog.text


def test_a_class_of_copies_counts_as_one_image(caplog: pytest.LogCaptureFixture) -> None:
    """Two byte-identical files are one picture: that class cannot give val one and keep one."""
    labels = [0] * 20 + [1] * 20 + [2] * 2
    groups = [f"u{i}" for i in range(40)] + ["same", "same"]
    with caplog.at_level(logging.WARNING, logger="finetune.data.datasets"):
        rest, val, test = stratified_split(labels, [0.2, 0.2], 0, groups=groups, names=["ant", "bee", "wasp"])
    assert {40, 41} <= set(rest) and sorted(rest + val + test) == list(range(len(labels)))
    label = np.asarray(labels)
    assert set(label[val]) == set(label[test]) == {0, 1}
    assert "'wasp'" in caplog.text and "val" in caplog.text and "test" in caplog.text


def test_train_too_small_for_sklearn_still_keeps_every_class() -> None:
    labels = [0, 0, 1, 1, 2, 2, 3, 3]  # half to val: train cannot hold 4 classes by sklearn's rule
    rest, val = stratified_split(labels, [0.5], 0)
    assert sorted(np.asarray(labels)[rest].tolist()) == [0, 1, 2, 3] == sorted(np.asarray(labels)[val].tolist())
    with pytest.raises(SetupError, match="training data"):
        stratified_split(labels, [0.6], 0)


# ---------------------------------------------------------------- 4. aspect-ratio bombs


def test_a_long_thin_png_is_refused_by_check_and_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100000 x 2 pixels, 0.2 Mpx: the eval resize would have made it 3.65M x 73 px (MemoryError at 224)."""
    root = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    strip = root / "class_0" / "strip.png"
    Image.new("1", (100000, 2)).save(strip)
    assert strip.stat().st_size < 1000

    report = check_image_tree(root)
    [bad] = report.bad
    assert bad.path == strip and f"{MAX_ASPECT}:1" in bad.reason
    assert strip in apply_policy(report, "skip")
    with pytest.raises(SetupError, match=r"strip\.png"):
        apply_policy(report, "error")

    loads: list[Image.Image] = []
    load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self) or load(self))
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="aspect ratio") as caught:
        open_rgb(strip)
    assert time.perf_counter() - start < 1 and loads == []  # refused from the header: no pixel decoded
    assert caught.value.path == strip


def test_the_aspect_limit_is_a_bound_not_a_taste(tmp_path: Path) -> None:
    at_limit = tmp_path / "banner.png"
    Image.new("RGB", (MAX_ASPECT * 4, 4)).save(at_limit)
    assert open_rgb(at_limit).size == (MAX_ASPECT * 4, 4)
    over = tmp_path / "tall.png"
    Image.new("RGB", (4, MAX_ASPECT * 4 + 1)).save(over)
    with pytest.raises(BadImageError, match="aspect ratio"):
        open_rgb(over)


def test_a_memo_from_before_the_aspect_limit_is_not_trusted(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", classes=2, per_class=2)
    strip = root / "class_1" / "strip.png"
    Image.new("1", (100000, 2)).save(strip)
    stat = strip.stat()
    memo = tmp_path / "memo.json"
    old = {"max_pixels": 89_478_485, "files": {str(strip): [stat.st_size, stat.st_mtime_ns, "", "1", None]}}
    memo.write_text(json.dumps(old))
    assert check_image_tree(root, memo=memo).bad_files() == [strip]


# ---------------------------------------------------------------- 5. splits.csv


def test_split_rows_and_csv_for_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "data", classes=3, per_class=10)
    splits = load_folder_splits(_cfg(root))
    rows = split_rows(splits)
    assert len(rows) == 30 and all(tuple(row) == SPLIT_COLUMNS for row in rows)
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    for row in rows:
        path = Path(row["path"])
        assert row["sha256"] == _sha(path) and row["label"] == path.parent.name
    assert [row["path"] for row in rows if row["split"] == "val"] == [str(p) for p, _ in splits.val.samples]

    written = write_splits_csv(splits, tmp_path / "run" / "splits.csv")
    with open(written, newline="", encoding="utf-8") as file:
        assert list(csv.DictReader(file)) == rows

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # between the temp file and its rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_splits_csv(splits, written)
    monkeypatch.undo()
    assert sorted(path.name for path in written.parent.iterdir()) == ["splits.csv"]  # no splits.csv.tmp left


def test_split_rows_reuse_the_checks_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.data.datasets as datasets

    root = _tree_with_copies(tmp_path / "data")
    report = check_image_tree(root)
    splits = load_folder_splits(_cfg(root), hashes=report.hashes)
    read: list[Path] = []
    monkeypatch.setattr(datasets, "sha256_files", lambda paths: read.extend(paths) or {})
    rows = split_rows(splits)
    assert read == [] and all(row["sha256"] == report.hashes[Path(row["path"])] for row in rows)


def test_split_rows_for_in_memory_and_torchvision_data() -> None:
    digits = load_digits_splits(SimpleNamespace(val_fraction=0.1, test_fraction=0.1, split_seed=0))
    rows = split_rows(digits)
    assert len(rows) == 1797 and all(len(row["sha256"]) == 64 for row in rows)
    assert {row["label"] for row in rows} == set(digits.classes)

    class Base:
        def __init__(self) -> None:
            self.targets = [0, 1, 1, 0]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            return Image.new("RGB", (4, 4), (i, i, i)), self.targets[i]

    base = Base()
    splits = SimpleNamespace(train=TorchvisionDataset(base, [0, 1]), val=TorchvisionDataset(base, [2]),
                             test=TorchvisionDataset(base, [3]), classes=["cat", "dog"], hashes={})
    assert split_rows(splits) == [
        {"path": "0", "split": "train", "label": "cat", "sha256": ""},
        {"path": "1", "split": "train", "label": "dog", "sha256": ""},
        {"path": "2", "split": "val", "label": "dog", "sha256": ""},
        {"path": "3", "split": "test", "label": "cat", "sha256": ""},
    ]


def test_a_run_records_the_split_it_used(compose_cfg, image_folder: Path) -> None:
    """splits.csv: what was in test, with content hashes, so a later run can prove it used the same data."""
    from finetune.run.train import train

    summary = train(compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}",
                                "data.image_size=32", "data.num_workers=0", "trainer.max_epochs=1", "logger=none"))
    with open(Path(summary["run_dir"]) / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) >= {"path", "split", "label", "sha256"}
    counts = {name: sum(r["split"] == name for r in rows) for name in ("train", "val", "test")}
    assert counts == summary["split_sizes"]
    first = next(r for r in rows if r["split"] == "test")
    assert hashlib.sha256(Path(first["path"]).read_bytes()).hexdigest() == first["sha256"]


def test_min_per_class_refuses_a_tree_with_a_too_small_class(compose_cfg, tmp_path: Path) -> None:
    from finetune.errors import SetupError
    from finetune.run.train import train

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=8)
    for extra in sorted((root / "class_2").iterdir())[2:]:
        extra.unlink()
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={root}", "data.image_size=32",
                      "data.min_per_class=5", "trainer.max_epochs=1", "logger=none")
    with pytest.raises(SetupError, match=r"data\.min_per_class=5: .* class_2 \(2\)"):
        train(cfg)


class _ExplodesOn:
    """A transform that fails for one picture size, as a resize can for one image and not the others."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: Image.Image):
        if image.size == self.size:
            raise MemoryError("cannot allocate 3.65M x 73 px")
        return np.asarray(image).mean()


def _two_images(tmp_path: Path) -> ImageFileDataset:
    Image.new("RGB", (8, 4)).save(tmp_path / "wide.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "square.png")
    return ImageFileDataset([(tmp_path / "wide.png", 0), (tmp_path / "square.png", 1)])


def test_a_transform_failure_is_a_reported_skip(tmp_path: Path, caplog) -> None:
    from finetune.data.datamodule import Transformed

    dataset = Transformed(_two_images(tmp_path), _ExplodesOn((8, 4)), "skip")
    with caplog.at_level(logging.WARNING):
        _, label = dataset[0]
    assert label == 1  # the next image stands in, as for a file that stops decoding
    assert "wide.png" in caplog.text and "MemoryError" in caplog.text


def test_a_transform_failure_under_error_names_the_file_also_from_a_worker(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from finetune.data.datamodule import Transformed
    from finetune.errors import message_of

    dataset = Transformed(_two_images(tmp_path), _ExplodesOn((8, 4)), "error")
    with pytest.raises(SetupError, match=r"wide.png could not be transformed \(MemoryError"):
        dataset[0]
    with pytest.raises(SetupError) as raised:
        list(DataLoader(dataset, batch_size=2, num_workers=1))
    assert "Original Traceback" in str(raised.value)  # what torch re-raises from a worker
    message = message_of(raised.value)
    assert message.startswith(f"{tmp_path / 'wide.png'} could not be transformed") and "\n" not in message
