"""The post-DKD functions of distiller.functional (METHODS_NEW.md: DIST, LS, CTKD, MLKD, WTTM/TTM, NKD)
against independent computations.

References are per-sample / per-class Python loops over float64 values with the ``math``
module, hand-derived values (CTKD's schedule and initial temperature), finite differences
(``torch.autograd.gradcheck`` in float64) and, for DKD's log-space rewrite, the formula it
replaced. Tolerances follow from the arithmetic: float64 against float64 loops to ~1e-9
relative; float32 results (half-precision inputs are upcast) to ~1e-5 relative.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from helpers import generator
from naive_refs import dkd_ref, kd_ref, median_ref, rows, softmax_ref, standardize_ref

import distiller.functional as KF
from common.errors import UserError

D = torch.float64


def rnd(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = D) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator(seed), dtype=D) * scale).to(dtype)


def labels(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=generator(seed))


def close(value: torch.Tensor, ref: float, rel: float = 1e-9, abs_: float = 1e-12) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(ref, rel=rel, abs=abs_)


# --------------------------------------------------------------------------- naive building blocks

def pearson_ref(u: list[float], v: list[float]) -> float:
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cu, cv = [a - mu for a in u], [b - mv for b in v]
    nu, nv = math.sqrt(sum(a * a for a in cu)), math.sqrt(sum(b * b for b in cv))
    return sum(a * b for a, b in zip(cu, cv)) / (nu * nv + 1e-8)


def dist_ref(zs: list[list[float]], zt: list[list[float]], beta: float, gamma: float, tau: float) -> float:
    ys = [softmax_ref([v / tau for v in r]) for r in zs]
    yt = [softmax_ref([v / tau for v in r]) for r in zt]
    n, c = len(ys), len(ys[0])
    inter = 1.0 - sum(pearson_ref(ys[i], yt[i]) for i in range(n)) / n
    intra = 1.0 - sum(pearson_ref([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)])
                      for j in range(c)) / c
    return tau * tau * (beta * inter + gamma * intra)


def wttm_ref(zs: list[list[float]], zt: list[list[float]], gamma: float, weighted: bool) -> float:
    total = 0.0
    for rs, rt in zip(zs, zt):
        ps, pt = softmax_ref(rs), softmax_ref(rt)
        powered = [p ** gamma for p in pt]
        u = sum(powered)
        q = [p / u for p in powered]
        kl = sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, ps))
        total += (u if weighted else 1.0) * kl
    return total / len(zs)


def nkd_ref(zs: list[list[float]], zt: list[list[float]], y: list[int], T: float, gamma: float) -> float:
    target = nontarget = 0.0
    for rs, rt, label in zip(zs, zt, y):
        target -= softmax_ref(rt)[label] * math.log(softmax_ref(rs)[label])
        others = [c for c in range(len(rs)) if c != label]
        s_hat = softmax_ref([rs[c] / T for c in others])
        t_hat = softmax_ref([rt[c] / T for c in others])
        nontarget += sum(t * math.log(s) for t, s in zip(t_hat, s_hat))
    n = len(zs)
    return target / n - gamma * T * T * nontarget / n


# --------------------------------------------------------------------------- DIST

@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_matches_loop(beta: float, gamma: float, tau: float) -> None:
    zs, zt = rnd(6, 5, seed=1, scale=3), rnd(6, 5, seed=2, scale=3)
    close(KF.dist(zs, zt, beta=beta, gamma=gamma, temperature=tau), dist_ref(rows(zs), rows(zt), beta, gamma, tau))


def test_dist_defaults_and_identical_inputs() -> None:
    zs, zt = rnd(4, 7, seed=3, scale=2), rnd(4, 7, seed=4, scale=2)
    close(KF.dist(zs, zt), dist_ref(rows(zs), rows(zt), 1.0, 1.0, 4.0))
    # perfect correlation everywhere: 0 up to the 1e-8 added to squared centred norms of ~1e-3 (times tau^2)
    same = KF.dist(zs, zs).item()
    assert 0 <= same < 1e-3
    assert same == pytest.approx(dist_ref(rows(zs), rows(zs), 1.0, 1.0, 4.0), rel=1e-6)


def test_dist_constant_vector_gives_zero_correlation_not_nan() -> None:
    # one sample: every class column is constant over the batch, so rho = 0 and intra = 1
    zs, zt = rnd(1, 5, seed=5), rnd(1, 5, seed=6)
    got = KF.dist(zs, zt, beta=0.0, gamma=1.0, temperature=1.0)
    close(got, 1.0)


# --------------------------------------------------------------------------- logit standardisation

def test_logit_standardize_matches_loop_unbiased_std_eps_outside_root() -> None:
    z = rnd(4, 9, seed=7, scale=5)
    got = KF.logit_standardize(z)
    assert got.shape == z.shape
    ref = standardize_ref(rows(z))
    for r_got, r_ref in zip(rows(got), ref):
        assert r_got == pytest.approx(r_ref, rel=1e-10, abs=1e-12)
    # eps visible where it matters: a tiny-spread row with a large eps
    small = torch.tensor([[0.0, 1e-3, 2e-3]], dtype=D)
    assert rows(KF.logit_standardize(small, eps=1e-3))[0] == pytest.approx(
        standardize_ref(rows(small), eps=1e-3)[0], rel=1e-10, abs=1e-14)


def test_logit_standardize_constant_row_is_zero() -> None:
    z = torch.full((2, 5), 3.25, dtype=D)
    assert torch.equal(KF.logit_standardize(z), torch.zeros_like(z))


def test_kd_on_standardized_logits_is_kd_ls() -> None:
    zs, zt = rnd(3, 6, seed=8, scale=4), rnd(3, 6, seed=9, scale=4)
    got = KF.kd(KF.logit_standardize(zs), KF.logit_standardize(zt), 2.0)
    close(got, kd_ref(standardize_ref(rows(zs)), standardize_ref(rows(zt)), 2.0))


# --------------------------------------------------------------------------- CTKD

def test_ctkd_lambda_hand_values() -> None:
    assert KF.ctkd_lambda(1) == pytest.approx((1 - math.cos(math.pi / 10)) / 2, rel=1e-15)
    assert KF.ctkd_lambda(1) == pytest.approx(0.0245, abs=5e-5)
    assert KF.ctkd_lambda(5) == pytest.approx(0.5, rel=1e-15)
    for e in (10, 11, 240):
        assert KF.ctkd_lambda(e) == pytest.approx(1.0, rel=1e-15)
    for e in (0, -3):
        assert KF.ctkd_lambda(e) == 0.0
    assert isinstance(KF.ctkd_lambda(3), float)
    # other ends and ramp length: half-way is the mid point
    assert KF.ctkd_lambda(2, lambda_min=0.2, lambda_max=0.6, ramp_epochs=4) == pytest.approx(0.4, rel=1e-14)
    assert KF.ctkd_lambda(0, lambda_min=0.2, lambda_max=0.6) == pytest.approx(0.2, rel=1e-15)


def test_ctkd_lambda_rejects_a_non_positive_ramp() -> None:
    with pytest.raises(UserError, match="ramp_epochs"):
        KF.ctkd_lambda(1, ramp_epochs=0)


def test_ctkd_temperature_value_at_init_and_shape() -> None:
    theta = torch.tensor(1.0)
    t = KF.ctkd_temperature(theta, 0.5)
    assert t.dim() == 0
    assert t.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    assert t.item() == pytest.approx(15.62, abs=5e-3)
    vec = torch.tensor([-2.0, 0.0, 3.0], dtype=D)
    got = KF.ctkd_temperature(vec, 1.0, t_min=2.0, t_range=5.0)
    assert got.shape == vec.shape and got.dtype == D
    assert rows(got[None])[0] == pytest.approx([2 + 5 / (1 + math.exp(-v)) for v in vec.tolist()], rel=1e-14)


@pytest.mark.parametrize("lam", [0.0245, 0.5, 1.0])
def test_ctkd_temperature_reverses_theta_gradient(lam: float) -> None:
    zs, zt = rnd(4, 6, seed=10, scale=3), rnd(4, 6, seed=11, scale=3)
    theta = torch.tensor(0.7, dtype=D, requires_grad=True)
    KF.kd(zs, zt, KF.ctkd_temperature(theta, lam)).backward()
    # the same path through an identity instead of the reversal
    plain = torch.tensor(0.7, dtype=D, requires_grad=True)
    KF.kd(zs, zt, 1.0 + 20.0 * torch.sigmoid(plain)).backward()
    assert plain.grad.abs().item() > 1e-6
    assert theta.grad.item() == pytest.approx(-lam * plain.grad.item(), rel=1e-12)


def test_ctkd_temperature_is_the_identity_forward_and_gradcheck_with_unit_negative_strength() -> None:
    theta = torch.tensor([0.3, -1.2], dtype=D, requires_grad=True)
    # strength -1 makes the reversal an ordinary identity, so finite differences apply
    assert torch.autograd.gradcheck(lambda t: KF.ctkd_temperature(t, -1.0), (theta,))


# --------------------------------------------------------------------------- WTTM / TTM

@pytest.mark.parametrize("gamma", [0.2, 0.1, 0.7])
@pytest.mark.parametrize("weighted", [True, False])
def test_wttm_matches_loop(gamma: float, weighted: bool) -> None:
    zs, zt = rnd(5, 8, seed=12, scale=3), rnd(5, 8, seed=13, scale=3)
    close(KF.wttm(zs, zt, gamma=gamma, weighted=weighted), wttm_ref(rows(zs), rows(zt), gamma, weighted))


def test_wttm_weight_bounds_and_defaults() -> None:
    zs, zt = rnd(5, 8, seed=14, scale=2), rnd(5, 8, seed=15, scale=2)
    close(KF.wttm(zs, zt), wttm_ref(rows(zs), rows(zt), 0.2, True))
    # U lies in [1, C^(1-gamma)] for 0 < gamma < 1, so WTTM lies between TTM and C^(1-gamma) TTM
    ttm = KF.wttm(zs, zt, weighted=False).item()
    assert ttm <= KF.wttm(zs, zt).item() <= 8 ** 0.8 * ttm
    # an overconfident teacher stays finite (log-space transform)
    zt_sharp = zt.clone()
    zt_sharp[:, 0] += 500.0
    assert torch.isfinite(KF.wttm(zs, zt_sharp))


# --------------------------------------------------------------------------- NKD

@pytest.mark.parametrize("T,gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_matches_loop(T: float, gamma: float) -> None:
    zs, zt = rnd(6, 7, seed=16, scale=3), rnd(6, 7, seed=17, scale=3)
    y = labels(6, 7, seed=18)
    close(KF.nkd(zs, zt, y, temperature=T, gamma=gamma), nkd_ref(rows(zs), rows(zt), y.tolist(), T, gamma))
    # labels shaped [B, 1] are the same labels
    close(KF.nkd(zs, zt, y[:, None], temperature=T, gamma=gamma), nkd_ref(rows(zs), rows(zt), y.tolist(), T, gamma))


def test_nkd_is_a_cross_entropy_not_zero_at_the_teacher() -> None:
    z = rnd(3, 5, seed=19, scale=2)
    y = torch.tensor([0, 2, 4])
    assert KF.nkd(z, z, y).item() > 0.1


# --------------------------------------------------------------------------- gradcheck (float64)

GRADCHECKS = {
    "dist": lambda zs, zt, y: KF.dist(zs, zt, 1.0, 1.0, 4.0),
    "logit_standardize": lambda zs, zt, y: KF.logit_standardize(zs),
    "wttm": lambda zs, zt, y: KF.wttm(zs, zt, 0.2, True),
    "ttm": lambda zs, zt, y: KF.wttm(zs, zt, 0.1, False),
    "nkd": lambda zs, zt, y: KF.nkd(zs, zt, y, 2.0, 1.5),
    "kd_ls": lambda zs, zt, y: KF.kd(KF.logit_standardize(zs), KF.logit_standardize(zt), 2.0),
}


@pytest.mark.parametrize("name", sorted(GRADCHECKS))
def test_gradcheck_student_logits(name: str) -> None:
    zs = rnd(4, 5, seed=20, scale=2).requires_grad_()
    zt, y = rnd(4, 5, seed=21, scale=2), labels(4, 5, seed=22)
    assert torch.autograd.gradcheck(lambda z: GRADCHECKS[name](z, zt, y), (zs,))


# --------------------------------------------------------------------------- tensor temperature: kd, dkd

def dkd_before_log_space(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
                         T: float) -> torch.Tensor:
    """DKD as it stood before the log-space teacher (a probability target in NCKD's kl_div)."""
    gt = nnf.one_hot(y, zs.shape[1]).bool()
    a, b = zs / T, zt / T
    ls, lt = nnf.log_softmax(a, dim=1), nnf.log_softmax(b, dim=1)
    low = torch.finfo(ls.dtype).min

    def binary(logp: torch.Tensor) -> torch.Tensor:
        return torch.stack([logp.masked_fill(~gt, low).logsumexp(1), logp.masked_fill(gt, low).logsumexp(1)], 1)

    n = zs.shape[0]
    tckd = nnf.kl_div(binary(ls), binary(lt), reduction="sum", log_target=True) * T ** 2 / n
    shift = 1000.0 * gt.to(a.dtype)
    nckd = nnf.kl_div(nnf.log_softmax(a - shift, dim=1), nnf.softmax(b - shift, dim=1), reduction="sum") * T ** 2 / n
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 2.0, 15.6)])
def test_dkd_values_unchanged_at_float_temperature(dtype: torch.dtype, alpha: float, beta: float, T: float) -> None:
    zs, zt = rnd(6, 9, seed=23, scale=3, dtype=dtype), rnd(6, 9, seed=24, scale=3, dtype=dtype)
    y = labels(6, 9, seed=25)
    got = KF.dkd(zs, zt, y, alpha, beta, T)
    rel = 1e-10 if dtype == D else 1e-5
    close(got, dkd_ref(rows(zs), rows(zt), y.tolist(), alpha, beta, T), rel=rel, abs_=1e-7 if dtype != D else 1e-12)
    torch.testing.assert_close(got, dkd_before_log_space(zs, zt, y, alpha, beta, T),
                               rtol=1e-12 if dtype == D else 1e-5, atol=1e-12 if dtype == D else 1e-6)


