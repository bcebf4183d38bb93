"""Every image mode a folder may hold decodes to the right 8-bit RGB, and bad files are one line naming them.

Expected pixels come from tests/image_files.py: what was written (lossless files), palette
colours looked up by hand, ``round(v * 255 / 65535)`` in exact fractions for 16-bit values.
JPEGs are lossy: flat 8x8 blocks come back within a few grey levels of the colour written.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import seed
from image_files import (
    alpha_png,
    bmp_named_jpg,
    cmyk_jpeg,
    gray16_png,
    gray_jpeg,
    noise_jpeg,
    palette_png,
    png_named_jpeg,
    rgb16_png,
)

from common.errors import UserError
from datasets import load_dataset
from datasets.decode import ConversionTally, UnreadableImage, decode_rgb, describe

JPEG_TOLERANCE = 4  # grey levels: flat blocks at quality 95 decode almost exactly


def rng(k: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed(k))


def decoded(path: Path) -> np.ndarray:
    pixels = decode_rgb(path)
    assert pixels.dtype == torch.uint8 and pixels.ndim == 3 and pixels.shape[0] == 3
    return pixels.numpy()


@pytest.mark.parametrize(("name", "write", "lossless", "note"), [
    ("cmyk.JPEG", cmyk_jpeg, False, "CMYK"),
    ("gray.JPEG", gray_jpeg, False, "L"),
    ("disguised.JPEG", lambda p: png_named_jpeg(p, rng(1)), True, "PNG named .JPEG"),
    ("deep.png", gray16_png, True, "I;16"),
    ("deep_rgb.png", rgb16_png, True, "16-bit"),
    ("palette.png", palette_png, True, "P"),
    ("rgba.png", lambda p: alpha_png(p, "RGBA", rng(2)), True, "RGBA"),
    ("la.png", lambda p: alpha_png(p, "LA", rng(3)), True, "LA"),
    ("bitmap.jpg", lambda p: bmp_named_jpg(p, rng(4)), True, None),
])
def test_every_mode_decodes_to_its_8bit_rgb(tmp_path: Path, name: str, write, lossless: bool, note: str) -> None:
    path = tmp_path / name
    expected = write(path)
    got = decoded(path)
    assert got.shape == expected.shape
    if lossless:
        assert np.array_equal(got, expected)
    else:
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= JPEG_TOLERANCE
    if name == "gray.JPEG":
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[1], got[2])
    if note is not None:
        assert describe(path) == note
    else:
        assert describe(path) in (None, "BMP")  # a BMP: its own format, PIL's mode RGB


def test_sixteen_bits_are_scaled_not_clipped(tmp_path: Path) -> None:
    """The regression of the issue: a 16-bit PNG must not come out (nearly) all white."""
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    from PIL import Image

    Image.fromarray(values).save(tmp_path / "ramp.png")
    got = decoded(tmp_path / "ramp.png")[0].astype(int)
    assert got.min() == 0 and got.max() == 255 and (got == 255).sum() == 1
    assert np.all(np.diff(got.reshape(-1)) >= 0) and len(np.unique(got)) == 64


def test_plain_rgb_files_need_no_note(tmp_path: Path) -> None:
    noise_jpeg(tmp_path / "a.JPEG", rng(5), 16, 24)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    assert describe(tmp_path / "a.JPEG") is None and describe(tmp_path / "b.png") is None


@pytest.mark.parametrize("case", ["empty", "truncated jpeg", "truncated png", "not an image", "missing"])
def test_unreadable_files_are_one_line_naming_them(tmp_path: Path, case: str) -> None:
    path = tmp_path / ("x.png" if "png" in case else "x.JPEG")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated jpeg":
        noise_jpeg(path, rng(6), 64, 64)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "truncated png":
        png_named_jpeg(path, rng(7))
        path.write_bytes(path.read_bytes()[:60])
    elif case == "not an image":
        path.write_text("hello, I am a text file")
    with pytest.raises(UnreadableImage) as info:
        decode_rgb(path)
    message = str(info.value)
    assert isinstance(info.value, UserError) and str(path) in message and "\n" not in message
    assert ".cpp" not in message  # no C++ source location from the decoder
    if case == "empty":
        assert "empty" in message
    if case == "not an image":  # what the file is, not the decoder's advice to call Python functions
        assert "not a JPEG, PNG, WebP or GIF image" in message and "decode_avif" not in message, message


def test_tally_says_what_was_converted_in_one_line() -> None:
    tally = ConversionTally()
    for note in ("CMYK", "CMYK", "L", "PNG named .JPEG", None, "I;16"):
        tally.add(note)
    message = tally.message(10, "DIR")
    assert "\n" not in message and message.startswith("5 of 10 image files of DIR")
    assert "2 CMYK" in message and "1 grayscale (L)" in message and "1 16-bit grayscale (I;16)" in message
    assert "1 PNG named .JPEG" in message
    assert ConversionTally().message(3, "DIR") is None


def test_image_folder_reads_every_mode_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In memory (dataset.stream=false) the folder gets the same decoding: one warning line with the counts."""
    root = tmp_path / "folder"
    expected = {
        ("a", 0): cmyk_jpeg(root / "train" / "a" / "0.jpg"),
        ("a", 1): gray_jpeg(root / "train" / "a" / "1.jpg"),
        ("b", 0): palette_png(root / "train" / "b" / "0.png"),
    }
    gray16_png(root / "val" / "a" / "0.png")
    png_named_jpeg(root / "val" / "b" / "0.jpg", rng(8))
    with caplog.at_level(logging.WARNING):
        splits = load_dataset({"name": "imagefolder", "root": str(root), "image_size": 16, "stream": False})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "5 of 5 image files" in warnings[0] and "1 CMYK" in warnings[0] and "1 PNG named .jpg" in warnings[0]
    from PIL import Image

    # the palette image (3 x 4) is resized to 16 x 16: PIL's bilinear resize of its expected colours
    palette = Image.fromarray(expected[("b", 0)].transpose(1, 2, 0)).resize((16, 16), Image.Resampling.BILINEAR)
    expected[("b", 0)] = np.array(palette).transpose(2, 0, 1)
    for k, key in enumerate(sorted(expected)):
        got = splits.train_images[k].numpy().astype(int)
        assert np.abs(got - expected[key].astype(int)).max() <= (0 if key == ("b", 0) else JPEG_TOLERANCE), key
    # the 16-bit test image (3 x 4, resized to 16 x 16) is not white
    assert splits.test_images[0].float().mean() < 200


def test_a_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "one"
    for split in ("train", "val"):
        noise_jpeg(root / split / "only" / "0.jpg", rng(9), 8, 8)
    with pytest.raises(UserError, match="at least two classes") as info:
        load_dataset({"name": "imagefolder", "root": str(root)})
    assert str(root / "train") in str(info.value) and "\n" not in str(info.value)
