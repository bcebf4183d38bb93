"""One image file -> 8-bit RGB pixels, whatever the file's mode, shared by the in-memory and streaming paths.

Decoder: torchvision's (``torchvision.io.decode_image``, libjpeg-turbo and libpng), picked by
measurement (``scripts/stream_benchmark.py``; figures in the README's "Streaming" part): decode
plus the ImageNet training transform runs 1.2x faster per core than with PIL's decoder, and it
decodes straight into the uint8 tensor the transforms take. PIL decodes only what torchvision
cannot read (e.g. a BMP or TIFF named ``.jpg``) and reads headers to say what was converted.

Conversions, so every file gives the right 8-bit RGB (the file's format is read from its
content, never its name: a PNG named ``.JPEG`` is a PNG):

* CMYK / YCCK JPEGs: libjpeg's CMYK -> RGB (Adobe's inverted CMYK included);
* grayscale (``L``, ``1``), grayscale + alpha (``LA``): the gray value in all three channels;
* palette (``P``, with or without transparency): the palette colours;
* alpha (``RGBA``, ``LA``, ``PA``, a palette's transparency): dropped; the colour stored
  under a transparent pixel is kept as is;
* 16 bits per channel (``I;16`` / ``I`` grayscale PNGs, 48/64-bit RGB(A) PNGs):
  ``round(v * 255 / 65535)``, i.e. full scale to full scale, not clipped at 255.

A file that neither library can decode (empty, truncated, not an image) raises
:class:`UnreadableImage`, which names it; callers turn it into one line for the user.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

# PIL's mode names, as the warning about converted files spells them
MODE_NAMES = {
    "1": "1-bit", "L": "grayscale (L)", "LA": "grayscale + alpha (LA)", "P": "palette (P)",
    "PA": "palette + alpha (PA)", "RGBA": "RGB + alpha (RGBA)", "CMYK": "CMYK",
    "I;16": "16-bit grayscale (I;16)", "I": "16-bit grayscale (I)", "16-bit": "16 bits per channel",
}
_FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTH_AT = 24  # signature (8), IHDR length and type (8), width and height (8), then the bit depth


class UnreadableImage(UserError):
    """An image file that cannot be decoded (empty, truncated, not an image)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot decode image {path} ({reason}): replace or delete it")
        self.path, self.reason = str(path), reason

    def __reduce__(self) -> tuple:  # pickled with its own arguments (it may cross a process boundary)
        return type(self), (self.path, self.reason)


def _tv_reason(error: Exception) -> str:
    """torchvision's message without its C++ source location ("decode_jpeg, .../decode_jpeg.cpp:171, ...")."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "Unsupported image file" in text:  # its advice names Python functions: say what the file is
        return "its content is not a JPEG, PNG, WebP or GIF image, whatever its name"
    match = re.search(r"\.cpp:\d+, (.*)", text)
    return match.group(1) if match else text


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 as is; uint16 scaled full range to full range, rounded to nearest (65535 -> 255, 32896 -> 128)."""
    if pixels.dtype == torch.uint8:
        return pixels
    if pixels.dtype == torch.uint16:
        wide = pixels.to(torch.int32)
        return ((wide * 2 + 257) // 514).to(torch.uint8)  # round(v / 257) in integers; no ties (257 is odd)
    raise ValueError(f"unexpected pixel type {pixels.dtype}")


def _decode_with_pil(data: bytes) -> torch.Tensor:
    """PIL's decode for the formats torchvision does not read: [3, H, W], uint16 for 16-bit grayscale."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            gray = np.asarray(image, dtype=np.int64)
            if gray.size and (gray.min() < 0 or gray.max() > 65535):
                raise ValueError("32-bit integer pixels outside the 16-bit range")
            return torch.from_numpy(gray.astype(np.uint16))[None].expand(3, -1, -1).contiguous()
        if image.mode == "F":
            raise ValueError("floating-point pixels have no defined 8-bit scale")
        rgb = (image.convert("RGBA") if image.mode in ("P", "PA") else image).convert("RGB")
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_bytes(path: Path | str) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (writable: torch.frombuffer would warn on read-only bytes)."""
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


def _decode(path: Path | str) -> torch.Tensor:
    """[3, H, W] RGB at the file's own depth (uint8, or uint16 for 16-bit files)."""
    from torchvision.io import ImageReadMode, decode_image  # lazy: torchvision costs seconds to import

    try:
        data = read_bytes(path)
    except OSError as e:
        raise UnreadableImage(path, e.strerror or str(e)) from None
    if data.numel() == 0:
        raise UnreadableImage(path, "the file is empty")
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        reason = _tv_reason(e)
    try:  # a format torchvision does not read (a BMP named .jpg, ...)
        return _decode_with_pil(data.numpy().tobytes())
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files; torchvision's reason is the one shown
        raise UnreadableImage(path, reason) from None


def decode_rgb(path: Path | str) -> torch.Tensor:
    """The image at ``path`` as uint8 RGB [3, H, W] (the conversions of the module docstring)."""
    return _to_uint8(_decode(path))


def decode_and_describe(path: Path | str) -> tuple[torch.Tensor, str | None]:
    """:func:`decode_rgb` and what it converted (:func:`describe`)."""
    return decode_rgb(path), describe(path)


def describe(path: Path | str) -> str | None:
    """What reading ``path`` converts, from its header: parts joined by ", " (keys of :data:`MODE_NAMES`).

    None for a plain 8-bit RGB file named for its format. A format that the file's suffix
    does not name (a PNG named ``.JPEG``) is a note too, so the user hears of it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode, fmt = image.mode, image.format
        with open(path, "rb") as f:
            head = f.read(_PNG_DEPTH_AT + 1)
    except (OSError, UnidentifiedImageError, ValueError):
        return None  # decoded all the same (torchvision reads formats PIL does not); nothing more to say
    notes = []
    if fmt in _FORMAT_SUFFIXES and Path(path).suffix.lower() not in _FORMAT_SUFFIXES[fmt]:
        notes.append(f"{fmt} named {Path(path).suffix}")
    if mode != "RGB":
        notes.append(mode)
    elif head[:8] == _PNG_SIGNATURE and len(head) > _PNG_DEPTH_AT and head[_PNG_DEPTH_AT] == 16:
        notes.append("16-bit")  # PIL opens 48-bit RGB PNGs as plain RGB: the header's bit depth tells
    return ", ".join(notes) or None


class ConversionTally:
    """Counts the files whose mode was converted, for one warning line per load."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})

    def add(self, note: str | None) -> None:
        if note is not None:
            self.counts[note] += 1

    def message(self, total: int, where: str) -> str | None:
        """One line naming each kind of conversion and how many files had it; None when nothing was converted."""
        if not self.counts:
            return None
        parts = []
        for note, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            named = ", ".join(MODE_NAMES.get(n, n) for n in note.split(", "))
            parts.append(f"{count} {named}")
        converted = sum(self.counts.values())
        return (f"{converted} of {total} image files of {where} are not plain 8-bit RGB and were read as 8-bit RGB "
                f"(alpha dropped, gray and palettes expanded, 16 bits scaled to 8; the files are unchanged): "
                f"{'; '.join(parts)}")