@pytest.mark.parametrize("fn", ["kd", "dkd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, D])
def test_tensor_temperature_gives_the_float_value_and_a_finite_gradient(fn: str, dtype: torch.dtype) -> None:
    zs = rnd(5, 10, seed=26, scale=3, dtype=dtype).requires_grad_()
    zt = rnd(5, 10, seed=27, scale=3, dtype=dtype)
    y = labels(5, 10, seed=28)
    call = (lambda t: KF.kd(zs, zt, t)) if fn == "kd" else (lambda t: KF.dkd(zs, zt, y, 1.0, 8.0, t))
    T = torch.tensor(3.0, requires_grad=True)
    loss = call(T)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.detach(), call(3.0).detach(), rtol=1e-6, atol=0)
    loss.backward()
    assert T.grad is not None and torch.isfinite(T.grad) and T.grad.abs() > 0
    assert torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("fn", ["kd", "dkd"])
def test_tensor_temperature_gradcheck(fn: str) -> None:
    zs, zt, y = rnd(4, 6, seed=29, scale=3), rnd(4, 6, seed=30, scale=3), labels(4, 6, seed=31)
    T = torch.tensor(2.5, dtype=D, requires_grad=True)
    call = (lambda t: KF.kd(zs, zt, t)) if fn == "kd" else (lambda t: KF.dkd(zs, zt, y, 1.0, 2.0, t))
    assert torch.autograd.gradcheck(call, (T,))


def test_dkd_tensor_temperature_under_ctkd() -> None:
    zs, zt, y = rnd(4, 6, seed=32, scale=3), rnd(4, 6, seed=33, scale=3), labels(4, 6, seed=34)
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)
    T = KF.ctkd_temperature(theta, 0.5)
    close(KF.dkd(zs, zt, y, 1.0, 2.0, T), dkd_ref(rows(zs), rows(zt), y.tolist(), 1.0, 2.0, T.item()))
    KF.dkd(zs, zt, y, 1.0, 2.0, T).backward()
    assert torch.isfinite(theta.grad) and theta.grad.abs() > 0


