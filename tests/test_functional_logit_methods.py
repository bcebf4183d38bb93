"""The 2023-2026 logit losses of distiller.functional (docs/METHODS_2025_LOGIT.md) against independent
computations: RLD, LumiNet, SKD, ABKD, EA-KD, NormKD and WKD-L.

References are per-sample Python loops over float64 values (``naive_refs``), written from the
document's math; derivatives are checked by finite differences (``gradcheck`` in float64). Float64
against float64 loops agrees to ~1e-10 relative. Half-precision inputs are upcast, so their float32
result is compared with the float64 value twice: on the rounded inputs (float32 arithmetic only) and
on the unrounded ones, within a first-order bound of the inputs' rounding (``rounding_bound``).
Teacher logits in those comparisons sit on a grid of quarters, exact in bf16 and fp16, so the
teacher's discrete choices (argmax, RLD's mask, SKD's medians) cannot move with the rounding.
"""
from __future__ import annotations

import math

import pytest
import torch
from float64_data import D, close, labels, quarters, rnd
from helpers import generator, signature_line
from naive_refs import (
    UNIT_ROUNDOFF,
    argmax_ref,
    dkd_ref,
    dkd_sample_ref,
    kd_ref,
    kd_sample_ref,
    kl_ref,
    median_ref,
    rounding_bound,
    rows,
    softmax_ref,
    solve_ref,
    standardize_ref,
)

import distiller.functional as KF
from common.errors import UserError

# --------------------------------------------------------------------------- RLD

def rld_ref(zs, zt, y, alpha: float, beta: float, T: float, Ta: float) -> float:
    scd = mcd = 0.0
    for a, b, label in zip(zs, zt, y):
        ps, pt = softmax_ref([v / Ta for v in a]), softmax_ref([v / Ta for v in b])
        top = argmax_ref(b)
        bs = [ps[label], sum(p for c, p in enumerate(ps) if c != label)]
        bt = [pt[top], sum(p for c, p in enumerate(pt) if c != top)]
        scd += kl_ref(bt, bs)
        below = [c for c in range(len(b)) if b[c] < b[label]]  # the classes MCD keeps
        if below:  # a fully masked row contributes 0 (pinned)
            mcd += kl_ref(softmax_ref([b[c] / T for c in below]), softmax_ref([a[c] / T for c in below]))
    return (alpha * Ta * Ta * scd + beta * T * T * mcd) / len(zs)


