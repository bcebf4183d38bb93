"""The 2023-2026 feature losses of distiller.functional (docs/METHODS_2025_FEATURE.md) against independent
computations: SDD (region logits and SD-KD / SD-DKD / SD-NKD), CAT-KD and WKD-F.

References are Python loops over float64 values (``naive_refs``), pooling included (adaptive-pooling
cell bounds written out), from the document's math; derivatives by finite differences (``gradcheck``
in float64). Half-precision inputs are compared as in ``test_functional_logit_methods``: with the
float64 value on the rounded inputs (float32 arithmetic only) and on the unrounded ones, within a
first-order bound of the rounding. Teacher region logits there sit on a grid of quarters (exact in
bf16 and fp16), so the teacher's argmax, and with it SDD's region weights, cannot move.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from float64_data import D, close, labels, quarters, rnd
from helpers import signature_line
from naive_refs import (
    UNIT_ROUNDOFF,
    argmax_ref,
    dkd_ref,
    dkd_sample_ref,
    kd_ref,
    kd_sample_ref,
    pool_bounds,
    rounding_bound,
    rows,
    softmax_ref,
)

import distiller.functional as KF
from common.errors import UserError


def pool_ref(m, out: int):
    """Adaptive average pooling of one [H][W] map to out x out."""
    h, w = len(m), len(m[0])
    return [[sum(m[a][b] for a in pool_bounds(i, h, out) for b in pool_bounds(j, w, out))
             / (len(pool_bounds(i, h, out)) * len(pool_bounds(j, w, out)))
             for j in range(out)] for i in range(out)]


# --------------------------------------------------------------------------- SDD: region logits

def region_logits_ref(feature, weight, bias, scales):
    """[B][C][N]: pool each channel to 4x4, the coarser grids from that 4x4, flatten row-major, classify."""
    out = []
    for fmap in feature:
        p4 = [pool_ref(ch, 4) for ch in fmap]
        cells = [[] for _ in fmap]
        for s in scales:
            for d, ch in enumerate(p4):
                grid = ch if s == 4 else pool_ref(ch, s)
                cells[d] += [v for r in grid for v in r]
        n = len(cells[0])
        out.append([[sum(wc[d] * cells[d][k] for d in range(len(fmap))) + (bias[c] if bias else 0.0)
                     for k in range(n)] for c, wc in enumerate(weight)])
    return out


@pytest.mark.parametrize("size", [8, 4, 6])
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2), (1,), (1, 4)])
def test_sdd_region_logits_match_loop(size: int, scales: tuple[int, ...]) -> None:
    a, w, b = rnd(2, 3, size, size, seed=10), rnd(5, 3, seed=11), rnd(5, seed=12)
    got = KF.sdd_region_logits(a, w, b, scales)
    assert got.shape == (2, 5, sum(s * s for s in scales))
    torch.testing.assert_close(got, torch.tensor(region_logits_ref(rows(a), rows(w), rows(b), scales), dtype=D),
                               rtol=1e-12, atol=1e-12)
    no_bias = KF.sdd_region_logits(a, w, scales=scales)
    torch.testing.assert_close(no_bias, torch.tensor(region_logits_ref(rows(a), rows(w), None, scales), dtype=D),
                               rtol=1e-12, atol=1e-12)


def test_sdd_region_zero_is_the_models_logits_and_defaults() -> None:
    a, w, b = rnd(2, 3, 8, 8, seed=13), rnd(5, 3, seed=14), rnd(5, seed=15)
    got = KF.sdd_region_logits(a, w, b)
    assert got.shape == (2, 5, 21)
    pooled = [[sum(v for r in ch for v in r) / 64 for ch in fmap] for fmap in rows(a)]  # global average pool
    logits = [[sum(wc[d] * e[d] for d in range(3)) + bc for wc, bc in zip(rows(w), rows(b))] for e in pooled]
    torch.testing.assert_close(got[:, :, 0], torch.tensor(logits, dtype=D), rtol=1e-12, atol=1e-12)


def test_sdd_coarse_grids_come_from_the_4x4_map() -> None:
    """On a 6x6 map the 2x2 cells pooled from the 4x4 grid differ from pooling the map directly."""
    a, w = rnd(1, 2, 6, 6, seed=16), torch.eye(2, dtype=D)
    got = KF.sdd_region_logits(a, w, scales=(1, 2))
    direct = nnf.adaptive_avg_pool2d(a, 2).flatten(2)
    assert (got[:, :, 1:] - direct).abs().max() > 1e-3


@pytest.mark.parametrize("scales", [(2, 4), (1, 4, 2), (1, 3), (1, 1, 2), ()])
def test_sdd_region_logits_reject_bad_scales(scales: tuple[int, ...]) -> None:
    with pytest.raises(UserError, match="scales"):
        KF.sdd_region_logits(rnd(1, 2, 4, 4, seed=17), rnd(3, 2, seed=18), scales=scales)


# --------------------------------------------------------------------------- SDD: losses

def column(z, b: int, n: int) -> list[float]:
    return [z[b][c][n] for c in range(len(z[b]))]


def sdd_weights_ref(zt, y) -> list[list[float]]:
    out = []
    for b, label in enumerate(y):
        right = [argmax_ref(column(zt, b, n)) == label for n in range(len(zt[b][0]))]
        out.append([1.0 if n == 0 or right[n] == right[0] else 2.0 for n in range(len(right))])
    return out


def sdd_ref(per_region, zs, zt, y) -> float:
    w = sdd_weights_ref(zt, y)
    total = count = 0.0
    for b, label in enumerate(y):
        for n in range(len(w[b])):
            total += w[b][n] * per_region(column(zs, b, n), column(zt, b, n), label)
            count += 1
    return total / count


def sdd_kd_term(T: float):
    return lambda s, t, label: T * T * kd_sample_ref(s, t, T)


def sdd_dkd_term(alpha: float, beta: float, T: float):
    def term(s, t, label):
        tckd, nckd = dkd_sample_ref(s, t, label, T, T)
        return T * T * (alpha * tckd + beta * nckd)
    return term


def sdd_nkd_term(T: float, gamma: float):
    def term(s, t, label):
        target = -softmax_ref(t)[label] * math.log(softmax_ref(s)[label])
        pt, ps = softmax_ref([v / T for v in t]), softmax_ref([v / T for v in s])
        return target - gamma * T * T * sum(a * math.log(b) for a, b in zip(pt, ps))  # all C classes
    return term


def sdd_inputs(seed: int, n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region logits [3, 6, n] with both kinds of complementary region (weight 2)."""
    zs, zt, y = rnd(3, 6, n, seed=seed, scale=3), quarters(3, 6, n, seed=seed + 1), labels(3, 6, seed=seed + 2)
    y[0] = zt[0, :, 0].argmax()  # global right ...
    zt[0, y[0], 1] = zt[0, :, 1].min() - 1  # ... region 1 wrong
    y[1] = (zt[1, :, 0].argmax() + 1) % 6  # global wrong ...
    zt[1, y[1], 2] = zt[1, :, 2].max() + 1  # ... region 2 right
    return zs, zt, y


