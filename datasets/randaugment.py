"""MLKD's strong view on the device: crop + flip, RandAugment (2 of 14 operations), then Cutout.

Multi-Level Logit Distillation (Jin et al., CVPR 2023) trains on a second, strongly augmented
view of every image. The authors build it with PIL, image by image, in data-loader workers:
their own crop and flip, then RandAugment (two operations drawn uniformly *with replacement*
from the 14 below, each with a magnitude drawn uniformly from its range; the "magnitude 10"
argument is unused), then a Cutout square. Here the same pipeline runs on the uint8 batch where
it lies (the training device), as a handful of batched tensor operations, with no Python loop
over the images: for each of the two RandAugment slots every family of operations is computed
for the whole batch and each image keeps the result of the operation it drew:

* per-pixel look-up tables (AutoContrast, Brightness, Contrast, Equalize, Identity, Posterize,
  Solarize): one 256-entry table per image and channel, applied with one gather;
* Color (blend with the image's grey version) and Sharpness (blend with its 3x3 smoothing);
* the geometric operations (Rotate, ShearX/Y, TranslateX/Y): one inverse affine map per image,
  sampled nearest-neighbour with one gather.

All randomness is drawn on the CPU from the generator the loader gives the view (seeded by seed,
epoch, step and view, so resume rebuilds any step exactly and every rank draws the same values),
then moved to the device in two small transfers (asynchronous, from pinned memory, on CUDA).
Per image: crop offsets and flip, two operation indices, two uniform numbers mapped into the
operations' ranges, the Cutout side and centre.

The reference is the PIL RandAugment + Cutout that the MLKD code base calls: the widely shared
FixMatch-style port whose operation list and ranges METHODS_NEW.md section 4 gives (the
authors' ``mdistiller/dataset/cifar100.py`` was not available to read; the rounding details
below follow that port: ``int()`` of Posterize's bits, ``CutoutAbs``'s centre and rectangle).

Ranges (uniform; the authors' list): Brightness, Color, Contrast, Sharpness factors in
[0.05, 0.95); Posterize ``int(uniform(4, 8))`` bits; Rotate [-30, 30) degrees; ShearX/Y
[-0.3, 0.3); Solarize threshold [0, 256); TranslateX/Y [-0.3, 0.3) of the width / height.
Cutout: side ``uniform(0, 0.5) * W`` px (at most 16 on CIFAR), filled with RGB (125, 123, 114).

What each operation reproduces of the PIL one (Pillow's C code, as ``torchvision.transforms.
functional`` calls it on PIL images), and where it differs (checked in tests/test_randaugment.py):

* Blends (Brightness, Color, Contrast, Sharpness): ``degenerate + f * (image - degenerate)``
  in float32, truncated to uint8, as ``Image.blend``. Brightness' degenerate is black; Color's
  is PIL's grey ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (integer, as ``convert("L")``);
  Contrast's is the grey image's mean rounded half up (``ImageStat``). The blend's float32
  multiply-add can be fused (FMA) by either side's compiler, so a result that lands within one
  float32 rounding of an integer may truncate one level apart: at most 1 intensity level, rarely.
* Sharpness' smoothing is PIL's SMOOTH kernel ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` in float32,
  rounded to the nearest level, the 1-pixel border copied from the image (as ``ImageFilter``).
  PIL sums the nine products in its own order; a sum within float32 rounding of ``k + 0.5``
  may round one level apart before the blend.
* AutoContrast (cutoff 0) and Equalize: PIL's look-up tables, computed from each channel's
  256-bin histogram (integer counts) exactly as ``ImageOps`` does: AutoContrast's
  ``int(i * scale + offset)`` in float64 (``scale`` a true division, not a reciprocal product);
  Equalize's ``step = (N - count of the brightest level) // 255``, its table clipped at 255.
* Posterize and Solarize: exact (``i & mask``; ``i`` if ``i < threshold`` else ``255 - i``).
  Posterize draws ``int(uniform(4, 8))`` bits as the reference code does, so 4-7 bits: 8 (the
  identity) is never drawn.
* Geometric operations: PIL's inverse maps (Rotate about the centre ``(W/2, H/2)`` with its
  cos/sin rounded to 15 decimals, counter-clockwise for a positive angle; Shear and Translate
  about the origin, ``(1, v, 0, 0, 1, 0)``, ``(1, 0, v*W, 0, 1, 0)`` etc.), evaluated at pixel
  centres in float64 and floored: nearest-neighbour, out-of-image pixels filled with 0 (black,
  PIL's default fill, which the reference keeps). PIL evaluates Rotate and Shear in 16.16 fixed
  point, so a pixel whose exact source coordinate lies within 2^-11 of an integer may take its
  neighbour's value (about 1 pixel in 10,000 for random angles); all other pixels agree.
* Cutout: as the reference's ``CutoutAbs``: centre ``np.random.uniform(W)``, which (arguments
  being ``low=W, high=1``) is uniform on (1, W]; corner ``x0 = int(max(0, cx - v/2))``,
  ``x1 = min(W, x0 + v)``; ``ImageDraw.rectangle`` fills columns ``x0 .. int(x1)`` inclusive
  (clipped to the image), rows likewise; nothing when the side is 0.
* Crop and flip: :func:`datasets.augment.crop_and_flip` (zero padding 4 at 32 x 32, as the weak view).
* Randomness: drawn from the given torch generator, not from Python's ``random`` and NumPy's
  global state as the reference's workers do; the distributions are the same, the numbers not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.errors import UserError
from datasets.augment import crop_and_flip, padding_for
from datasets.views import VIEWS

# The 14 operations of MLKD's RandAugment, in the authors' order, with their magnitude ranges.
OPS: tuple[str, ...] = (
    "autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
    "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y",
)
RANGES: dict[str, tuple[float, float]] = {
    "autocontrast": (0.0, 1.0), "brightness": (0.05, 0.95), "color": (0.05, 0.95),
    "contrast": (0.05, 0.95), "equalize": (0.0, 1.0), "identity": (0.0, 1.0), "posterize": (4.0, 8.0),
    "rotate": (-30.0, 30.0), "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
    "solarize": (0.0, 256.0), "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}
NUM_OPS = 2  # operations per image (drawn with replacement)
CUTOUT_MAX = 0.5  # Cutout side: uniform in [0, CUTOUT_MAX) times the image width
CUTOUT_FILL = (125, 123, 114)
SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, divisor 13

_ID = {name: k for k, name in enumerate(OPS)}
_LUT_OPS = ("autocontrast", "brightness", "contrast", "equalize", "identity", "posterize", "solarize")
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def magnitudes(ops: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each operation's magnitude ``lo + (hi - lo) * u`` (float64) from its index and a uniform draw."""
    lo = torch.tensor([RANGES[name][0] for name in OPS], dtype=torch.float64)
    hi = torch.tensor([RANGES[name][1] for name in OPS], dtype=torch.float64)
    return lo[ops] + (hi[ops] - lo[ops]) * uniform