def rld_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher on a grid (ties), one row with the label at the teacher's minimum (fully masked),
    one teacher-right row and one teacher-wrong row."""
    zs, zt = rnd(8, 7, seed=seed, scale=3), quarters(8, 7, seed=seed + 1)
    y = labels(8, 7, seed=seed + 2)
    y[0] = zt[0].argmin()
    y[1] = zt[1].argmax()
    zt[2, 0], zt[2, 1], y[2] = 7.0, 6.5, 1
    return zs, zt, y


@pytest.mark.parametrize("alpha,beta,T,Ta", [(1.0, 8.0, 4.0, None), (1.0, 8.0, 4.0, 1.0), (0.5, 2.0, 2.0, 3.0)])
def test_rld_matches_loop(alpha: float, beta: float, T: float, Ta: float | None) -> None:
    zs, zt, y = rld_inputs(100)
    got = KF.rld(zs, zt, y, alpha, beta, T, Ta)
    close(got, rld_ref(rows(zs), rows(zt), y.tolist(), alpha, beta, T, T if Ta is None else Ta))


def test_rld_defaults_and_alpha_temperature_none_means_temperature() -> None:
    zs, zt, y = rld_inputs(101)
    close(KF.rld(zs, zt, y), rld_ref(rows(zs), rows(zt), y.tolist(), 1.0, 8.0, 4.0, 4.0))
    assert KF.rld(zs, zt, y, temperature=3.0).item() == KF.rld(zs, zt, y, temperature=3.0, alpha_temperature=3.0).item()
    assert KF.rld(zs, zt, y, alpha_temperature=1.0).item() != pytest.approx(KF.rld(zs, zt, y).item(), rel=1e-3)


def test_rld_fully_masked_row_contributes_zero_without_nan() -> None:
    zs = rnd(1, 6, seed=102, scale=3).requires_grad_()
    zt = quarters(1, 6, seed=103)
    y = zt.argmin(dim=1)  # every class scores at or above the label: MCD masks the whole row
    full = KF.rld(zs, zt, y, 1.0, 8.0, 4.0)
    scd_only = KF.rld(zs, zt, y, 1.0, 0.0, 4.0)
    assert torch.isfinite(full) and full.item() == scd_only.item()
    (g_full,) = torch.autograd.grad(full, zs)
    (g_scd,) = torch.autograd.grad(scd_only, zs)
    assert torch.isfinite(g_full).all() and torch.equal(g_full, g_scd)
    # the mean still divides by B: the masked row adds 0 to the sum, not to the count
    zs2, zt2, y2 = rld_inputs(104)
    assert KF.rld(zs2, zt2, y2, 0.0, 1.0).item() == pytest.approx(
        rld_ref(rows(zs2), rows(zt2), y2.tolist(), 0.0, 1.0, 4.0, 4.0), rel=1e-10)


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.5)])
def test_rld_is_dkd_when_the_teacher_is_right_everywhere(alpha: float, beta: float, T: float) -> None:
    zs, zt, y = rnd(6, 9, seed=105, scale=3), rnd(6, 9, seed=106, scale=3), labels(6, 9, seed=107)
    zt[torch.arange(6), y] = zt.max(dim=1).values + 1.0  # the label strictly on top: M_i = {y_i}
    got = KF.rld(zs, zt, y, alpha, beta, T)
    close(got, dkd_ref(rows(zs), rows(zt), y.tolist(), alpha, beta, T))
    torch.testing.assert_close(got, KF.dkd(zs, zt, y, alpha, beta, T), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- LumiNet

def perceive_ref(z, eps: float):
    n, c = len(z), len(z[0])
    out = [[0.0] * c for _ in range(n)]
    for k in range(c):
        col = [z[i][k] for i in range(n)]
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n  # biased
        for i in range(n):
            out[i][k] = (z[i][k] - mean) / math.sqrt(var + eps)
    return out


def luminet_ref(zs, zt, T: float, eps: float) -> float:
    ps, pt = perceive_ref(zs, eps), perceive_ref(zt, eps)
    return sum(kd_sample_ref(a, b, T) for a, b in zip(ps, pt)) / len(zs)


@pytest.mark.parametrize("T,eps", [(4.0, 1e-5), (8.0, 1e-3)])
def test_luminet_matches_loop(T: float, eps: float) -> None:
    zs, zt = rnd(6, 5, seed=110, scale=3), rnd(6, 5, seed=111, scale=3)
    zt[:, 2] = 1.5  # a class constant over the batch: P = 0 there, finite
    close(KF.luminet(zs, zt, T, eps), luminet_ref(rows(zs), rows(zt), T, eps))
    close(KF.luminet(zs, zt), luminet_ref(rows(zs), rows(zt), 4.0, 1e-5))


def test_luminet_batch_of_one_is_zero() -> None:
    zs = rnd(1, 5, seed=112, scale=3).requires_grad_()
    loss = KF.luminet(zs, rnd(1, 5, seed=113, scale=3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs))


# --------------------------------------------------------------------------- SKD

def skd_md_ref(zs, zt, lam: float) -> float:
    n, c = len(zs), len(zs[0])

    def gram(z):
        u = [[v / max(math.sqrt(sum(x * x for x in r)), 1e-12) for v in r] for r in z]
        return [[sum(u[i][k] * u[j][k] for k in range(c)) / c for j in range(n)] for i in range(n)]

    gs, gt = gram(zs), gram(zt)
    d = [[gs[i][j] - gt[i][j] for j in range(n)] for i in range(n)]
    mean = [sum(d[i][j] for i in range(n)) / n for j in range(n)]
    sigma = [[sum((d[i][j] - mean[j]) * (d[i][k] - mean[k]) for i in range(n)) / (n - 1) + (lam if j == k else 0.0)
              for k in range(n)] for j in range(n)]
    total = 0.0
    for i in range(n):
        x = solve_ref(sigma, d[i])
        total += math.sqrt(sum(a * b for a, b in zip(d[i], x)))
    return total / n


def skd_fractions_ref(zt) -> tuple[float, float]:
    q = [softmax_ref(r) for r in zt]
    conf = [max(r) for r in q]
    mass = [sum(r[k] for r in q) for k in range(len(q[0]))]
    return (sum(v <= median_ref(conf) for v in conf) / len(conf),
            sum(v <= median_ref(mass) for v in mass) / len(mass))


def skd_ref(zs, zt, T: float, lam: float) -> float:
    f_s, f_c = skd_fractions_ref(zt)
    return f_s * kd_ref(zs, zt, T) + f_c * skd_md_ref(zs, zt, lam)


@pytest.mark.parametrize("n,c,lam", [(6, 5, 0.1), (7, 9, 0.5), (2, 3, 0.1)])
def test_skd_mahalanobis_matches_loop(n: int, c: int, lam: float) -> None:
    zs, zt = rnd(n, c, seed=120, scale=3), rnd(n, c, seed=121, scale=3)
    close(KF.skd_mahalanobis(zs, zt, lam), skd_md_ref(rows(zs), rows(zt), lam))
    if lam == 0.1:
        close(KF.skd_mahalanobis(zs, zt), skd_md_ref(rows(zs), rows(zt), 0.1))


@pytest.mark.parametrize("n,c,T", [(6, 6, 4.0), (7, 5, 2.0)])
def test_skd_matches_loop_and_the_median_fractions_by_hand(n: int, c: int, T: float) -> None:
    zs, zt = rnd(n, c, seed=122, scale=3), rnd(n, c, seed=123, scale=3)
    close(KF.skd(zs, zt, T, 0.1), skd_ref(rows(zs), rows(zt), T, 0.1))
    close(KF.skd(zs, zt), skd_ref(rows(zs), rows(zt), 4.0, 0.1)) if T == 4.0 else None
    # continuous teacher values have no ties: n // 2 + 1 of n at or below an odd median, n / 2 of an even one
    f = lambda k: (k // 2 + 1) / k if k % 2 else 0.5
    want = f(n) * kd_ref(rows(zs), rows(zt), T) + f(c) * skd_md_ref(rows(zs), rows(zt), 0.1)
    close(KF.skd(zs, zt, T, 0.1), want)


def test_skd_fractions_count_ties_at_the_median() -> None:
    """A uniform teacher: every confidence and every class mass equals its median, so both shares are 1."""
    zs, zt = rnd(6, 4, seed=130, scale=3), torch.zeros(6, 4, dtype=D)
    assert skd_fractions_ref(rows(zt)) == (1.0, 1.0)
    close(KF.skd(zs, zt, 2.0), kd_ref(rows(zs), rows(zt), 2.0) + skd_md_ref(rows(zs), rows(zt), 0.1))


def test_skd_mahalanobis_ignores_each_rows_scale() -> None:
    zs, zt = rnd(5, 6, seed=124, scale=3), rnd(5, 6, seed=125, scale=3)
    scale = torch.linspace(0.5, 3.0, 5, dtype=D).unsqueeze(1)
    close(KF.skd_mahalanobis(zs * scale, zt * 2.0), KF.skd_mahalanobis(zs, zt).item(), rel=1e-12)


def test_skd_float32_matches_float64_at_training_size() -> None:
    """B = 64, C = 100 (the published batch): the Cholesky/solve path loses nothing in float32."""
    zs, zt = rnd(64, 100, seed=126, scale=3), rnd(64, 100, seed=127, scale=5)
    for fn in (KF.skd_mahalanobis, KF.skd):
        want = fn(zs, zt).item()
        assert fn(zs.float(), zt.float()).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda zs, zt: KF.skd(zs, zt, tikhonov=0.0), "tikhonov"),
    (lambda zs, zt: KF.skd_mahalanobis(zs[:1], zt[:1]), "at least 2 samples"),
])
def test_skd_rejects_bad_settings(call, match: str) -> None:
    with pytest.raises(UserError, match=match):
        call(rnd(4, 5, seed=128), rnd(4, 5, seed=129))


# --------------------------------------------------------------------------- ABKD

def abkd_ref(zs, zt, a: float, b: float, T: float) -> float:
    total = 0.0
    for rs, rt in zip(zs, zt):
        p, q = softmax_ref([v / T for v in rt]), softmax_ref([v / T for v in rs])
        if a == 0 and b == 0:
            d = 0.5 * sum((math.log(y) - math.log(x)) ** 2 for x, y in zip(p, q))
        elif a == 0:
            d = sum(y ** b * math.log(y ** b / x ** b) - y ** b + x ** b for x, y in zip(p, q)) / b
        elif b == 0:
            d = sum(x ** a * math.log(x ** a / y ** a) - x ** a + y ** a for x, y in zip(p, q)) / a
        elif a + b == 0:
            d = sum(math.log(y ** a / x ** a) + x ** a / y ** a - 1 for x, y in zip(p, q)) / a
        else:
            d = -sum(x ** a * y ** b - a / (a + b) * x ** (a + b) - b / (a + b) * y ** (a + b)
                     for x, y in zip(p, q)) / (a * b)
        total += d
    return total / len(zs)


AB_CASES = [(0.0, 0.0), (0.0, 1.0), (0.0, 0.5), (1.0, 0.0), (0.7, 0.0), (0.6, -0.6), (-0.4, 0.4),
            (0.5, 0.5), (0.8, 0.3), (1.2, -0.3), (0.9, 0.3)]


@pytest.mark.parametrize("a,b", AB_CASES)
def test_abkd_matches_loop_in_every_case(a: float, b: float) -> None:
    zs, zt = rnd(5, 6, seed=130, scale=3), rnd(5, 6, seed=131, scale=3)
    close(KF.abkd(zs, zt, a, b, 2.0), abkd_ref(rows(zs), rows(zt), a, b, 2.0))
    assert KF.abkd(zt, zt, a, b, 2.0).item() == pytest.approx(0.0, abs=1e-14)  # a divergence: 0 at equality


def test_abkd_defaults_and_the_kl_limits() -> None:
    zs, zt = rnd(5, 6, seed=132, scale=3), rnd(5, 6, seed=133, scale=3)
    close(KF.abkd(zs, zt), abkd_ref(rows(zs), rows(zt), 0.5, 0.5, 4.0))
    T = 4.0
    close(T ** 2 * KF.abkd(zs, zt, 1.0, 0.0, T), kd_ref(rows(zs), rows(zt), T))  # forward KL, no T^2 inside
    reverse = sum(kd_sample_ref(b, a, T) for a, b in zip(rows(zs), rows(zt))) / 5  # KL(q || p)
    close(KF.abkd(zs, zt, 0.0, 1.0, T), reverse)


def test_ablsd_composition_is_kd_ls_at_alpha_one_beta_zero() -> None:
    zs, zt, T = rnd(5, 6, seed=134, scale=3), rnd(5, 6, seed=135, scale=3), 2.0
    got = T ** 2 * KF.abkd(KF.logit_standardize(zs), KF.logit_standardize(zt), 1.0, 0.0, T)
    close(got, kd_ref(standardize_ref(rows(zs)), standardize_ref(rows(zt)), T))


# --------------------------------------------------------------------------- EA-KD

def entropy_ref(r, t: float) -> float:
    return -sum(p * math.log(p) for p in softmax_ref([v / t for v in r]) if p > 0)


def eakd_weight_ref(zs, zt, t: float, h_ub: float | None) -> list[float]:
    bound = math.log(len(zs[0])) if h_ub is None else h_ub
    return [0.5 * entropy_ref(b, t) * (1 + entropy_ref(a, t) / bound) for a, b in zip(zs, zt)]


def eakd_kd_ref(zs, zt, T: float, t: float, h_ub: float | None) -> float:
    w = eakd_weight_ref(zs, zt, t, h_ub)
    return sum(wi * T * T * kd_sample_ref(a, b, T) for wi, a, b in zip(w, zs, zt)) / len(zs)


def eakd_dkd_ref(zs, zt, y, alpha: float, beta: float, T: float, t: float, h_ub: float | None) -> float:
    w = eakd_weight_ref(zs, zt, t, h_ub)
    total = 0.0
    for wi, a, b, label in zip(w, zs, zt, y):
        tckd, nckd = dkd_sample_ref(a, b, label, T, T)
        total += wi * T * T * (alpha * tckd + beta * nckd)
    return total / len(zs)


@pytest.mark.parametrize("t,h_ub", [(3.0, None), (3.0, 100.0), (1.0, 2.0)])
def test_eakd_weight_matches_loop_and_carries_no_gradient(t: float, h_ub: float | None) -> None:
    zs, zt = rnd(5, 7, seed=140, scale=3).requires_grad_(), rnd(5, 7, seed=141, scale=3).requires_grad_()
    w = KF.eakd_weight(zs, zt, t, h_ub)
    assert w.shape == (5,) and not w.requires_grad and w.grad_fn is None
    for got, want in zip(w.tolist(), eakd_weight_ref(rows(zs), rows(zt), t, h_ub)):
        assert got == pytest.approx(want, rel=1e-12)


def test_eakd_weight_defaults_and_uniform_hand_value() -> None:
    zs, zt = rnd(4, 7, seed=142, scale=3), rnd(4, 7, seed=143, scale=3)
    assert torch.equal(KF.eakd_weight(zs, zt), KF.eakd_weight(zs, zt, 3.0, math.log(7)))  # None -> log C
    # both uniform: H_t = H_s = log C, so w = log C / 2 * (1 + 1) = log C
    torch.testing.assert_close(KF.eakd_weight(torch.zeros(3, 7, dtype=D), torch.zeros(3, 7, dtype=D)),
                               torch.full((3,), math.log(7), dtype=D), rtol=1e-14, atol=0)
    with pytest.raises(UserError, match="h_ub"):
        KF.eakd_weight(zs, zt, h_ub=0.0)


@pytest.mark.parametrize("T,t,h_ub", [(4.0, 3.0, None), (2.0, 1.5, 100.0)])
def test_eakd_kd_and_dkd_match_loops(T: float, t: float, h_ub: float | None) -> None:
    zs, zt, y = rnd(5, 7, seed=144, scale=3), rnd(5, 7, seed=145, scale=3), labels(5, 7, seed=146)
    close(KF.eakd_kd(zs, zt, T, t, h_ub), eakd_kd_ref(rows(zs), rows(zt), T, t, h_ub))
    close(KF.eakd_dkd(zs, zt, y, 1.0, 8.0, T, t, h_ub),
          eakd_dkd_ref(rows(zs), rows(zt), y.tolist(), 1.0, 8.0, T, t, h_ub))
    close(KF.eakd_kd(zs, zt), eakd_kd_ref(rows(zs), rows(zt), 4.0, 3.0, None))
    close(KF.eakd_dkd(zs, zt, y), eakd_dkd_ref(rows(zs), rows(zt), y.tolist(), 1.0, 8.0, 4.0, 3.0, None))


@pytest.mark.parametrize("which", ["kd", "dkd"])
def test_eakd_gradient_treats_the_weight_as_a_constant(which: str) -> None:
    zs, zt, y = rnd(3, 4, seed=147, scale=2), rnd(3, 4, seed=148, scale=2), labels(3, 4, seed=149)
    w0 = eakd_weight_ref(rows(zs), rows(zt), 3.0, None)

    def frozen(z) -> float:  # the loop with the weights held at their value at zs
        if which == "kd":
            return sum(wi * 16 * kd_sample_ref(a, b, 4.0) for wi, a, b in zip(w0, z, rows(zt))) / 3
        return sum(wi * 16 * (lambda tn: tn[0] + 8 * tn[1])(dkd_sample_ref(a, b, k, 4.0, 4.0))
                   for wi, a, b, k in zip(w0, z, rows(zt), y.tolist())) / 3

    def full(z) -> float:
        fn = eakd_kd_ref if which == "kd" else (lambda a, b, *r: eakd_dkd_ref(a, b, y.tolist(), 1.0, 8.0, *r))
        return fn(z, rows(zt), 4.0, 3.0, None)

    x = zs.clone().requires_grad_()
    loss = KF.eakd_kd(x, zt) if which == "kd" else KF.eakd_dkd(x, zt, y)
    (grad,) = torch.autograd.grad(loss, x)
    h, base = 1e-6, rows(zs)
    for i in range(3):
        for k in range(4):
            up = [r[:] for r in base]
            down = [r[:] for r in base]
            up[i][k] += h
            down[i][k] -= h
            assert grad[i, k].item() == pytest.approx((frozen(up) - frozen(down)) / (2 * h), rel=1e-6, abs=1e-9)
    # and that differs from the derivative through the student's entropy, so the check has teeth
    up = [r[:] for r in base]
    up[0][0] += h
    down = [r[:] for r in base]
    down[0][0] -= h
    assert abs((full(up) - full(down)) / (2 * h) - grad[0, 0].item()) > 1e-5


# --------------------------------------------------------------------------- NormKD

def std_ref(r) -> float:
    m = sum(r) / len(r)
    return math.sqrt(sum((v - m) ** 2 for v in r) / (len(r) - 1))


def normkd_ref(zs, zt, t: float) -> float:
    total = 0.0
    for a, b in zip(zs, zt):
        ts, tt = t * std_ref(a), t * std_ref(b)
        total += tt * tt * kl_ref(softmax_ref([v / tt for v in b]), softmax_ref([v / ts for v in a]))
    return total / len(zs)


def normkd_dkd_ref(zs, zt, y, alpha: float, beta: float, t: float) -> float:
    total = 0.0
    for a, b, label in zip(zs, zt, y):
        ts, tt = t * std_ref(a), t * std_ref(b)
        tckd, nckd = dkd_sample_ref(a, b, label, ts, tt)
        total += tt * tt * (alpha * tckd + beta * nckd)
    return total / len(zs)


@pytest.mark.parametrize("t", [2.0, 1.0])
def test_normkd_and_normkd_dkd_match_loops(t: float) -> None:
    zs, zt, y = rnd(5, 7, seed=150, scale=3), rnd(5, 7, seed=151, scale=5), labels(5, 7, seed=152)
    close(KF.normkd(zs, zt, t), normkd_ref(rows(zs), rows(zt), t))
    close(KF.normkd_dkd(zs, zt, y, 4.0, 5.0, t), normkd_dkd_ref(rows(zs), rows(zt), y.tolist(), 4.0, 5.0, t))
    close(KF.normkd(zs, zt), normkd_ref(rows(zs), rows(zt), 2.0))
    close(KF.normkd_dkd(zs, zt, y), normkd_dkd_ref(rows(zs), rows(zt), y.tolist(), 1.0, 8.0, 2.0))


def test_normkd_scale_behaviour() -> None:
    """The student's scale cancels in z_s / T_s; the teacher's enters only through T_t^2."""
    zs, zt, y = rnd(5, 7, seed=153, scale=3), rnd(5, 7, seed=154, scale=3), labels(5, 7, seed=155)
    for fn in (lambda a, b: KF.normkd(a, b), lambda a, b: KF.normkd_dkd(a, b, y)):
        base = fn(zs, zt).item()
        assert fn(3.0 * zs, zt).item() == pytest.approx(base, rel=1e-12)
        assert fn(zs, 2.0 * zt).item() == pytest.approx(4.0 * base, rel=1e-12)


# --------------------------------------------------------------------------- WKD-L

def sharpened_cost(c: int, seed: int) -> torch.Tensor:
    """A symmetric, zero-diagonal ``1 - CKA`` stand-in in [0, 0.88], sharpened by ``1 - exp(-dist)``."""
    d = torch.rand(c, c, generator=generator(seed), dtype=D) * 0.88
    d = (d + d.t()) / 2
    d.fill_diagonal_(0.0)
    return 1.0 - torch.exp(-d)


def wkd_logit_ref(zs, zt, y, cost, T: float, gamma: float, lam: float, iters: int) -> float:
    n = len(zs)
    target = wd = 0.0
    for a, b, label in zip(zs, zt, y):
        target -= softmax_ref(b)[label] * math.log(softmax_ref(a)[label])
        keep = [c for c in range(len(a)) if c != label]
        m = len(keep)
        ps, pt = softmax_ref([a[c] / T for c in keep]), softmax_ref([b[c] / T for c in keep])
        cost_m = [[max(cost[keep[j]][keep[k]], 0.0) + 1e-8 for k in range(m)] for j in range(m)]
        kern = [[math.exp(-cost_m[j][k] / lam) for k in range(m)] for j in range(m)]
        u = [1.0 / m] * m
        for _ in range(iters):
            v = [pt[k] / (sum(kern[j][k] * u[j] for j in range(m)) + 1e-8) for k in range(m)]
            u = [ps[j] / (sum(kern[j][k] * v[k] for k in range(m)) + 1e-8) for j in range(m)]
        wd += sum(u[j] * kern[j][k] * v[k] * cost_m[j][k] for j in range(m) for k in range(m))
    return target / n + gamma * wd / n


@pytest.mark.parametrize("T,gamma,lam,iters", [(8.0, 1.0, 0.05, 10), (4.0, 600.0, 0.3, 1), (2.0, 0.5, 0.1, 3)])
def test_wkd_logit_matches_loop(T: float, gamma: float, lam: float, iters: int) -> None:
    zs, zt, y = rnd(4, 6, seed=160, scale=3), rnd(4, 6, seed=161, scale=3), labels(4, 6, seed=162)
    cost = sharpened_cost(6, seed=163)
    close(KF.wkd_logit(zs, zt, y, cost, T, gamma, lam, iters),
          wkd_logit_ref(rows(zs), rows(zt), y.tolist(), rows(cost), T, gamma, lam, iters))


def test_wkd_logit_defaults_orientation_and_target_term() -> None:
    zs, zt, y = rnd(4, 6, seed=164, scale=3), rnd(4, 6, seed=165, scale=3), labels(4, 6, seed=166)
    cost = sharpened_cost(6, seed=167)
    close(KF.wkd_logit(zs, zt, y, cost), wkd_logit_ref(rows(zs), rows(zt), y.tolist(), rows(cost), 8.0, 1.0, 0.05, 10))
    # an asymmetric cost with negative entries pins which side is which and the relu
    skew = cost + 0.3 * torch.triu(torch.ones(6, 6, dtype=D), 1) - 0.05
    close(KF.wkd_logit(zs, zt, y, skew, 4.0, 1.0, 0.2, 5),
          wkd_logit_ref(rows(zs), rows(zt), y.tolist(), rows(skew), 4.0, 1.0, 0.2, 5))
    assert KF.wkd_logit(zs, zt, y, skew, 4.0, 1.0, 0.2, 5).item() != pytest.approx(
        KF.wkd_logit(zs, zt, y, skew.t(), 4.0, 1.0, 0.2, 5).item(), rel=1e-6)
    # gamma = 0 leaves the target term, a cross-entropy at temperature 1 with weight 1
    want = -sum(softmax_ref(b)[k] * math.log(softmax_ref(a)[k]) for a, b, k in zip(rows(zs), rows(zt), y.tolist())) / 4
    close(KF.wkd_logit(zs, zt, y, cost, gamma=0.0), want)


def test_wkd_logit_float32_matches_float64_at_the_published_setting() -> None:
    """C = 100, T = 8, lambda = 0.05, 10 iterations: the Sinkhorn needs nothing wider than float32."""
    zs, zt, y = rnd(16, 100, seed=168, scale=3), rnd(16, 100, seed=169, scale=5), labels(16, 100, seed=170)
    cost = sharpened_cost(100, seed=171)
    want = KF.wkd_logit(zs, zt, y, cost, gamma=600.0).item()
    x = zs.float().requires_grad_()
    got = KF.wkd_logit(x, zt.float(), y, cost.float(), gamma=600.0)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"cost_matrix": torch.zeros(5, 5)}, "cost_matrix"),
    ({"sinkhorn_iter": 0}, "sinkhorn_iter"),
    ({"sinkhorn_lambda": 0.0}, "sinkhorn_lambda"),
])
def test_wkd_logit_rejects_bad_settings(kwargs: dict, match: str) -> None:
    args = {"cost_matrix": sharpened_cost(6, seed=172), **kwargs}
    with pytest.raises(UserError, match=match):
        KF.wkd_logit(rnd(3, 6, seed=173), rnd(3, 6, seed=174), labels(3, 6, seed=175), **args)


# --------------------------------------------------------------------------- gradients

COST5 = sharpened_cost(5, seed=180)

# every loss as a function of (student logits, teacher logits, labels), small settings that keep gradcheck fast
LOSSES = {
    "rld": lambda zs, zt, y: KF.rld(zs, zt, y, 1.0, 2.0, 2.0, 3.0),
    "luminet": lambda zs, zt, y: KF.luminet(zs, zt, 2.0),
    "skd": lambda zs, zt, y: KF.skd(zs, zt, 2.0, 0.1),
    "skd_mahalanobis": lambda zs, zt, y: KF.skd_mahalanobis(zs, zt, 0.1),
    "abkd_general": lambda zs, zt, y: KF.abkd(zs, zt, 0.8, 0.3, 2.0),
    "abkd_alpha_zero": lambda zs, zt, y: KF.abkd(zs, zt, 0.0, 0.5, 2.0),
    "abkd_sum_zero": lambda zs, zt, y: KF.abkd(zs, zt, 0.6, -0.6, 2.0),
    "abkd_both_zero": lambda zs, zt, y: KF.abkd(zs, zt, 0.0, 0.0, 2.0),
    "eakd_kd": lambda zs, zt, y: KF.eakd_kd(zs, zt, 2.0),
    "eakd_dkd": lambda zs, zt, y: KF.eakd_dkd(zs, zt, y, 1.0, 2.0, 2.0),
    "normkd": lambda zs, zt, y: KF.normkd(zs, zt),
    "normkd_dkd": lambda zs, zt, y: KF.normkd_dkd(zs, zt, y, 1.0, 2.0),
    "wkd_logit": lambda zs, zt, y: KF.wkd_logit(zs, zt, y, COST5, 2.0, 1.0, 0.3, 3),
}
# EA-KD's weight depends on the student but is held constant: finite differences see that dependence,
# so its gradient is checked against the frozen-weight loop above instead
GRADCHECK = sorted(set(LOSSES) - {"eakd_kd", "eakd_dkd"})


@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck_student_logits(name: str) -> None:
    zs = rnd(4, 5, seed=181, scale=2).requires_grad_()
    zt, y = quarters(4, 5, seed=182), labels(4, 5, seed=183)
    assert torch.autograd.gradcheck(lambda z: LOSSES[name](z, zt, y), (zs,))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_teacher_receives_no_gradient(name: str) -> None:
    zs = rnd(4, 5, seed=184, scale=2).requires_grad_()
    zt = rnd(4, 5, seed=185, scale=2).requires_grad_()
    LOSSES[name](zs, zt, labels(4, 5, seed=186)).backward()
    assert zt.grad is None
    assert zs.grad is not None and torch.isfinite(zs.grad).all()


# --------------------------------------------------------------------------- dtype and device

DTYPE_CASES = {**LOSSES, "eakd_weight": lambda zs, zt, y: KF.eakd_weight(zs, zt).sum()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_half_inputs_give_float32_within_the_rounding_bound(name: str, dtype: torch.dtype) -> None:
    fn = DTYPE_CASES[name]
    zs, zt, y = rnd(4, 6, seed=190, scale=3), quarters(4, 6, seed=191), labels(4, 6, seed=192)
    if name == "wkd_logit":
        fn = lambda a, b, k: KF.wkd_logit(a, b, k, sharpened_cost(6, seed=193), 2.0, 1.0, 0.3, 3)
    assert fn(zs, zt, y).dtype == D and fn(zs.float(), zt.float(), y).dtype == torch.float32
    zs_h = zs.to(dtype).requires_grad_(name != "eakd_weight")
    got = fn(zs_h, zt.to(dtype), y)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    arithmetic = 2e-5 * abs(got.item()) + 1e-6  # float32 arithmetic on a few dozen operations
    # the float64 value on the rounded inputs: only float32 arithmetic separates them
    assert abs(got.item() - fn(zs_h.detach().double(), zt, y).item()) <= arithmetic
    # the float64 value on the unrounded inputs: within the first-order effect of the rounding
    bound = rounding_bound(fn, (zs, zt, y), rounded=(0,), unit_roundoff=UNIT_ROUNDOFF[dtype])
    assert abs(got.item() - fn(zs, zt, y).item()) <= bound + arithmetic
    if name != "eakd_weight":
        got.backward()
        assert zs_h.grad.dtype == dtype and torch.isfinite(zs_h.grad.float()).all()


@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_outer_autocast_does_not_lower_precision(name: str) -> None:
    zs, zt, y = rnd(6, 8, seed=194, scale=3).float(), quarters(6, 8, seed=195).float(), labels(6, 8, seed=196)
    fn = DTYPE_CASES[name]
    if name == "wkd_logit":
        fn = lambda a, b, k: KF.wkd_logit(a, b, k, sharpened_cost(8, seed=197).float())
    ref = fn(zs, zt, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(zs, zt, y)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    zs, zt, y = rnd(6, 8, seed=198, scale=3).to(dtype), quarters(6, 8, seed=199).to(dtype), labels(6, 8, seed=200)
    cost = sharpened_cost(8, seed=201)
    cases = {**DTYPE_CASES, "wkd_logit": lambda a, b, k: KF.wkd_logit(a, b, k, cost.to(a.device))}
    for name, fn in cases.items():
        ref = fn(zs, zt, y)
        got = fn(zs.to(dev), zt.to(dev), y.to(dev))
        assert got.device.type == "cuda" and got.dtype == ref.dtype, name
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), name


# --------------------------------------------------------------------------- pinned signatures

PINNED = [  # METHODS_2025_LOGIT.md, "Pinned functions"
    "rld(logits_s, logits_t, target, alpha=1.0, beta=8.0, temperature=4.0, alpha_temperature=None)",
    "luminet(logits_s, logits_t, temperature=4.0, eps=1e-05)",
    "skd(logits_s, logits_t, temperature=4.0, tikhonov=0.1)",
    "skd_mahalanobis(logits_s, logits_t, tikhonov=0.1)",
    "abkd(logits_s, logits_t, alpha=0.5, beta=0.5, temperature=4.0)",
    "eakd_weight(logits_s, logits_t, entropy_temperature=3.0, h_ub=None)",
    "eakd_kd(logits_s, logits_t, temperature=4.0, entropy_temperature=3.0, h_ub=None)",
    "eakd_dkd(logits_s, logits_t, target, alpha=1.0, beta=8.0, temperature=4.0, entropy_temperature=3.0, h_ub=None)",
    "normkd(logits_s, logits_t, t_norm=2.0)",
    "normkd_dkd(logits_s, logits_t, target, alpha=1.0, beta=8.0, t_norm=2.0)",
    "wkd_logit(logits_s, logits_t, target, cost_matrix, temperature=8.0, gamma=1.0, sinkhorn_lambda=0.05, "
    "sinkhorn_iter=10)",
]


@pytest.mark.parametrize("pinned", PINNED)
def test_pinned_signature(pinned: str) -> None:
    name = pinned.split("(")[0]
    assert signature_line(getattr(KF, name)) == pinned
    assert name in KF.__all__