def test_sdd_inputs_hold_complementary_regions() -> None:
    zs, zt, y = sdd_inputs(20)
    w = sdd_weights_ref(rows(zt), y.tolist())
    assert w[0][1] == 2.0 and w[1][2] == 2.0 and all(r[0] == 1.0 for r in w)


@pytest.mark.parametrize("T", [4.0, 2.0])
def test_sdd_kd_matches_loop(T: float) -> None:
    zs, zt, y = sdd_inputs(21)
    close(KF.sdd_kd(zs, zt, y, T), sdd_ref(sdd_kd_term(T), rows(zs), rows(zt), y.tolist()))
    close(KF.sdd_kd(zs, zt, y), sdd_ref(sdd_kd_term(4.0), rows(zs), rows(zt), y.tolist()))


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 2.0, 2.0)])
def test_sdd_dkd_matches_loop(alpha: float, beta: float, T: float) -> None:
    zs, zt, y = sdd_inputs(22)
    close(KF.sdd_dkd(zs, zt, y, alpha, beta, T), sdd_ref(sdd_dkd_term(alpha, beta, T), rows(zs), rows(zt), y.tolist()))
    close(KF.sdd_dkd(zs, zt, y), sdd_ref(sdd_dkd_term(1.0, 8.0, 4.0), rows(zs), rows(zt), y.tolist()))


