"""Image files of every awkward kind, with the pixels they must decode to, and ImageNet-layout folders built from them.

Each writer returns the uint8 RGB [3, H, W] the file must decode to, computed independently
of the decoder: the pixels written (lossless formats), the palette colours looked up by hand,
``round(v * 255 / 65535)`` in exact fractions for 16-bit values. JPEGs are lossy: their
expectation is the colour written, to be compared within a few grey levels.
"""
from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

BAND_COLOURS = ((200, 40, 90), (10, 220, 130))  # two flat 8-row bands: whole JPEG blocks, so little ringing


def _save(path: Path, image: Image.Image, fmt: str, **options: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)


def bands(width: int = 16) -> np.ndarray:
    """[16, width, 3] uint8: rows 0-7 the first colour, rows 8-15 the second."""
    pixels = np.zeros((16, width, 3), dtype=np.uint8)
    pixels[:8], pixels[8:] = BAND_COLOURS
    return pixels


def chw(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def rgb_jpeg(path: Path, pixels: np.ndarray, quality: int = 95) -> np.ndarray:
    _save(path, Image.fromarray(pixels), "JPEG", quality=quality, subsampling=0)
    return chw(pixels)


def cmyk_jpeg(path: Path) -> np.ndarray:
    """A CMYK JPEG of :func:`bands` (ImageNet's training set holds a few dozen CMYK JPEGs)."""
    pixels = bands()
    _save(path, Image.fromarray(pixels).convert("CMYK"), "JPEG", quality=95)
    return chw(pixels)  # K = 0: C, M, Y = 255 - R, G, B, so the colour comes back whatever CMYK formula is used


def gray_jpeg(path: Path) -> np.ndarray:
    gray = np.zeros((16, 16), dtype=np.uint8)
    gray[:8], gray[8:] = 94, 147
    _save(path, Image.fromarray(gray, "L"), "JPEG", quality=95)
    return np.stack([gray] * 3)


def png_named_jpeg(path: Path, rng: np.random.Generator) -> np.ndarray:
    """A PNG of noise saved under ``path`` (``.JPEG``): lossless, so the pixels come back exactly."""
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    _save(path, Image.fromarray(pixels), "PNG")
    return chw(pixels)


SIXTEEN_BIT_VALUES = (0, 128, 129, 257, 385, 386, 32767, 32896, 40000, 65150, 65407, 65535)


def to_8bit(value: int) -> int:
    """round(v * 255 / 65535), in exact fractions (65535 / 255 = 257 is odd, so no value is a tie)."""
    return int(Fraction(value * 255, 65535) + Fraction(1, 2))


def gray16_png(path: Path) -> np.ndarray:
    """A 16-bit grayscale PNG (PIL mode I;16) of :data:`SIXTEEN_BIT_VALUES`, 3 x 4."""
    values = np.array(SIXTEEN_BIT_VALUES, dtype=np.uint16).reshape(3, 4)
    _save(path, Image.fromarray(values), "PNG")
    expected = np.vectorize(to_8bit)(values.astype(np.int64)).astype(np.uint8)
    return np.stack([expected] * 3)


def rgb16_png(path: Path) -> np.ndarray:
    """A 48-bit RGB PNG written chunk by chunk (PIL cannot write one): each channel a rotation of the values."""
    values = np.array(SIXTEEN_BIT_VALUES, dtype=np.uint16)
    pixels = np.stack([values, np.roll(values, 4), np.roll(values, 8)], axis=-1).reshape(3, 4, 3)
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(pixels.shape[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 4, 3, 16, 2, 0, 0, 0)  # width, height, depth 16, colour type 2 (RGB)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return chw(np.vectorize(to_8bit)(pixels.astype(np.int64)).astype(np.uint8))


PALETTE = ((255, 0, 0), (0, 128, 255), (12, 34, 56), (250, 250, 5))


def palette_png(path: Path) -> np.ndarray:
    """A palette PNG whose entry 0 is fully transparent: every pixel comes back as its palette colour."""
    index = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 0]], dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([c for colour in PALETTE for c in colour] + [0] * (768 - 3 * len(PALETTE)))
    _save(path, image, "PNG", transparency=0)
    return chw(np.array([[PALETTE[i] for i in row] for row in index], dtype=np.uint8))


def alpha_png(path: Path, mode: str, rng: np.random.Generator) -> np.ndarray:
    """An ``RGBA`` or ``LA`` PNG with random alpha: the colour comes back, the alpha is dropped."""
    pixels = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    if mode == "LA":
        image = Image.fromarray(np.stack([pixels[..., 0], pixels[..., 3]], -1), "LA")
        expected = np.stack([pixels[..., 0]] * 3)
    else:
        image = Image.fromarray(pixels, "RGBA")
        expected = chw(pixels[..., :3])
    _save(path, image, "PNG")
    return expected


def bmp_named_jpg(path: Path, rng: np.random.Generator) -> np.ndarray:
    """A BMP named ``.jpg``: torchvision cannot read BMPs, PIL can."""
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    _save(path, Image.fromarray(pixels), "BMP")
    return chw(pixels)


def noise_jpeg(path: Path, rng: np.random.Generator, height: int, width: int, quality: int = 90) -> None:
    """A smooth random image (noise at 1/8 resolution, upsampled), as photographs compress."""
    small = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    _save(path, image, "JPEG", quality=quality)


def imagenet_folder(root: Path, rng: np.random.Generator, wnids: tuple[str, ...] = ("n01440764", "n01443537",
                    "n01484850"), train: int = 5, val: int = 2, special: bool = True) -> dict[str, np.ndarray]:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` of varied sizes; with ``special`` the
    awkward files too (CMYK, grayscale, PNG named .JPEG, 16-bit and palette PNGs), spread over the classes.

    Returns the awkward files' expected decodings, by path (str).
    """
    for w, wnid in enumerate(wnids):
        for split, count in (("train", train), ("val", val)):
            for i in range(count):
                height, width = 24 + 4 * ((i + w) % 3), 32 - 4 * ((i + 2 * w) % 3)
                noise_jpeg(root / split / wnid / f"{wnid}_{split}_{i}.JPEG", rng, height, width)
    expected: dict[str, np.ndarray] = {}
    if special:
        first, second = wnids[0], wnids[1 % len(wnids)]
        writers = {
            root / "train" / first / "cmyk.JPEG": cmyk_jpeg,
            root / "train" / second / "gray.JPEG": gray_jpeg,
            root / "train" / first / "disguised.JPEG": lambda p: png_named_jpeg(p, rng),
            root / "train" / second / "deep.png": gray16_png,
            root / "val" / first / "palette.png": palette_png,
        }
        for path, write in writers.items():
            expected[str(path)] = write(path)
    return expected
