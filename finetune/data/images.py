"""Decode one image file into a fully loaded 8-bit RGB picture, or say why it cannot be used.

Every image the framework reads (training folders, the data check, prediction) goes through
``open_rgb`` so that all of them see the same pixels: grayscale, palette, alpha, CMYK and 16-bit
files are normalised here once, and a broken file raises ``BadImageError`` with a short reason
instead of whatever Pillow happened to raise, at whatever point it happened to decode lazily.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Extensions the datasets read; anything else in a class folder is ignored (and reported by the check).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Pillow's own default (Image.MAX_IMAGE_PIXELS): about a 9459 x 9459 picture, ~268 MB as RGB.
MAX_PIXELS = 89_478_485

# Longest side / shortest side beyond which a picture is refused. The model's resize scales the
# short side to ~224 px, so the long side grows by the same factor: a 100000 x 2 strip (a 110-byte
# PNG, 0.2 Mpx, far under MAX_PIXELS) would become 11.2M x 224 px, gigabytes of RGB. At 50:1 the
# resized picture stays under 50 * 224 * 224 = 2.5 Mpx; real photos, scans and banners are under 10:1.
MAX_ASPECT = 50

# Background that transparent pixels are composited on: what image viewers, and so the people who
# labelled the data, show. Plain convert("RGB") would expose whatever colour the file stores under
# alpha 0, usually black, so a logo on a transparent background would turn into a logo on black.
ALPHA_BACKGROUND = (255, 255, 255)

# Pillow's plugins raise a wide spread of exception types on corrupt input (its fuzz tests list
# these); all of them mean the same thing to us: this file cannot be used.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    RuntimeError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}


class BadImageError(Exception):
    """A file that cannot be used as an image; ``reason`` is short enough for one report line.

    Both arguments are kept in ``args`` so the error pickles intact across DataLoader workers.
    """

    def __init__(self, path: Path | str, reason: str = "unreadable image") -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def is_image_file(path: Path | str) -> bool:
    """True when the extension says the datasets should read this file."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadImageError(path, f"cannot read file: {error.strerror or error}") from error


def open_rgb(path: Path | str, max_pixels: int = MAX_PIXELS, draft_side: int | None = None) -> Image.Image:
    """The file at ``path`` as a fully loaded RGB image; raises ``BadImageError`` if unusable.

    ``draft_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT-domain reduction) as long as
    its shorter side stays >= that many pixels: for a resize to that side right after (see :func:`draft`).
    """
    path = Path(path)
    data = _read(path)
    image, _ = decode_rgb(data, path, max_pixels, draft_side)
    return image


def decode_rgb(
    data: bytes, path: Path | str, max_pixels: int = MAX_PIXELS, draft_side: int | None = None
) -> tuple[Image.Image, str]:
    """Decode bytes already read (the check hashes them too) into ``(rgb image, original mode)``.

    The original mode (``"L"``, ``"CMYK"``, ``"I;16"`` ...) lets the data check count how many
    files were converted; ``path`` only names the file in errors.
    """
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with _strict_truncation(), Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, path, max_pixels)
            if draft_side:
                draft(image, draft_side)
            image.load()
            mode = image.mode
            rgb = _to_rgb(image, path)
    except BadImageError:
        raise
    except UnidentifiedImageError as error:
        raise BadImageError(path, "not an image (format not recognised)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, f"too large: {error}") from error
    except _DECODE_ERRORS as error:
        raise BadImageError(path, f"truncated or corrupt: {error}") from error
    return _upright(rgb), mode


JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
_ORIENTATION = 0x0112  # EXIF tag: 1 = stored upright


def rgb_jpeg_size(data: bytes, path: Path | str, max_pixels: int = MAX_PIXELS) -> tuple[int, int, int] | None:
    """``(width, height, EXIF orientation)`` when ``data`` is an RGB JPEG whose header passes :func:`open_rgb`'s
    checks (a refused size raises ``BadImageError``); None for anything libjpeg's fast path should not take
    (another format, grayscale, CMYK, a header PIL cannot read): :func:`decode_rgb` decodes those or says why not."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as header:
            _check_pixels(header, path, max_pixels)
            if header.mode != "RGB":  # grayscale, CMYK: PIL's conversions, as for every other file
                return None
            return header.width, header.height, int(header.getexif().get(_ORIENTATION, 1) or 1)
    except BadImageError:
        raise
    except Exception:  # a header PIL cannot read: decode_rgb names the reason
        return None


def decode_jpeg_quietly(data: Any, device: Any = "cpu", **kwargs: Any) -> Any:
    """torchvision.io.decode_jpeg without torchvision 0.29's deprecation notice (its decoders move to TorchCodec;
    they still work). On the CPU libjpeg's warnings are errors ("premature end of data": a truncated file is bad);
    nvjpeg's are not (a warning there must not send every batch down the slow path)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        if str(device) == "cpu":
            warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, **kwargs)


def open_jpeg_tensor(path: Path | str, max_pixels: int = MAX_PIXELS) -> Any:
    """A JPEG decoded by torchvision.io.decode_jpeg into a uint8 RGB tensor (CHW, EXIF orientation applied), the
    header checked first as :func:`open_rgb` checks it; any other file, or a JPEG libjpeg's fast path refuses
    (truncated, CMYK, ...), goes through :func:`open_rgb`, which decodes it or says why not."""
    import torch

    path = Path(path)
    data = _read(path)
    if rgb_jpeg_size(data, path, max_pixels) is None:
        return decode_rgb(data, path, max_pixels)[0]
    try:
        return decode_jpeg_quietly(torch.frombuffer(bytearray(data), dtype=torch.uint8), apply_exif_orientation=True)
    except Exception:  # corrupt or truncated: PIL's strict decode names the reason
        return decode_rgb(data, path, max_pixels)[0]


