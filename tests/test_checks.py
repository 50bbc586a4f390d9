"""Image decoding, the data check and its CLI, on tiny files written into tmp_path.

Every broken file here is made the way it happens in the wild (a download cut in half, a text
file saved as .jpg, an empty file), so the tests exercise Pillow's real failure paths.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from finetune.cli.check import main as check_main
from finetune.data.checks import apply_policy, check_image_tree, image_files
from finetune.data.images import BadImageError, decode_rgb, open_rgb
from finetune.errors import SetupError

REPO = Path(__file__).resolve().parents[1]
SIZE = 16  # 256 pixels: well under the max_pixels=1000 used to make a 64x64 image a "bomb"
SMALL_LIMIT = 1000


def _jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = SIZE) -> Path:
    """A real JPEG with some texture, so cutting it leaves scan data missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(np.array(color) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def _truncated(path: Path) -> Path:
    """A JPEG whose download stopped halfway."""
    data = _jpeg(path, (10, 120, 240), size=32).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _save(path: Path, image: Image.Image, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def _sixteen_bit() -> Image.Image:
    """A 16-bit grayscale image whose values land on exact 8-bit levels when divided by 257."""
    return Image.fromarray(np.array([[0, 257 * 100], [1000, 65535]], dtype=np.uint16))


# ---------------------------------------------------------------- open_rgb


def test_good_jpeg_is_loaded_rgb(tmp_path: Path) -> None:
    image = open_rgb(_jpeg(tmp_path / "good.jpg"))
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert abs(int(np.asarray(image)[..., 0].mean()) - 200) < 15


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_truncated, "truncated"),
        (lambda p: _write(p, b""), "empty file"),
        (lambda p: _write(p, b"this is a note, not a picture\n" * 4), "not an image"),
    ],
    ids=["truncated", "zero-byte", "text-renamed-jpg"],
)
def test_broken_files_raise_bad_image_error(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path / "broken.jpg")
    with pytest.raises(BadImageError, match=reason) as caught:
        open_rgb(path)
    assert caught.value.path == path and reason in caught.value.reason


def test_missing_file_is_a_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="cannot read"):
        open_rgb(tmp_path / "gone.jpg")


def test_decompression_bomb_is_refused_by_the_argument(tmp_path: Path) -> None:
    path = _save(tmp_path / "bomb.png", Image.new("RGB", (64, 64)))
    with pytest.raises(BadImageError, match="too large"):
        open_rgb(path, max_pixels=SMALL_LIMIT)
    assert open_rgb(path).size == (64, 64)  # the default limit lets it through


def test_pillows_own_bomb_error_is_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 > 2 * 100: Pillow raises itself
    path = _save(tmp_path / "bomb.png", Image.new("RGB", (64, 64)))
    with pytest.raises(BadImageError, match="too large"):
        open_rgb(path)