# --------------------------------------------------------------------------- dtype rules

DTYPE_CASES = {
    "dist": lambda zs, zt, y: KF.dist(zs, zt),
    "logit_standardize": lambda zs, zt, y: KF.logit_standardize(zs),
    "wttm": lambda zs, zt, y: KF.wttm(zs, zt),
    "ttm": lambda zs, zt, y: KF.wttm(zs, zt, weighted=False),
    "nkd": lambda zs, zt, y: KF.nkd(zs, zt, y),
    "kd_tensor_T": lambda zs, zt, y: KF.kd(zs, zt, torch.tensor(2.0)),
    "dkd_tensor_T": lambda zs, zt, y: KF.dkd(zs, zt, y, temperature=torch.tensor(2.0)),
    "ctkd_temperature": lambda zs, zt, y: KF.ctkd_temperature(zs[0, 0], 0.5),
}


@pytest.mark.parametrize("name", sorted(DTYPE_CASES))
def test_dtype_rules(name: str) -> None:
    fn = DTYPE_CASES[name]
    base, base_t, y = rnd(4, 6, seed=35, scale=2), rnd(4, 6, seed=36, scale=2), labels(4, 6, seed=37)
    assert fn(base, base_t, y).dtype == D
    assert fn(base.float(), base_t.float(), y).dtype == torch.float32
    zs_h = base.to(torch.bfloat16).requires_grad_()
    zt_h = base_t.to(torch.bfloat16)
    got = fn(zs_h, zt_h, y)
    assert got.dtype == torch.float32
    # bf16 inputs are upcast: the value is the float64 one on the rounded inputs, to float32 accuracy
    want = fn(zs_h.detach().double(), zt_h.double(), y)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    got.sum().backward()
    assert zs_h.grad is not None and zs_h.grad.dtype == torch.bfloat16 and torch.isfinite(zs_h.grad.float()).all()