@pytest.mark.parametrize("T,gamma", [(4.0, 8.0), (1.0, 2.0)])
def test_sdd_nkd_matches_loop(T: float, gamma: float) -> None:
    zs, zt, y = sdd_inputs(23)
    close(KF.sdd_nkd(zs, zt, y, T, gamma), sdd_ref(sdd_nkd_term(T, gamma), rows(zs), rows(zt), y.tolist()))
    close(KF.sdd_nkd(zs, zt, y), sdd_ref(sdd_nkd_term(4.0, 8.0), rows(zs), rows(zt), y.tolist()))


def test_sdd_with_one_region_is_the_plain_loss() -> None:
    """scales=(1,): the weighted formula is KD / DKD on the model logits."""
    zs, zt, y = rnd(4, 6, seed=24, scale=3), rnd(4, 6, seed=25, scale=3), labels(4, 6, seed=26)
    close(KF.sdd_kd(zs.unsqueeze(2), zt.unsqueeze(2), y, 3.0), kd_ref(rows(zs), rows(zt), 3.0))
    close(KF.sdd_dkd(zs.unsqueeze(2), zt.unsqueeze(2), y, 1.0, 6.0, 3.0),
          dkd_ref(rows(zs), rows(zt), y.tolist(), 1.0, 6.0, 3.0))


def test_sdd_nkd_is_a_cross_entropy_over_all_classes() -> None:
    """At the teacher the value is the teacher's entropies, label column included, not 0."""
    zt, y, T, gamma = rnd(2, 5, 1, seed=27, scale=2), labels(2, 5, seed=28), 2.0, 3.0
    want = 0.0
    for b, label in enumerate(y.tolist()):
        p, pT = softmax_ref(column(rows(zt), b, 0)), softmax_ref([v / T for v in column(rows(zt), b, 0)])
        want += -p[label] * math.log(p[label]) - gamma * T * T * sum(q * math.log(q) for q in pT)
    close(KF.sdd_nkd(zt, zt, y, T, gamma), want / 2)


def test_sdd_gradient_reaches_the_students_classifier() -> None:
    a_s, a_t = rnd(2, 3, 4, 4, seed=29), rnd(2, 4, 4, 4, seed=30)
    w_t, b_t, y = rnd(5, 4, seed=31), rnd(5, seed=32), labels(2, 5, seed=33)
    z_t = KF.sdd_region_logits(a_t, w_t, b_t, (1, 2))

    def loss(w_s: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
        return KF.sdd_dkd(KF.sdd_region_logits(a_s, w_s, b_s, (1, 2)), z_t, y, 1.0, 2.0, 2.0)

    w_s, b_s = rnd(5, 3, seed=34).requires_grad_(), rnd(5, seed=35).requires_grad_()
    assert torch.autograd.gradcheck(loss, (w_s, b_s))


# --------------------------------------------------------------------------- CAT-KD

def cam_ref(feature, weight):
    return [[[[sum(weight[c][d] * fmap[d][i][j] for d in range(len(fmap))) for j in range(len(fmap[0][0]))]
              for i in range(len(fmap[0]))] for c in range(len(weight))] for fmap in feature]


def cat_kd_ref(cs, ct, r: int, normalize: bool) -> float:
    total = count = 0.0
    for ms, mt in zip(cs, ct):
        for a, b in zip(ms, mt):
            pa = [v for row in pool_ref(a, r) for v in row]
            pb = [v for row in pool_ref(b, r) for v in row]
            if normalize:
                na, nb = max(math.sqrt(sum(v * v for v in pa)), 1e-12), max(math.sqrt(sum(v * v for v in pb)), 1e-12)
                pa, pb = [v / na for v in pa], [v / nb for v in pb]
            total += sum((x - y) ** 2 for x, y in zip(pa, pb))
            count += len(pa)
    return total / count


def test_class_activation_maps_match_loop_and_average_to_the_bias_free_logit() -> None:
    a, w = rnd(2, 3, 4, 5, seed=40), rnd(4, 3, seed=41)
    got = KF.class_activation_maps(a, w)
    assert got.shape == (2, 4, 4, 5)
    torch.testing.assert_close(got, torch.tensor(cam_ref(rows(a), rows(w)), dtype=D), rtol=1e-12, atol=1e-12)
    pooled = [[sum(v for r in ch for v in r) / 20 for ch in fmap] for fmap in rows(a)]
    logits = [[sum(wc[d] * e[d] for d in range(3)) for wc in rows(w)] for e in pooled]
    torch.testing.assert_close(got.mean(dim=(2, 3)), torch.tensor(logits, dtype=D), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size_s,size_t,r,normalize", [(4, 4, 2, False), (8, 4, 4, True), (6, 4, 4, True),
                                                       (8, 8, 2, True), (6, 8, 4, False)])