def test_truncation_is_caught_even_if_another_library_allowed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError, match="truncated"):
        open_rgb(_truncated(tmp_path / "cut.jpg"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as found


def test_grayscale_becomes_equal_rgb_channels(tmp_path: Path) -> None:
    image = open_rgb(_save(tmp_path / "gray.png", Image.new("L", (SIZE, SIZE), 77)))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: must not come out black
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red over white
    image = open_rgb(_save(tmp_path / "alpha.png", rgba))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    red, green, blue = image.getpixel((1, 0))
    assert red == 255 and 120 <= green <= 135 and green == blue


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_transparent_gray_and_palette_images_too(tmp_path: Path, mode: str) -> None:
    image = Image.new(mode, (2, 2))
    if mode == "P":
        image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
        image.putpixel((1, 1), 1)
        image.info["transparency"] = 0
    rgb = open_rgb(_save(tmp_path / f"{mode}.png", image))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    if mode == "P":
        assert rgb.getpixel((1, 1)) == (10, 200, 10)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("RGB", (SIZE, SIZE), (230, 60, 150)).convert("CMYK")
    image, mode = decode_rgb(_save(tmp_path / "cmyk.jpg", cmyk, "JPEG").read_bytes(), "cmyk.jpg")
    assert mode == "CMYK" and image.mode == "RGB"
    assert np.abs(np.array(image.getpixel((4, 4))) - (230, 60, 150)).max() < 12


@pytest.mark.parametrize(("fmt", "convert"), [("PNG", None), ("TIFF", "I;16B"), ("TIFF", "I")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path, fmt: str, convert: str | None) -> None:
    source = _sixteen_bit()
    if convert == "I;16B":
        source = Image.frombytes("I;16B", source.size, np.asarray(source).astype(">u2").tobytes())
    elif convert:
        source = source.convert(convert)
    image, mode = decode_rgb(_save(tmp_path / "deep.img", source, fmt).read_bytes(), "deep.img")
    assert mode == (convert or "I;16")
    # Pillow's own convert("L") would clip all but the 0 to 255.
    assert np.asarray(image)[..., 0].tolist() == [[0, 100], [4, 255]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways with "rotate 90" in EXIF is used the way it is displayed."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (SIZE, SIZE // 2), (30, 30, 30)).save(path, "JPEG", exif=exif)
    assert open_rgb(path).size == (SIZE // 2, SIZE)


def test_bad_image_error_survives_pickling(tmp_path: Path) -> None:
    """DataLoader workers send exceptions to the main process by pickling them."""
    error = pickle.loads(pickle.dumps(BadImageError(tmp_path / "x.jpg", "empty file (0 bytes)")))
    assert error.path == tmp_path / "x.jpg" and error.reason == "empty file (0 bytes)"
    assert BadImageError("only a message").reason  # torch re-raises with one string argument


def test_a_loader_loop_can_skip_bad_files(tmp_path: Path) -> None:
    """The dataset's pattern: catch BadImageError per item, drop it in collate, keep training."""
    from torch.utils.data import DataLoader, Dataset

    paths = [
        _jpeg(tmp_path / "a.jpg"),
        _truncated(tmp_path / "b.jpg"),
        _write(tmp_path / "c.jpg", b""),
        _jpeg(tmp_path / "d.jpg", (0, 90, 0)),
    ]

    class Images(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, index: int) -> tuple[int, Image.Image] | None:
            try:
                return index, open_rgb(paths[index])
            except BadImageError:
                return None

    def collate(batch: list) -> list:
        return [item for item in batch if item is not None]

    loaded = [index for batch in DataLoader(Images(), batch_size=2, collate_fn=collate) for index, _ in batch]
    assert loaded == [0, 3]


# ---------------------------------------------------------------- check_image_tree


@pytest.fixture
def messy_tree(tmp_path: Path) -> Path:
    """train/val/test with every kind of problem the check knows about."""
    root = tmp_path / "data"
    train = root / "train"
    good = _jpeg(train / "dog" / "good.jpg", (120, 90, 40))
    _jpeg(train / "dog" / "other.jpg", (90, 60, 20))
    _truncated(train / "dog" / "cut.jpg")
    _write(train / "dog" / "zero.jpg", b"")
    _write(train / "dog" / "note.jpg", b"not an image at all")
    _save(train / "dog" / "bomb.png", Image.new("RGB", (64, 64), (1, 2, 3)))
    _write(train / "dog" / "readme.txt", b"labels by Ann")
    _write(train / "dog" / "._good.jpg", b"macOS resource fork")  # hidden: never data
    _save(train / "cat" / "gray.png", Image.new("L", (SIZE, SIZE), 50))
    _save(train / "cat" / "alpha.png", Image.new("RGBA", (SIZE, SIZE), (9, 9, 9, 100)))
    _save(train / "cat" / "cmyk.jpg", Image.new("CMYK", (SIZE, SIZE), (0, 50, 90, 10)), "JPEG")
    _save(train / "cat" / "deep.png", _sixteen_bit())
    (train / "empty").mkdir()
    _jpeg(root / "val" / "cat" / "v.jpg", (50, 50, 200))
    _jpeg(root / "val" / "zebra" / "z.jpg", (250, 250, 250))
    _write(root / "test" / "dog" / "copy.jpg", good.read_bytes())
    _jpeg(root / "test" / "cat" / "t.jpg", (50, 200, 50))
    return root


def test_check_finds_every_problem(messy_tree: Path) -> None:
    report = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, workers=2)
    dog = messy_tree / "train" / "dog"
    reasons = {bad.path.name: bad.reason for bad in report.bad}
    assert report.layout == "split"
    assert set(reasons) == {"cut.jpg", "zero.jpg", "note.jpg", "bomb.png"}
    assert "truncated" in reasons["cut.jpg"] and "empty" in reasons["zero.jpg"]
    assert "not an image" in reasons["note.jpg"] and "too large" in reasons["bomb.png"]
    assert set(report.bad_files()) == {dog / name for name in reasons}
    assert report.ignored == [dog / "readme.txt"]
    assert report.converted == {"CMYK": 1, "I;16": 1, "L": 1, "RGBA": 1}
    assert report.images["train"] == {"cat": 4, "dog": 2, "empty": 0}
    assert report.empty_classes == [messy_tree / "train" / "empty"]
    assert report.unknown_classes == ["val/zebra"]
    assert "val/dog" in report.missing_classes
    [pair] = report.duplicates
    assert (pair.first, pair.second, pair.kind) == (dog / "good.jpg", messy_tree / "test/dog/copy.jpg",
                                                    "across splits")
    errors = " ".join(report.errors())
    assert "train/empty" in errors and "val/zebra" in errors
    assert any("test/dog/copy.jpg" in warning for warning in report.warnings())


def test_memo_skips_unchanged_files_and_rechecks_changed_ones(messy_tree: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.data.checks as checks

    memo = tmp_path / "memo.json"
    first = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, memo=memo)
    decoded: list[str] = []
    decode = checks._decode_one
    monkeypatch.setattr(checks, "_decode_one", lambda path, limit: decoded.append(path.name) or decode(path, limit))
    again = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, memo=memo)
    assert decoded == [] and again.to_dict() == first.to_dict()

    _write(messy_tree / "train" / "dog" / "cut.jpg", (messy_tree / "train" / "dog" / "good.jpg").read_bytes())
    fixed = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, memo=memo)
    assert decoded == ["cut.jpg"]  # only the changed file is decoded again
    assert "cut.jpg" not in {bad.path.name for bad in fixed.bad}
    check_image_tree(messy_tree, max_pixels=SMALL_LIMIT * 2, memo=memo)  # another limit: all decoded anew
    assert len(decoded) > 10


def test_memo_forgets_unreadable_files_and_files_changing_during_the_check(
        messy_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.data.checks as checks

    memo = tmp_path / "memo.json"
    decode = checks._decode_one
    good = messy_tree / "train" / "dog" / "good.jpg"
    cat = next((messy_tree / "train" / "cat").glob("*.jpg"))

    def flaky(path: Path, limit: int) -> checks._FileResult:
        if path == good:  # an I/O error of the moment, not a property of the file
            return checks._FileResult(path, "", None, f"{checks.CANNOT_READ}: Input/output error")
        if path == cat:  # still being written while the check reads it
            path.write_bytes(path.read_bytes())
            import os
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        return decode(path, limit)

    monkeypatch.setattr(checks, "_decode_one", flaky)
    check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, memo=memo)
    decoded: list[Path] = []
    monkeypatch.setattr(checks, "_decode_one", lambda path, limit: decoded.append(path) or decode(path, limit))
    report = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT, memo=memo)
    assert set(decoded) == {good, cat}  # neither was remembered
    assert good not in report.bad_files()


def test_report_files(messy_tree: Path, tmp_path: Path) -> None:
    report = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT)
    report.write(tmp_path / "run")
    lines = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 4 and all("\t" in line and Path(line.split("\t")[0]).is_absolute() for line in lines)
    data = json.loads((tmp_path / "run" / "data_check.json").read_text())
    assert data["layout"] == "split" and len(data["bad"]) == 4 and data["errors"] == report.errors()


