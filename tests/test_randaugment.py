"""MLKD's strong view on the device (datasets/randaugment.py) against PIL, image by image.

Each of the 14 RandAugment operations and Cutout runs batched on uint8 tensors; the reference
is the PIL operation the authors' pipeline calls (through ``torchvision.transforms.functional``
on PIL images where torchvision wraps it; ``Image.transform`` and ``ImageDraw`` directly for
Shear, Translate and Cutout, whose reference form torchvision does not offer), applied to one
image at a time with the same magnitude. Tolerances, and why:

* look-up operations (AutoContrast, Equalize, Posterize, Solarize, Identity): exact. Integer
  tables, or AutoContrast's table from the same float64 multiply and add as PIL's Python code
  (each correctly rounded by IEEE 754, so every CPU gives the same bits).
* blends (Brightness, Color, Contrast, Sharpness): at most 1 intensity level. Both sides compute
  ``d + f * (x - d)`` in float32 and truncate; a compiler may fuse the multiply-add (FMA) on one
  side only, which moves a result lying within one float32 rounding of an integer across it.
* geometric operations (Rotate, Shear, Translate): exact at every pixel whose source coordinate
  (computed here in float64 from PIL's matrix) is farther than 2^-10 from an integer. PIL walks
  Rotate and Shear in 16.16 fixed point: each coefficient is rounded to within 2^-17 and
  accumulated over at most x + y + 2 <= 64 steps, so its coordinate is within 64 * 2^-17 = 2^-11
  of the exact one; only a pixel whose exact coordinate lies that close to an integer can take
  the neighbouring source pixel (2^-10 leaves a factor 2 of margin).
* Cutout: exact (integer rectangle).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from helpers import generator
from PIL import Image, ImageDraw, ImageOps
from torchvision.transforms import InterpolationMode

from common.errors import UserError
from datasets.augment import crop_and_flip
from datasets.randaugment import CUTOUT_FILL, OPS, RANGES, apply_ops, cutout, draw_params, strong_view
from datasets.views import VIEWS

B, H, W = 12, 32, 32
NEAR = 2.0 ** -10  # geometric: pixels whose source coordinate is this close to an integer may differ


def sample_images(seed_base: int = 0) -> torch.Tensor:
    """Smooth random images (like photos), pure noise, a low-contrast one, a constant one, a two-level one."""
    g = generator(seed_base)
    coarse = torch.rand(B, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)
    images = (smooth * 255).round().clamp(0, 255).to(torch.uint8)
    images[0:3] = torch.randint(0, 256, (3, 3, H, W), generator=g, dtype=torch.uint8)
    images[3] = images[3] // 5 + 90  # narrow histogram: AutoContrast and Equalize stretch it
    images[4] = 77  # constant: AutoContrast and Equalize leave it alone
    images[5] = torch.where(torch.rand(3, H, W, generator=g) < 0.3, 200, 10).to(torch.uint8)  # two levels
    return images


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def reference(name: str, im: Image.Image, v: float) -> Image.Image:
    """The PIL operation of the reference pipeline at magnitude ``v``."""
    w, h = im.size
    ops = {
        "autocontrast": lambda: TF.autocontrast(im),
        "brightness": lambda: TF.adjust_brightness(im, v),
        "color": lambda: TF.adjust_saturation(im, v),
        "contrast": lambda: TF.adjust_contrast(im, v),
        "equalize": lambda: TF.equalize(im),
        "identity": lambda: im,
        "posterize": lambda: TF.posterize(im, int(v)),
        "rotate": lambda: TF.rotate(im, v, interpolation=InterpolationMode.NEAREST),
        "sharpness": lambda: TF.adjust_sharpness(im, v),
        "shear_x": lambda: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "solarize": lambda: ImageOps.solarize(im, v),
        "translate_x": lambda: im.transform(im.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "translate_y": lambda: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h)),
    }
    return ops[name]()


def source_coordinates(name: str, v: float) -> tuple[np.ndarray, np.ndarray]:
    """The exact (float64) source coordinates PIL's inverse map gives each output pixel centre."""
    if name == "rotate":
        phi = -math.radians(v % 360.0)
        a, b = round(math.cos(phi), 15), round(math.sin(phi), 15)
        cx, cy = W / 2, H / 2
        m = (a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy)
    else:
        m = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
             "translate_x": (1, 0, v * W, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v * H)}[name]
    y, x = np.mgrid[0:H, 0:W] + 0.5
    return m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]


