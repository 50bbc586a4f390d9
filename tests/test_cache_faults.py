"""Feature-cache faults (issue 15): recorded layout checked on load, stale temp files, unusable cache.dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.data.features import (
    FeatureCacheDataModule,
    remove_stale_temp_files,
    shard_files,
    stale_temp_files,
    temp_path,
)
from finetune.errors import SetupError
from finetune.run.train import train
from tests.conftest import own_dir, write_image_folder

FLAT = torch.nn.Sequential(torch.nn.Flatten(1))


def tensor_images(n_train: int = 5, n_eval: int = 3) -> dict[str, torch.utils.data.Dataset]:
    gen = torch.Generator().manual_seed(0)
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    return {s: torch.utils.data.TensorDataset(torch.randn(n, 3, 4, 4, generator=gen), torch.arange(n) % 2)
            for s, n in sizes.items()}


def cached(folder: Path, images: dict, views: int = 1) -> FeatureCacheDataModule:
    dm = FeatureCacheDataModule(images, FLAT, folder, {"backbone": "flat"}, batch_size=2, train_views=views)
    dm.prepare()
    return dm


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[str, ...]:
    """A pre-split image tree: exactly 6 train images (2 classes x 3), 4 val, 4 test."""
    root = tmp_path / "tiny"
    write_image_folder(root / "train", classes=2, per_class=3)
    write_image_folder(root / "val", classes=2, per_class=2, seed=1)
    write_image_folder(root / "test", classes=2, per_class=2, seed=2)
    return ("data=folder", f"data.root={root}", "data.check=false", "data.num_workers=0", "data.batch_size=4",
            "backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1", "logger=none")


# --- 1. the layout is recorded and checked, the view count never guessed ------------------------------------


def test_views_equal_to_number_of_train_images(tmp_path: Path) -> None:
    images = tensor_images(n_train=5)
    dm = cached(tmp_path / "c", images, views=5)  # features (5, 5, 48): the old guess took it for 1 view
    train_set = dm.datasets["train"]
    assert train_set.views == 5 and len(train_set) == 5
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 48) and y.shape == (2,)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["views"] == 5 and meta["backbone"] == "flat"
    assert meta["shards"]["train.0of1"]["features"]["shape"] == [5, 5, 48]
    assert meta["shards"]["train.0of1"]["labels"]["shape"] == [5]
    assert meta["shards"]["val.0of1"]["views"] == 1 and meta["shards"]["val.0of1"]["rows"] == 3
    again = cached(tmp_path / "c", images, views=5)  # reused, same layout
    assert again.extracted_images == 0 and again.datasets["train"].views == 5


def test_views_equal_to_number_of_train_images_end_to_end(compose_cfg, tiny_folder) -> None:
    summary = train(compose_cfg(*tiny_folder, "data.augment=true", "cache.views=6"))
    folder = Path(summary["feature_cache"])
    features = np.load(folder / "train.0of1.features.npy", mmap_mode="r")
    assert features.shape == (6, 6, 512)
    assert json.loads((folder / "meta.json").read_text())["views"] == 6
    assert summary["epochs_run"] == 1


def _replace_npy(path: Path, array: np.ndarray) -> None:
    """Rewrite a cache array as something else would (new file, renamed over the old one)."""
    tmp = path.with_name("rewrite.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@pytest.mark.parametrize("which", ["labels", "features"])
def test_wrong_length_is_a_damaged_cache(tmp_path: Path, which: str) -> None:
    folder = tmp_path / "c"
    images = tensor_images()
    cached(folder, images)
    files = shard_files(folder, "train", 0, 1)
    path = files.labels if which == "labels" else files.features
    _replace_npy(path, np.load(path)[:-1])
    with pytest.raises(SetupError, match="damaged feature cache") as err:
        cached(folder, images)
    assert str(folder) in str(err.value) and "rm -r" in str(err.value) and "\n" not in str(err.value)


def test_views_changed_in_the_record_is_a_damaged_cache(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    images = tensor_images()
    cached(folder, images, views=2)
    with pytest.raises(SetupError, match=r"damaged feature cache .*view"):
        cached(folder, images, views=3)  # same folder, another view count: never reinterpreted


def test_missing_record_means_extract_again(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    images = tensor_images()
    cached(folder, images)
    shard_files(folder, "val", 0, 1).record.unlink()  # e.g. killed after the arrays were renamed
    again = cached(folder, images)
    assert again.extracted_images == 3 and len(again.datasets["val"]) == 3


def test_wrong_labels_length_end_to_end(compose_cfg, tiny_folder) -> None:
    first = train(compose_cfg(*tiny_folder))
    folder = Path(first["feature_cache"])
    labels = shard_files(folder, "train", 0, 1).labels
    _replace_npy(labels, np.load(labels)[:-2])
    with pytest.raises(SetupError, match="damaged feature cache") as err:
        train(own_dir(compose_cfg(*tiny_folder), "again"))
    assert "delete that folder" in str(err.value).lower() and str(folder) in str(err.value)


# --- 2. temp files: one pattern, a dead writer's removed --------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    final = shard_files(tmp_path, "train", 0, 1).features
    dead, alive = temp_path(final, dead_pid()), temp_path(final, os.getpid())
    legacy = tmp_path / f"train.0of1.labels.tmp{dead_pid()}.npy"  # the name earlier versions wrote
    for path in (dead, alive, legacy):
        path.write_bytes(b"partial")
    (tmp_path / "train.0of1.features.npy").write_bytes(b"not a temp file")
    assert stale_temp_files(tmp_path) == sorted([dead, legacy])
    assert remove_stale_temp_files(tmp_path) == sorted([dead, legacy])
    assert not dead.exists() and not legacy.exists() and alive.exists()
    assert (tmp_path / "train.0of1.features.npy").exists()
    assert stale_temp_files(tmp_path / "missing") == []


def test_extraction_removes_stale_temp_files_and_leaves_none(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    final = shard_files(folder, "train", 0, 1).features
    dead, alive = temp_path(final, dead_pid()), temp_path(final.with_name("other.npy"), os.getpid())
    dead.write_bytes(b"partial")
    alive.write_bytes(b"a live writer's")
    cached(folder, tensor_images())
    assert not dead.exists() and alive.exists()
    assert [p for p in folder.iterdir() if ".tmp" in p.name] == [alive]  # its own temp files renamed or removed


# --- 3. an unusable cache.dir is a SetupError ------------------------------------------------------------


def test_cache_dir_under_a_regular_file(compose_cfg, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    cfg = compose_cfg("backbone.weights=none", "data.image_size=32", "trainer.max_epochs=1", "logger=none",
                      f"cache.dir={blocker / 'cache'}")
    with pytest.raises(SetupError, match=r"cache\.dir") as err:
        train(cfg)
    message = str(err.value)
    assert str(blocker) in message and "is a file" in message and "cache.enabled=false" in message


def test_cache_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path, *args, **kwargs) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(SetupError, match=r"no permission.*cache\.dir=") as err:
        cached(tmp_path / "ro" / "c", tensor_images())
    assert str(tmp_path / "ro" / "c") in str(err.value)


def test_cache_dir_read_only_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(SetupError, match=r"cache\.dir"):
            cached(read_only / "c", tensor_images())
    finally:
        read_only.chmod(0o700)


def test_existing_cache_folder_not_writable_when_extraction_is_needed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    folder = tmp_path / "c"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(SetupError, match=r"not writable.*cache\.enabled=false"):
        cached(folder, tensor_images())


def test_an_unusable_cache_dir_stops_the_data_check_too(compose_cfg, image_folder: Path, tmp_path: Path) -> None:
    from finetune.run.train import train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose_cfg("backbone.weights=none", "data=folder", f"data.root={image_folder}", "data.image_size=32",
                      "trainer.max_epochs=1", "logger=none", f"cache.dir={blocker / 'cache'}")
    with pytest.raises(SetupError, match=r"cache\.dir"):
        train(cfg)