# --------------------------------------------------------------------------- MLKD

def batch_level_ref(zs: list[list[float]], zt: list[list[float]], T: float) -> float:
    ps = [softmax_ref([v / T for v in r]) for r in zs]
    pt = [softmax_ref([v / T for v in r]) for r in zt]
    n = len(ps)
    total = 0.0
    for i in range(n):
        for j in range(n):
            gs = sum(a * b for a, b in zip(ps[i], ps[j]))
            gt = sum(a * b for a, b in zip(pt[i], pt[j]))
            total += (gt - gs) ** 2
    return total / n


def class_level_ref(zs: list[list[float]], zt: list[list[float]], T: float) -> float:
    ps = [softmax_ref([v / T for v in r]) for r in zs]
    pt = [softmax_ref([v / T for v in r]) for r in zt]
    c = len(ps[0])
    total = 0.0
    for a in range(c):
        for b in range(c):
            gs = sum(r[a] * r[b] for r in ps)
            gt = sum(r[a] * r[b] for r in pt)
            total += (gt - gs) ** 2
    return total / c


def mlkd_ref(sw, tw, ss, ts, T0: float, standardize: bool) -> float:
    q = [softmax_ref(r) for r in tw]
    conf = [max(r) for r in q]
    mass = [sum(r[j] for r in q) for j in range(len(q[0]))]
    f_b = sum(c <= median_ref(conf) for c in conf) / len(conf)
    f_c = sum(k <= median_ref(mass) for k in mass) / len(mass)
    z = standardize_ref if standardize else (lambda x: x)
    temps = [T0, 3.0, 5.0, 2.0, 6.0]
    total = sum(f_b * kd_ref(z(sw), z(tw), t) for t in temps)
    total += sum(kd_ref(z(ss), z(ts), t) for t in temps[:3]) + sum(kd_ref(z(sw), z(tw), t) for t in temps[3:])
    total += sum(f_c * class_level_ref(sw, tw, t) + f_b * batch_level_ref(sw, tw, t) for t in temps)
    return total