def test_a_report_write_killed_before_its_rename_keeps_the_old_report_and_leaves_no_temp(
        messy_tree: Path, tmp_path: Path, monkeypatch) -> None:
    """The data check's own writer left ``data_check.json.tmp`` behind, a name the next start's sweep of
    ``.*.tmp`` never removes; the shared writer cleans up after itself and keeps the old report whole."""
    from finetune.run.run_dir import remove_leftovers

    run = tmp_path / "run"
    report = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT)
    report.write(run)
    before = {path.name: path.read_bytes() for path in run.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill lands between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write(run)
    monkeypatch.undo()
    remove_leftovers(run)
    assert {path.name: path.read_bytes() for path in run.iterdir()} == before


def test_structural_errors_always_stop_the_run(messy_tree: Path) -> None:
    report = check_image_tree(messy_tree, max_pixels=SMALL_LIMIT)
    for policy in ("skip", "error"):
        with pytest.raises(SetupError, match="val/zebra") as caught:
            apply_policy(report, policy)
        assert "\n" not in str(caught.value)  # one paragraph


@pytest.fixture
def fixable_tree(messy_tree: Path) -> Path:
    """The messy tree without its structural problems: only unreadable files remain."""
    (messy_tree / "train" / "empty").rmdir()
    (messy_tree / "val" / "zebra" / "z.jpg").unlink()
    (messy_tree / "val" / "zebra").rmdir()
    return messy_tree


def test_policy_skip_returns_the_bad_files_and_error_refuses(fixable_tree: Path) -> None:
    report = check_image_tree(fixable_tree, max_pixels=SMALL_LIMIT)
    assert report.errors() == []
    skipped = apply_policy(report, "skip")
    assert len(skipped) == 4 and (fixable_tree / "train/dog/cut.jpg").absolute() in skipped
    with pytest.raises(SetupError, match=r"data\.on_bad_image=skip"):
        apply_policy(report, "error")
    with pytest.raises(SetupError, match="not a policy"):
        apply_policy(report, "ignore")


def test_flat_layout_and_listing(tmp_path: Path) -> None:
    for name, color in (("ant", (1, 1, 1)), ("bee", (200, 200, 0))):
        _jpeg(tmp_path / name / "a.jpg", color)
    _write(tmp_path / "bee" / "nested" / "b.jpg", (tmp_path / "ant" / "a.jpg").read_bytes())
    report = check_image_tree(tmp_path)
    assert report.layout == "flat" and report.errors() == [] and report.bad == []
    assert report.images == {"all": {"ant": 1, "bee": 2}}
    assert [pair.kind for pair in report.duplicates] == ["across classes"]
    assert image_files(tmp_path / "bee") == [tmp_path / "bee/a.jpg", tmp_path / "bee/nested/b.jpg"]
    assert apply_policy(report, "error") == frozenset()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "does not exist"),
        ({"only/a.jpg": True}, "at least two"),
        ({"a.jpg": True}, "no class folders"),
        ({"val/cat/a.jpg": True, "val/dog/b.jpg": True}, "no train/"),
    ],
    ids=["missing-root", "one-class", "images-in-root", "val-without-train"],
)
def test_trees_that_are_no_dataset(tmp_path: Path, layout: dict[str, bool], message: str) -> None:
    root = tmp_path / "data"
    if layout:
        root.mkdir()
    for relative in layout:
        _jpeg(root / relative)
    report = check_image_tree(root)
    with pytest.raises(SetupError, match=message):
        apply_policy(report, "skip")