def draw_magnitudes(name: str, seed_base: int) -> torch.Tensor:
    """B magnitudes spread over the operation's range, both ends included."""
    lo, hi = RANGES[name]
    u = torch.rand(B, generator=generator(seed_base), dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 1e-9
    return lo + (hi - lo) * u


# --------------------------------------------------------------------------- operations against PIL

@pytest.mark.parametrize("name", OPS)
def test_each_operation_matches_pil(name: str) -> None:
    images = sample_images(1)
    mags = draw_magnitudes(name, 2 + OPS.index(name))
    got = apply_ops(images, torch.full((B,), OPS.index(name)), mags)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    for k in range(B):
        v = float(mags[k])
        want = from_pil(reference(name, to_pil(images[k]), v)).int()
        diff = (got[k].int() - want).abs()
        where = f"{name} image {k} magnitude {v}"
        if name in ("brightness", "color", "contrast", "sharpness"):
            assert diff.max() <= 1, where
        elif name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
            sx, sy = source_coordinates(name, v)
            near = lambda s: np.abs(s - np.round(s)) <= NEAR
            clear = torch.from_numpy(~(near(sx) | near(sy)))
            assert clear.float().mean() > 0.9, where  # the exemption stays small
            assert (diff[:, clear] == 0).all(), where
        else:
            assert (diff == 0).all(), where


def test_operations_change_images_as_expected() -> None:
    """Sanity of the draws' meaning: a large rotation and translation move pixels; posterize keeps high bits."""
    images = sample_images(3)
    rotated = apply_ops(images, torch.full((B,), OPS.index("rotate")), torch.full((B,), 25.0, dtype=torch.float64))
    assert (rotated[:, :, 0, 0] == 0).all()  # a corner comes from outside: PIL's black fill
    posterized = apply_ops(images, torch.full((B,), OPS.index("posterize")), torch.full((B,), 4.9, dtype=torch.float64))
    assert torch.equal(posterized, images & 0xF0)  # int(4.9) = 4 bits


def test_cutout_matches_pil_rectangle() -> None:
    images = sample_images(4)
    g = generator(5)
    side = torch.rand(B, generator=g, dtype=torch.float64) * 16
    cx = W + (1 - W) * torch.rand(B, generator=g, dtype=torch.float64)
    cy = H + (1 - H) * torch.rand(B, generator=g, dtype=torch.float64)
    side[0] = 0.0  # no square
    side[1], cx[1], cy[1] = 15.999, 32.0, 1.0  # clipped at the top-right corner
    side[2], cx[2], cy[2] = 0.3, 10.7, 20.2  # a sub-pixel side still fills one pixel (inclusive rectangle)
    got = cutout(images, side, cx, cy)
    for k in range(B):
        im = to_pil(images[k]).copy()
        v = float(side[k])
        if v > 0:  # the reference's CutoutAbs
            x0, y0 = int(max(0, float(cx[k]) - v / 2)), int(max(0, float(cy[k]) - v / 2))
            ImageDraw.Draw(im).rectangle((x0, y0, min(W, x0 + v), min(H, y0 + v)), CUTOUT_FILL)
        assert torch.equal(got[k], from_pil(im)), k
    assert torch.equal(got[0], images[0])
    assert (got[2] != images[2]).any(dim=0).sum() == 1


# --------------------------------------------------------------------------- the whole view

def test_strong_view_is_the_pil_pipeline_with_the_drawn_parameters() -> None:
    """Crop + flip, two operations, Cutout, per image in PIL with the parameters the view drew."""
    images = sample_images(6)
    out = strong_view(images, generator(7))
    p = draw_params(B, H, W, generator(7))
    padded = np.pad(images.permute(0, 2, 3, 1).numpy(), ((0, 0), (4, 4), (4, 4), (0, 0)))
    agree = 0
    for k in range(B):
        oy, ox = p["offsets"][k].tolist()
        crop = padded[k, oy:oy + H, ox:ox + W]
        im = Image.fromarray(crop[:, ::-1].copy() if p["flips"][k] else crop)
        for slot in range(2):
            im = reference(OPS[int(p["ops"][k, slot])], im, float(p["magnitudes"][k, slot]))
        v = float(p["side"][k])
        if v > 0:
            cx, cy = p["centre"][k].tolist()
            x0, y0 = int(max(0, cx - v / 2)), int(max(0, cy - v / 2))
            im = im.copy()
            ImageDraw.Draw(im).rectangle((x0, y0, min(W, x0 + v), min(H, y0 + v)), CUTOUT_FILL)
        diff = (out[k].int() - from_pil(im).int()).abs()
        assert (diff <= 1).float().mean() >= 0.98, k  # per-operation tolerances above, compounded
        agree += int((diff == 0).all())
    assert agree >= B // 2  # most images agree bit for bit


def test_strong_view_draws_per_sample_and_is_deterministic() -> None:
    images = sample_images(8)
    same = images[:1].expand(B, -1, -1, -1).contiguous()  # one image repeated: every copy differs after the view
    out = strong_view(same, generator(9))
    assert out.dtype == torch.uint8 and out.shape == same.shape and out.device == same.device
    assert len({bytes(x.numpy()) for x in out}) == B
    assert torch.equal(out, strong_view(same, generator(9)))  # the generator alone decides
    assert not torch.equal(out, strong_view(same, generator(10)))
    assert VIEWS.get("strong") is strong_view


def test_parameter_draws_cover_the_ranges() -> None:
    n = 4000
    p = draw_params(n, H, W, generator(11))
    assert set(p["ops"].flatten().tolist()) == set(range(len(OPS)))  # 14 operations, drawn with replacement
    assert (p["ops"][:, 0] == p["ops"][:, 1]).float().mean().item() == pytest.approx(1 / 14, abs=0.02)
    for k, name in enumerate(OPS):
        lo, hi = RANGES[name]
        m = p["magnitudes"][p["ops"] == k]
        assert (m >= lo).all() and (m < hi).all(), name
    bits = p["magnitudes"][p["ops"] == OPS.index("posterize")].floor()
    assert set(bits.tolist()) == {4.0, 5.0, 6.0, 7.0}  # int(uniform(4, 8)) as the reference: 8 never
    assert (p["side"] >= 0).all() and (p["side"] < 16).all() and p["side"].max() > 15
    assert (p["centre"] > 1).all() and (p["centre"] <= W).all()  # np.random.uniform(W): (1, W]
    assert set(p["offsets"].flatten().tolist()) == set(range(9))


def test_strong_view_crop_and_flip_come_first() -> None:
    """With both slots Identity and no Cutout the view is exactly its crop and flip."""
    images = sample_images(12)
    p = draw_params(B, H, W, generator(13))
    x = crop_and_flip(images, p["offsets"], p["flips"], 4)
    for slot in range(2):
        x = apply_ops(x, torch.full((B,), OPS.index("identity")), p["magnitudes"][:, slot])
    assert torch.equal(x, crop_and_flip(images, p["offsets"], p["flips"], 4))


def test_strong_view_needs_rgb() -> None:
    with pytest.raises(UserError, match="RGB"):
        strong_view(torch.zeros(2, 1, H, W, dtype=torch.uint8), generator(0))