@pytest.mark.parametrize("T", [4.0, 1.0])
def test_mlkd_batch_and_class_levels_match_loops(T: float) -> None:
    zs, zt = rnd(5, 4, seed=40, scale=3), rnd(5, 4, seed=41, scale=3)
    close(KF.mlkd_batch(zs, zt, T), batch_level_ref(rows(zs), rows(zt), T), abs_=1e-15)
    close(KF.mlkd_class(zs, zt, T), class_level_ref(rows(zs), rows(zt), T), abs_=1e-15)
    assert KF.mlkd_batch(zt, zt, T).item() == 0.0 and KF.mlkd_class(zt, zt, T).item() == 0.0


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("standardize", [False, True])
def test_mlkd_matches_loop(n: int, standardize: bool) -> None:
    sw, tw, ss, ts = (rnd(n, 5, seed=s, scale=3) for s in (42, 43, 44, 45))
    got = KF.mlkd(sw, tw, ss, ts, temperature=4.0, standardize=standardize)
    close(got, mlkd_ref(rows(sw), rows(tw), rows(ss), rows(ts), 4.0, standardize), rel=1e-9)


def test_mlkd_confidence_fractions_by_hand() -> None:
    # distinct values: f_b = 1/2 for even B, (B+1)/(2B) for odd B; f_c = 3/5 for C = 5 classes.
    # With the strong view's student equal to its teacher, the strong-view KD terms vanish and
    # mlkd - KD(weak, 2) - KD(weak, 6) = f_b * sum_T (KD + batch level) + f_c * sum_T class level.
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    for n, f_b in ((6, 0.5), (7, 4 / 7)):
        sw, tw, ts = rnd(n, 5, seed=46, scale=3), rnd(n, 5, seed=47, scale=3), rnd(n, 5, seed=48, scale=3)
        got = KF.mlkd(sw, tw, ts, ts, 4.0) - KF.kd(sw, tw, 2.0) - KF.kd(sw, tw, 6.0)
        want = sum(f_b * (KF.kd(sw, tw, t) + KF.mlkd_batch(sw, tw, t)) + 0.6 * KF.mlkd_class(sw, tw, t)
                   for t in temps)
        close(got, want.item(), rel=1e-9)


def test_mlkd_gradcheck_and_dtype() -> None:
    sw = rnd(4, 5, seed=48, scale=2).requires_grad_()
    ss = rnd(4, 5, seed=49, scale=2).requires_grad_()
    tw, ts = rnd(4, 5, seed=50, scale=2), rnd(4, 5, seed=51, scale=2)
    assert torch.autograd.gradcheck(lambda a, b: KF.mlkd(a, tw, b, ts, 4.0, True), (sw, ss))
    assert KF.mlkd(sw.to(torch.bfloat16), tw.to(torch.bfloat16), ss.to(torch.bfloat16),
                   ts.to(torch.bfloat16)).dtype == torch.float32