def test_cat_kd_matches_loop(size_s: int, size_t: int, r: int, normalize: bool) -> None:
    cs, ct = rnd(2, 3, size_s, size_s, seed=42), rnd(2, 3, size_t, size_t, seed=43)
    close(KF.cat_kd(cs, ct, r, normalize), cat_kd_ref(rows(cs), rows(ct), r, normalize))
    close(KF.cat_kd(cs, ct), cat_kd_ref(rows(cs), rows(ct), 2, False))


def test_cat_kd_zero_map_normalises_to_zero_not_nan() -> None:
    cs, ct = rnd(1, 2, 4, 4, seed=44), rnd(1, 2, 4, 4, seed=45)
    ct[0, 1] = 0.0
    got = KF.cat_kd(cs, ct, 2, True)
    assert torch.isfinite(got)
    close(got, cat_kd_ref(rows(cs), rows(ct), 2, True))
    with pytest.raises(UserError, match="resolution"):
        KF.cat_kd(cs, ct, 0)


# --------------------------------------------------------------------------- WKD-F

def wkd_feature_ref(fs, ft, ratio: float, grid: int, eps: float) -> float:
    mean_sq = cov_sq = 0.0
    for ms, mt in zip(fs, ft):
        for a, b in zip(ms, mt):
            for i in range(grid):
                for j in range(grid):
                    cell = [(x, y) for x in pool_bounds(i, len(a), grid) for y in pool_bounds(j, len(a[0]), grid)]
                    va, vb = [a[x][y] for x, y in cell], [b[x][y] for x, y in cell]
                    mu_a, mu_b = sum(va) / len(va), sum(vb) / len(vb)
                    sd_a = math.sqrt(sum((v - mu_a) ** 2 for v in va) / (len(va) - 1) + eps)
                    sd_b = math.sqrt(sum((v - mu_b) ** 2 for v in vb) / (len(vb) - 1) + eps)
                    mean_sq += (mu_a - mu_b) ** 2
                    cov_sq += (sd_a - sd_b) ** 2
    n = len(fs) * grid * grid
    return ratio * mean_sq / n + cov_sq / n


@pytest.mark.parametrize("size,ratio,grid,eps", [(8, 4.0, 1, 1e-5), (8, 3.0, 4, 1e-5), (6, 3.0, 4, 1e-5),
                                                  (6, 2.0, 2, 1e-2)])
def test_wkd_feature_matches_loop(size: int, ratio: float, grid: int, eps: float) -> None:
    fs, ft = rnd(2, 3, size, size, seed=50), rnd(2, 3, size, size, seed=51, scale=2) + 0.5
    close(KF.wkd_feature(fs, ft, ratio, grid, eps), wkd_feature_ref(rows(fs), rows(ft), ratio, grid, eps))
    close(KF.wkd_feature(fs, ft), wkd_feature_ref(rows(fs), rows(ft), 4.0, 1, 1e-5))


def test_wkd_feature_hand_values_and_pinned_edges() -> None:
    ft = rnd(2, 3, 4, 4, seed=52)
    assert KF.wkd_feature(ft, ft, grid=2).item() == 0.0
    # a constant shift moves every mean by c and no sigma: ratio * channels * c^2 (the batch averages out)
    close(KF.wkd_feature(ft + 0.5, ft, 4.0, 1), 4.0 * 3 * 0.25)
    assert torch.isnan(KF.wkd_feature(rnd(1, 2, 4, 4, seed=53), ft[:1, :2], grid=4))  # 1-pixel cells: 0 / 0
    with pytest.raises(UserError, match="grid"):
        KF.wkd_feature(ft, ft, grid=0)