# ---------------------------------------------------------------- the CLI


def test_cli_exit_codes_in_process(fixable_tree: Path, tmp_path: Path, capsys) -> None:
    assert check_main([f"data.root={tmp_path / 'nowhere'}"]) == 2  # structural
    assert check_main([f"data.root={fixable_tree}", "data.on_bad_image=error", "data.max_pixels=1000"]) == 2
    assert check_main(["data=folder", f"data.root={fixable_tree}", "data.on_bad_image=skip"]) == 0
    assert check_main(["data.rooot=x"]) == 2
    assert check_main(["data=cifar10"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_as_a_process(fixable_tree: Path, tmp_path: Path) -> None:
    """The real entry point: exit codes, a one-paragraph message, no traceback, report files."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "finetune.check", "data=folder", f"data.root={fixable_tree}"]
    refused = subprocess.run([*command, "data.on_bad_image=error"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "data.on_bad_image=skip" in refused.stderr and "Traceback" not in refused.stderr
    skipped = subprocess.run(
        [*command, "data.on_bad_image=skip", f"out={tmp_path / 'report'}"], capture_output=True, text=True,
        env=env,
    )
    assert skipped.returncode == 0, skipped.stderr
    assert len((tmp_path / "report" / "bad_files.txt").read_text().splitlines()) == 3  # bomb now fits



def _cut_with_end_marker(path: Path, keep: float = 0.5) -> Path:
    """A photo-like baseline JPEG cut off inside its scan data, the end marker (FF D9) put back after the cut:
    Pillow and libjpeg decode it without an error, the missing blocks as flat grey."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(3).integers(0, 256, (64, 48, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] + b"\xff\xd9")
    return path


def test_a_cut_off_jpeg_that_decodes_is_named_but_still_used(tmp_path: Path) -> None:
    root = tmp_path / "data"
    cut = _cut_with_end_marker(root / "train" / "cat" / "cut.jpg")
    _jpeg(root / "train" / "cat" / "whole.jpg", size=32)
    _jpeg(root / "train" / "dog" / "mid_grey.jpg", (128, 128, 128), size=32)  # grey with texture: not a fill
    rotated = Image.open(_cut_with_end_marker(root / "train" / "dog" / "turned.jpg", keep=0.7))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored bottom shown on the left: the band is looked for along every edge
    turned = root / "train" / "dog" / "turned.jpg"
    turned.write_bytes(turned.read_bytes()[:2] + _exif_segment(exif) + turned.read_bytes()[2:])
    assert np.all(np.asarray(decode_rgb(cut.read_bytes(), cut)[0])[-8:] == 128)  # no error: nothing else tells
    upright = np.asarray(decode_rgb(turned.read_bytes(), turned)[0])
    assert np.all(upright[:, :8] == 128) and not np.all(upright[-8:] == 128)  # the band on the left now

    memo = tmp_path / "memo.json"
    for _ in range(2):  # decoded, then read back from the memo
        report = check_image_tree(root, memo=memo)
        assert sorted(p.name for p in report.grey_edges) == ["cut.jpg", "turned.jpg"]
        assert report.images == {"train": {"cat": 2, "dog": 2}} and not report.bad  # a warning, not a skip
        (warning,) = [w for w in report.warnings() if "exact grey" in w]
        assert "2 JPEG files" in warning and "train/cat/cut.jpg" in warning and "replace" in warning
    assert json.loads(memo.read_text())["rules"]["grey_band"] == [128, 8]


def _exif_segment(exif: Image.Exif) -> bytes:
    payload = exif.tobytes()  # starts with Exif\0\0
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
