"""Naive float64 references shared by the tests of the 2023-2026 losses, and their precision yardstick.

Everything here works on Python floats and lists with the ``math`` module (no torch kernels), so a
test that compares ``distiller.functional`` with these compares two independent computations.
``rounding_bound`` sizes the tolerance of a half-precision input from its rounding alone.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Vec = list[float]
Mat = list[list[float]]

# unit roundoff of the half-precision formats (round to nearest: half an ulp of 1)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def softmax_ref(v: Sequence[float]) -> Vec:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def kl_ref(p: Sequence[float], q: Sequence[float]) -> float:
    """``KL(p || q) = sum p log(p / q)``, zero-probability entries of p contributing 0."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def argmax_ref(v: Sequence[float]) -> int:
    """The first index of the largest value."""
    best = 0
    for i, x in enumerate(v):
        if x > v[best]:
            best = i
    return best


def kd_sample_ref(zs: Sequence[float], zt: Sequence[float], T: float) -> float:
    """One sample's ``KL(softmax(zt/T) || softmax(zs/T))`` (no T^2)."""
    return kl_ref(softmax_ref([v / T for v in zt]), softmax_ref([v / T for v in zs]))


def dkd_sample_ref(zs: Sequence[float], zt: Sequence[float], label: int, Ts: float, Tt: float) -> tuple[float, float]:
    """One sample's DKD (TCKD, NCKD), no T^2; student at ``Ts``, teacher at ``Tt`` (NormKD uses both).

    NCKD renormalises over the classes other than ``label`` (DKD's -1000 shift gives exactly that).
    """
    ps, pt = softmax_ref([v / Ts for v in zs]), softmax_ref([v / Tt for v in zt])
    others = [c for c in range(len(zs)) if c != label]
    bs = [ps[label], sum(ps[c] for c in others)]
    bt = [pt[label], sum(pt[c] for c in others)]
    qs = softmax_ref([zs[c] / Ts for c in others])
    qt = softmax_ref([zt[c] / Tt for c in others])
    return kl_ref(bt, bs), kl_ref(qt, qs)


def kd_ref(zs: Mat, zt: Mat, T: float) -> float:
    return T * T * sum(kd_sample_ref(a, b, T) for a, b in zip(zs, zt)) / len(zs)


def dkd_ref(zs: Mat, zt: Mat, y: Sequence[int], alpha: float, beta: float, T: float) -> float:
    total = 0.0
    for a, b, label in zip(zs, zt, y):
        tckd, nckd = dkd_sample_ref(a, b, label, T, T)
        total += alpha * tckd + beta * nckd
    return T * T * total / len(zs)


def median_ref(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def solve_ref(a: Mat, b: Vec) -> Vec:
    """``a x = b`` by Gauss-Jordan elimination with partial pivoting."""
    n = len(b)
    m = [list(row) + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def pool_bounds(i: int, size: int, out: int) -> range:
    """Adaptive pooling's cell ``i`` of ``out`` along an axis of ``size``: floor(i size/out) .. ceil((i+1) size/out)."""
    return range(i * size // out, math.ceil((i + 1) * size / out))


def rows(t: torch.Tensor) -> list:
    return t.detach().double().tolist()


def rounding_bound(fn: Callable[..., torch.Tensor], inputs: Sequence[object], rounded: Sequence[int],
                   unit_roundoff: float) -> float:
    """First-order bound on how far ``fn`` moves when the inputs at positions ``rounded`` are rounded
    to a format of ``unit_roundoff``: ``2 u sum_i |d fn / d x_i| |x_i|`` (twice the first-order term,
    which covers the second-order rest for the small u of bf16/fp16). The derivatives are central
    differences of ``fn`` in float64, so teacher inputs that ``fn`` detaches are counted too.
    """
    args = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    total = 0.0
    for k in rounded:
        flat = args[k].view(-1)
        for i in range(flat.numel()):
            x = flat[i].item()
            h = 1e-6 * max(1.0, abs(x))
            flat[i] = x + h
            up = fn(*args).item()
            flat[i] = x - h
            down = fn(*args).item()
            flat[i] = x
            total += abs(up - down) / (2 * h) * abs(x)
    return 2.0 * unit_roundoff * total


def standardize_ref(z: Mat, eps: float = 1e-7) -> Mat:
    """Logit standardisation per row: unbiased std, eps added to it."""
    out = []
    for r in z:
        m = sum(r) / len(r)
        sd = math.sqrt(sum((v - m) ** 2 for v in r) / (len(r) - 1))
        out.append([(v - m) / (sd + eps) for v in r])
    return out