# --------------------------------------------------------------------------- gradients

def _feature_losses() -> dict:
    y = labels(2, 4, seed=60)
    zt = quarters(2, 4, 5, seed=61)
    cam_t = rnd(2, 4, 4, 4, seed=62)
    f_t = rnd(2, 3, 4, 4, seed=63)
    return {  # name: (loss of the student tensor, the student tensor's shape)
        "sdd_kd": (lambda z: KF.sdd_kd(z, zt, y, 2.0), (2, 4, 5)),
        "sdd_dkd": (lambda z: KF.sdd_dkd(z, zt, y, 1.0, 2.0, 2.0), (2, 4, 5)),
        "sdd_nkd": (lambda z: KF.sdd_nkd(z, zt, y, 2.0, 2.0), (2, 4, 5)),
        "cat_kd": (lambda c: KF.cat_kd(c, cam_t, 2, False), (2, 4, 6, 6)),
        "cat_kd_normalize": (lambda c: KF.cat_kd(c, cam_t, 2, True), (2, 4, 6, 6)),
        "wkd_feature": (lambda f: KF.wkd_feature(f, f_t, 3.0, 2), (2, 3, 4, 4)),
        "wkd_feature_overlap": (lambda f: KF.wkd_feature(f, f_t[..., :3, :3], 4.0, 2), (2, 3, 3, 3)),
    }


FEATURE_LOSSES = _feature_losses()


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_gradcheck_student_side(name: str) -> None:
    fn, shape = FEATURE_LOSSES[name]
    assert torch.autograd.gradcheck(fn, (rnd(*shape, seed=64, scale=2).requires_grad_(),))


@pytest.mark.parametrize("name", ["sdd_region_logits", "class_activation_maps"])
def test_gradcheck_maps_reach_feature_and_classifier(name: str) -> None:
    a, w, b = rnd(2, 3, 4, 4, seed=65), rnd(4, 3, seed=66), rnd(4, seed=67)
    tensors = (a, w, b) if name == "sdd_region_logits" else (a, w)
    fn = (lambda x, v, c: KF.sdd_region_logits(x, v, c)) if name == "sdd_region_logits" else KF.class_activation_maps
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in tensors))


@pytest.mark.parametrize("name", ["sdd_kd", "sdd_dkd", "sdd_nkd", "cat_kd", "wkd_feature"])
def test_teacher_receives_no_gradient(name: str) -> None:
    y = labels(2, 4, seed=68)
    calls = {
        "sdd_kd": (lambda s, t: KF.sdd_kd(s, t, y), (2, 4, 5)),
        "sdd_dkd": (lambda s, t: KF.sdd_dkd(s, t, y), (2, 4, 5)),
        "sdd_nkd": (lambda s, t: KF.sdd_nkd(s, t, y), (2, 4, 5)),
        "cat_kd": (lambda s, t: KF.cat_kd(s, t, 2, True), (2, 4, 4, 4)),
        "wkd_feature": (lambda s, t: KF.wkd_feature(s, t, 4.0, 2), (2, 3, 4, 4)),
    }
    fn, shape = calls[name]
    s, t = rnd(*shape, seed=69).requires_grad_(), rnd(*shape, seed=70).requires_grad_()
    fn(s, t).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- dtype and device

def region_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student region logits and teacher ones on the quarter grid (exact in half precision)."""
    return rnd(2, 4, 5, seed=seed, scale=3), quarters(2, 4, 5, seed=seed + 1)


def project(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One number from a tensor output, in the output's dtype."""
    return (out * weights.to(out.dtype)).sum()