# --------------------------------------------------------------------------- look-up tables

def _grey(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` in integers, [B, 1, H, W] int32."""
    x = images.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) >> 16


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)``: float32 ``d + f * (x - d)``, clipped, truncated."""
    d = degenerate.to(torch.float32)
    out = d + factor * (image.to(torch.float32) - d)
    return out.clamp_(0.0, 255.0).trunc_()


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and channel: min, max and ``below[v]`` = the number of pixels < v for v in 0..256."""
    b, c = images.shape[:2]
    flat = images.reshape(b, c, -1)
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(2, flat.long(), torch.ones_like(flat, dtype=torch.int64))  # integer counts: exact
    below = F.pad(hist.cumsum(2), (1, 0))  # [B, C, 257]
    return flat.amin(2), flat.amax(2), below


def _luts(images: torch.Tensor, ops: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """The 256-entry table of each image's look-up operation (identity for the other operations), [B, C, 256]."""
    b, c, h, w = images.shape
    dev = images.device
    i64 = torch.arange(256, device=dev, dtype=torch.float64)
    i32 = i64.float()
    f = mag.float()[:, None, None]
    lo, hi, below = _channel_stats(images)
    lut = i64.expand(b, c, 256)
    # AutoContrast: PIL's scale = 255 / (hi - lo), offset = -lo * scale, int() in double precision
    span = (hi - lo).to(torch.float64)[..., None]
    # tensor / tensor: a Python numerator (255.0 / span) is computed as 255 * (1 / span), another rounding
    scale = torch.full_like(span, 255.0) / span.clamp(min=1.0)
    auto = torch.trunc(i64 * scale + (-lo.to(torch.float64)[..., None] * scale)).clamp(0, 255)
    auto = torch.where(span > 0, auto, i64)
    # Equalize: step = (N - count of the brightest present level) // 255; lut[i] = (step // 2 + N_<i) // step
    n = h * w
    count_hi = n - below.gather(2, hi.long()[..., None]).squeeze(2)  # pixels equal to the max level
    step = ((n - count_hi) // 255)[..., None]
    equal = torch.div(step // 2 + below[..., :256], step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    equal = torch.where((step > 0) & (span > 0), equal.to(torch.float64), i64)
    # Contrast: the grey image's mean, rounded half up, is the degenerate image
    # int(mean + 0.5) in integers: floor((2 * sum + n) / (2 n)), no float division to round differently
    mean = torch.div(2 * _grey(images).sum(dim=(1, 2, 3)) + n, 2 * n, rounding_mode="floor").float()[:, None, None]
    bits = mag.floor().clamp(1, 8).long()
    keep = ((0xFF << (8 - bits)) & 0xFF)[:, None, None]
    candidates = {
        "autocontrast": auto,
        "brightness": (f * i32).clamp(0, 255).trunc().double(),
        "contrast": (mean + f * (i32 - mean)).clamp(0, 255).trunc().double(),
        "equalize": equal,
        "posterize": (i64.long() & keep).double(),
        "solarize": torch.where(i64 < mag[:, None, None], i64, 255.0 - i64),
    }
    for name, table in candidates.items():
        lut = torch.where((ops == _ID[name])[:, None, None], table, lut)
    return lut.to(torch.uint8)


# --------------------------------------------------------------------------- the operations

def _f32_div(a: float, b: float) -> float:
    """``a / b`` rounded to float32, as PIL's C code divides its float kernel by the divisor."""
    return float(torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA from pinned memory, asynchronously (no wait for the queued work)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter: the 3x3 kernel / 13 in float32, rounded; the 1-pixel border copied."""
    c = images.shape[1]
    kernel = torch.empty(c, 1, 3, 3, dtype=torch.float32, device=images.device)
    for i, row in enumerate(SMOOTH):  # float32 k / 13 divided here, in Python: no copy, no reciprocal rounding
        for j, k in enumerate(row):
            kernel[:, :, i, j] = _f32_div(k, 13.0)
    x = images.to(torch.float32)
    inner = F.conv2d(x, kernel, groups=c)  # [B, C, H-2, W-2]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner.add_(0.5).floor_().clamp_(0, 255)
    return out


def _affine_matrices(ops: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's inverse affine map ``(a, b, c, d, e, f)`` of each image's geometric operation (identity otherwise)."""
    one, zero = torch.ones_like(mag), torch.zeros_like(mag)
    mats = torch.stack([one, zero, zero, zero, one, zero], dim=1)
    # Rotate: Image.rotate's matrix about (w/2, h/2), cos/sin rounded to 15 decimals
    phi = -torch.deg2rad(torch.remainder(mag, 360.0))
    cos = torch.round(torch.cos(phi), decimals=15)
    sin = torch.round(torch.sin(phi), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    rotate = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], dim=1)
    per_op = {
        "rotate": rotate,
        "shear_x": torch.stack([one, mag, zero, zero, one, zero], dim=1),
        "shear_y": torch.stack([one, zero, zero, mag, one, zero], dim=1),
        "translate_x": torch.stack([one, zero, mag * w, zero, one, zero], dim=1),
        "translate_y": torch.stack([one, zero, zero, zero, one, mag * h], dim=1),
    }
    for name, m in per_op.items():
        mats = torch.where((ops == _ID[name])[:, None], m, mats)
    return mats


def _warp(images: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour ``Image.transform(AFFINE)``: source ``floor(M (x + .5, y + .5, 1))``, 0 outside."""
    b, c, h, w = images.shape
    dev = images.device
    xs = torch.arange(w, device=dev, dtype=torch.float64) + 0.5
    ys = torch.arange(h, device=dev, dtype=torch.float64) + 0.5
    m = mats[:, :, None, None]
    sx = torch.floor(m[:, 0] * xs + m[:, 1] * ys[:, None] + m[:, 2])  # [B, H, W]
    sy = torch.floor(m[:, 3] * xs + m[:, 4] * ys[:, None] + m[:, 5])
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    idx = torch.where(inside, sy * w + sx, torch.zeros_like(sx)).long().view(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(images.reshape(b, c, h * w), 2, idx).view(b, c, h, w)
    return torch.where(inside[:, None], out, torch.zeros_like(out))


def apply_ops(images: torch.Tensor, ops: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """One RandAugment slot: image k gets operation ``OPS[ops[k]]`` at magnitude ``mag[k]`` (uint8 in and out).

    ``ops`` (int64) and ``mag`` (float64, in the operation's own units: factor, bits, degrees,
    shear, threshold, fraction of the size) are [B] tensors on the images' device.
    """
    b, c, h, w = images.shape

    def sel(names: tuple[str, ...]) -> torch.Tensor:  # [B, 1, 1, 1]: the images whose operation is one of names
        hit = ops == _ID[names[0]]
        for name in names[1:]:
            hit = hit | (ops == _ID[name])
        return hit[:, None, None, None]

    f = mag.float()[:, None, None, None]
    luts = _luts(images, ops, mag)
    looked_up = torch.gather(luts, 2, images.reshape(b, c, h * w).long()).view(b, c, h, w)
    color = _blend(_grey(images), images, f)
    sharp = _blend(_smooth(images), images, f)
    warped = _warp(images, _affine_matrices(ops, mag, h, w))
    out = torch.where(sel(("color",)), color, sharp).to(torch.uint8)
    out = torch.where(sel(_GEOMETRIC), warped, out)
    return torch.where(sel(_LUT_OPS), looked_up, out)


def cutout(images: torch.Tensor, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
           fill: tuple[int, ...] = CUTOUT_FILL) -> torch.Tensor:
    """The reference's ``CutoutAbs``: a square of ``side`` px at centre (cx, cy), PIL-rectangle rounding.

    ``x0 = int(max(0, cx - side/2))``, ``x1 = min(W, x0 + side)``, columns ``x0 .. int(x1)`` inclusive
    (clipped to the image); rows likewise; no square where ``side`` is 0. All arguments [B] float64.
    """
    b, c, h, w = images.shape
    dev = images.device
    x0 = torch.floor(torch.clamp(cx - side / 2.0, min=0.0))
    y0 = torch.floor(torch.clamp(cy - side / 2.0, min=0.0))
    x1 = torch.floor(torch.clamp(x0 + side, max=float(w)))
    y1 = torch.floor(torch.clamp(y0 + side, max=float(h)))
    cols = torch.arange(w, device=dev, dtype=torch.float64)
    rows = torch.arange(h, device=dev, dtype=torch.float64)
    in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])  # [B, W]
    in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])  # [B, H]
    mask = (in_y[:, :, None] & in_x[:, None, :] & (side > 0)[:, None, None])[:, None]  # [B, 1, H, W]
    colour = torch.empty(1, c, 1, 1, dtype=images.dtype, device=dev)
    for k, value in enumerate(fill):  # filled in place: no host-to-device copy
        colour[:, k] = value
    return torch.where(mask, colour, images)


def draw_params(b: int, h: int, w: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random number of a batch's strong view, drawn on the CPU from ``gen`` in a fixed order."""
    offsets = torch.randint(0, 2 * padding_for(h, w) + 1, (b, 2), generator=gen)
    flips = torch.rand(b, generator=gen) < 0.5
    ops = torch.randint(0, len(OPS), (b, NUM_OPS), generator=gen)
    uniform = torch.rand(b, NUM_OPS, generator=gen, dtype=torch.float64)
    side = torch.rand(b, generator=gen, dtype=torch.float64) * CUTOUT_MAX * w
    u = torch.rand(b, 2, generator=gen, dtype=torch.float64)
    # np.random.uniform(W) in the reference: low=W, high=1, i.e. W + (1 - W) * u, on (1, W]
    centre = torch.stack([w + (1.0 - w) * u[:, 0], h + (1.0 - h) * u[:, 1]], dim=1)
    return {"offsets": offsets, "flips": flips, "ops": ops, "magnitudes": magnitudes(ops, uniform),
            "side": side, "centre": centre}


@VIEWS.register("strong")
def strong_view(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MLKD's strong view of a uint8 batch: its own crop + flip, RandAugment (2 ops), Cutout; uint8, same device."""
    b, c, h, w = images.shape
    if c != len(CUTOUT_FILL):
        raise UserError(f"the 'strong' view (RandAugment + Cutout) needs RGB images, got {c} channel(s); "
                        f"use an RGB data set or a method without the strong view")
    p = draw_params(b, h, w, gen)
    # one transfer of the floating-point parameters, one of the integer ones
    reals = _to_device(torch.cat([p["magnitudes"], p["side"][:, None], p["centre"]], dim=1), images.device)
    ints = _to_device(torch.cat([p["offsets"], p["flips"].long()[:, None], p["ops"]], dim=1), images.device)
    x = crop_and_flip(images, ints[:, 0:2], ints[:, 2].bool(), padding_for(h, w))
    for k in range(NUM_OPS):
        x = apply_ops(x, ints[:, 3 + k], reals[:, k])
    return cutout(x, reals[:, NUM_OPS], reals[:, NUM_OPS + 1], reals[:, NUM_OPS + 2])


__all__ = ["OPS", "RANGES", "apply_ops", "cutout", "draw_params", "magnitudes", "strong_view"]