class EncodedJpeg(NamedTuple):
    """An RGB JPEG's bytes (1-D uint8 tensor) left undecoded for ``data.decode=device``, with its header's size."""

    data: Any
    height: int
    width: int


def read_for_device(path: Path | str, max_pixels: int = MAX_PIXELS) -> Any:
    """``data.decode=device``: an upright RGB JPEG as :class:`EncodedJpeg` (the training device decodes it, in a
    batch), anything else decoded here as :func:`open_rgb` does (EXIF-rotated JPEGs too: nvjpeg does not rotate)."""
    import torch

    path = Path(path)
    data = _read(path)
    header = rgb_jpeg_size(data, path, max_pixels)
    # not upright, or no end-of-image marker (truncated: Pillow's strict decode says so here, whatever the
    # device's decoder would do with it)
    if header is None or header[2] != 1 or not data.rstrip(b"\0").endswith(JPEG_END):
        return decode_rgb(data, path, max_pixels)[0]
    width, height, _ = header
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width)


def image_loader(decode: str, resize_side: int, max_pixels: int = MAX_PIXELS) -> Callable[[Path], Any]:
    """The file loader for ``data.decode``: ``pil`` (open_rgb), ``pil_draft`` (JPEG draft to ``resize_side``),
    ``torchvision`` (decode_jpeg for RGB JPEGs), ``device`` (JPEG bytes for the training device to decode, see
    finetune.data.device_decode). Picklable, for DataLoader workers."""
    if decode == "pil_draft":
        return functools.partial(open_rgb, max_pixels=max_pixels, draft_side=int(resize_side))
    if decode == "torchvision":
        return functools.partial(open_jpeg_tensor, max_pixels=max_pixels)
    if decode == "device":
        return functools.partial(read_for_device, max_pixels=max_pixels)
    return functools.partial(open_rgb, max_pixels=max_pixels)


def per_file_decode(decode: str) -> str:
    """The decode where files are read one by one (predict): ``device`` as ``torchvision`` (its pixels on a CPU)."""
    return "torchvision" if decode == "device" else decode


def draft(image: Image.Image, side: int) -> None:
    """Ask a JPEG for its largest DCT-domain reduction (1/2, 1/4, 1/8) that keeps the shorter side >= ``side``.

    The resize that follows then starts from 4-64x fewer pixels; its result differs from a full decode's by a
    few 8-bit levels (benchmarks/decode_pipeline.py measures how many). Other formats, and JPEGs not at least
    twice ``side``, decode in full.
    """
    width, height = image.size
    if image.format != "JPEG" or min(width, height) < 2 * side:
        return
    scale = side / min(width, height)
    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make Pillow raise on truncated data while decoding, even if other code allowed it.

    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` is a popular workaround that silently pads half a
    JPEG with grey, so we switch it off around our own decode and put back what was there. It is
    a process-wide flag: DataLoader workers are processes, and we only ever make it stricter.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _check_pixels(image: Image.Image, path: Path | str, max_pixels: int) -> None:
    """Refuse oversized or extremely elongated images from the header alone, before any pixel is decoded.

    Pillow's own guard only warns between MAX_IMAGE_PIXELS and twice that, and reads a
    process-wide setting; this one reads the argument. Pillow still refuses anything over twice
    ``Image.MAX_IMAGE_PIXELS``, so a ``max_pixels`` above that needs Pillow's limit raised too.
    A picture longer than ``MAX_ASPECT`` times its width (or the other way round) is refused as
    well: it is small on disk and in pixels, but the model's resize would make it huge.
    """
    width, height = image.size
    if width * height > max_pixels:
        raise BadImageError(path, f"too large: {width}x{height} = {width * height} pixels > {max_pixels}")
    short, long = sorted((width, height))
    if short < 1:
        raise BadImageError(path, f"no pixels: {width}x{height}")
    if long > MAX_ASPECT * short:
        raise BadImageError(
            path,
            f"aspect ratio too extreme: {width}x{height} is {long / short:.0f}:1, over the "
            f"{MAX_ASPECT}:1 limit (finetune.data.images.MAX_ASPECT): scaling its short side to the "
            "model's input size would make the long side huge",
        )


def _to_rgb(image: Image.Image, path: Path | str) -> Image.Image:
    """8-bit RGB copy of a loaded image of any mode; alpha is composited on ALPHA_BACKGROUND."""
    if image.mode in _WIDE_MODES:
        image = Image.fromarray(_scale_to_uint8(np.asarray(image), image.mode), mode="L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:  # e.g. LAB, which Pillow cannot convert to RGB
        raise BadImageError(path, f"unsupported colour mode {image.mode}") from error


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map high bit-depth values onto 0..255 by scaling, not clipping.

    Pillow's own ``convert("L")`` clips 16-bit data at 255, turning nearly every pixel white.
    16-bit modes span 0..65535, so divide by 257 (65535 -> 255 exactly). Mode ``I`` is how
    Pillow holds 16-bit PNG/TIFF data in 32-bit ints, so it is read the same way when its values
    fit 16 bits; float ``F`` images in 0..1 are scaled by 255; anything else is stretched from its
    own minimum to maximum, the only scale such data carries.
    """
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so a phone photo is seen the way its labeller saw it.

    A malformed EXIF block does not make the pixels unusable, so it leaves the image as stored.
    """
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image