def _dtype_cases() -> dict:
    """name: (function of the inputs, float64 inputs, positions that are rounded to half precision)."""
    y = labels(2, 4, seed=71)
    proj_sdd = rnd(2, 4, 5, seed=72)  # fixed weights that turn a tensor output into one number
    proj_cam = rnd(2, 4, 4, 4, seed=73)
    return {
        "sdd_region_logits": (lambda a, w, b: project(KF.sdd_region_logits(a, w, b, (1, 2)), proj_sdd),
                              (rnd(2, 3, 4, 4, seed=74), rnd(4, 3, seed=75), rnd(4, seed=76)), (0, 1, 2)),
        "sdd_kd": (lambda s, t: KF.sdd_kd(s, t, y), region_pair(77), (0,)),
        "sdd_dkd": (lambda s, t: KF.sdd_dkd(s, t, y), region_pair(79), (0,)),
        "sdd_nkd": (lambda s, t: KF.sdd_nkd(s, t, y), region_pair(81), (0,)),
        "class_activation_maps": (lambda a, w: project(KF.class_activation_maps(a, w), proj_cam),
                                  (rnd(2, 3, 4, 4, seed=83), rnd(4, 3, seed=84)), (0, 1)),
        "cat_kd": (lambda s, t: KF.cat_kd(s, t, 2, True), (rnd(2, 4, 4, 4, seed=85), rnd(2, 4, 4, 4, seed=86)), (0, 1)),
        "wkd_feature": (lambda s, t: KF.wkd_feature(s, t, 4.0, 2),
                        (rnd(2, 3, 4, 4, seed=87), rnd(2, 3, 4, 4, seed=88, scale=2)), (0, 1)),
    }


DTYPE_CASES = _dtype_cases()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_half_inputs_give_float32_within_the_rounding_bound(name: str, dtype: torch.dtype) -> None:
    fn, inputs, rounded = DTYPE_CASES[name]
    assert fn(*inputs).dtype == D and fn(*(x.float() for x in inputs)).dtype == torch.float32
    half = [x.to(dtype) for x in inputs]
    half[0].requires_grad_()
    got = fn(*half)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    arithmetic = 2e-5 * abs(got.item()) + 1e-6
    assert abs(got.item() - fn(*(x.detach().double() for x in half)).item()) <= arithmetic
    bound = rounding_bound(fn, inputs, rounded=rounded, unit_roundoff=UNIT_ROUNDOFF[dtype])
    assert abs(got.item() - fn(*inputs).item()) <= bound + arithmetic
    got.backward()
    assert half[0].grad.dtype == dtype and torch.isfinite(half[0].grad.float()).all()


@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_outer_autocast_does_not_lower_precision(name: str) -> None:
    fn, inputs, _ = DTYPE_CASES[name]
    inputs = [x.float() for x in inputs]
    ref = fn(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*inputs)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    for name, (fn, inputs, _) in DTYPE_CASES.items():
        if name in ("sdd_region_logits", "class_activation_maps"):
            continue  # their projection weights live on the CPU; the maps are checked through the losses
        args = [x.to(dtype) for x in inputs]
        ref = fn(*args)
        got = fn(*(x.to(dev) for x in args))
        assert got.device.type == "cuda" and got.dtype == ref.dtype, name
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), name
    a, w = rnd(2, 3, 8, 8, seed=89).to(dtype), rnd(4, 3, seed=90).to(dtype)
    for fn in (KF.sdd_region_logits, KF.class_activation_maps):
        torch.testing.assert_close(fn(a.to(dev), w.to(dev)).cpu(), fn(a, w), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- pinned signatures

PINNED = [  # METHODS_2025_FEATURE.md, "Pinned functions"
    "sdd_region_logits(feature, fc_weight, fc_bias=None, scales=(1, 2, 4))",
    "sdd_kd(logits_s, logits_t, target, temperature=4.0)",
    "sdd_dkd(logits_s, logits_t, target, alpha=1.0, beta=8.0, temperature=4.0)",
    "sdd_nkd(logits_s, logits_t, target, temperature=4.0, gamma=8.0)",
    "class_activation_maps(feature, fc_weight)",
    "cat_kd(cam_s, cam_t, resolution=2, normalize=False)",
    "wkd_feature(f_s, f_t, mean_cov_ratio=4.0, grid=1, eps=1e-05)",
]


@pytest.mark.parametrize("pinned", PINNED)
def test_pinned_signature(pinned: str) -> None:
    name = pinned.split("(")[0]
    assert signature_line(getattr(KF, name)) == pinned
    assert name in KF.__all__
