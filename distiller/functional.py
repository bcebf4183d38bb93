"""The pure functional core of every distillation loss: tensors in, a 0-dim loss out.

Methods (``distiller/methods``) own the trainable helpers and the choice of
features; the formulas live here so that each one can be tested on its own
against a naive computation. ``docs/METHODS.md`` ("Exact semantics of
``distiller.functional``") is the specification.

Precision: every public loss upcasts float16 / bfloat16 inputs to float32 and
runs with autocast disabled for the inputs' device, because softmax, log,
L2-normalisation, Gram matrices and large sums lose too much in half precision
(a bf16 sum of a few thousand squares is off by percents). Gradients still flow
back to the half-precision inputs through the cast. The result is float32 for
half-precision inputs and keeps the input dtype otherwise (float64 stays float64).

Gradient: teacher-side tensors are expected not to require gradient (the teacher
runs under ``no_grad``); nothing here detaches except where the paper's loss
does (the teacher-teacher term of :func:`nst`) and in the 2023-2026 section at the
end, whose losses detach their teacher-side inputs as their specification says.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

__all__ = [
    "kd", "hint", "attention", "similarity", "correlation", "correlation_gram", "correlation_rbf",
    "vid", "rkd", "pkt", "ab", "factor_transfer", "fsp_matrix", "fsp", "nst", "crd_nce", "ofd",
    "ofd_margin", "dkd", "hcl", "dist", "logit_standardize", "ctkd_lambda", "ctkd_temperature", "wttm", "nkd",
    "mlkd_batch", "mlkd_class", "mlkd",
    "rld", "luminet", "skd", "skd_mahalanobis", "abkd", "eakd_weight", "eakd_kd", "eakd_dkd", "normkd",
    "normkd_dkd", "wkd_logit", "sdd_region_logits", "sdd_kd", "sdd_dkd", "sdd_nkd", "class_activation_maps",
    "cat_kd", "wkd_feature",
]

_HALF = (torch.float16, torch.bfloat16)
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


# --------------------------------------------------------------------------- helpers

def _upcast(x: Any) -> Any:
    """float16/bfloat16 tensors (also inside lists/tuples) to float32; anything else unchanged."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in _HALF else x
    if isinstance(x, (list, tuple)):
        return type(x)(_upcast(v) for v in x)
    return x


def _device_type(args: Sequence[Any]) -> str | None:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            found = _device_type(a)
            if found is not None:
                return found
    return None


def _full_precision(fn: _Fn) -> _Fn:
    """Run ``fn`` on float32-or-wider inputs with autocast off (see module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        dev = _device_type((*args, *kwargs.values()))
        # Under an outer autocast region matmuls would silently drop back to half precision.
        if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _pool_to_match(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger to the smaller one's H x W."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector [C] shaped to broadcast over ``like`` [B, C, ...]."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def _spatial_attention(f: Tensor, p: float) -> Tensor:
    """L2-normalised map of mean_c(f^p), flattened to [B, H*W] (AT and FT's factor)."""
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1), dim=1)


# --------------------------------------------------------------------------- logits

@_full_precision
def kd(logits_s: Tensor, logits_t: Tensor, temperature: float | Tensor = 4.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` summed over classes, mean over batch.

    ``temperature`` may be a 0-dim tensor that requires gradient (CTKD's learned T).
    """
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    log_p_t = F.log_softmax(logits_t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * temperature ** 2 / logits_s.shape[0]


def _kl_rows(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    """``KL(p_t || p_s)`` summed over dim 1 (the classes), from log-probabilities; one value per row."""
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)


def _binary_log_probs(log_p: Tensor, mask: Tensor) -> Tensor:
    """log of (the probability mass in ``mask``, the mass outside it) along dim 1, stacked on dim 1.

    By logsumexp of the log-probabilities: equal to ``log(sum p)`` but finite when one side's
    mass underflows (a very confident network).
    """
    low = torch.finfo(log_p.dtype).min
    return torch.stack([log_p.masked_fill(~mask, low).logsumexp(1), log_p.masked_fill(mask, low).logsumexp(1)], 1)


def _dkd_rows(zs: Tensor, zt: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """DKD's per-sample TCKD and NCKD, without the ``T^2`` factor, of already temperature-scaled logits.

    ``gt`` is the one-hot label mask along dim 1 (broadcastable to ``zs``; extra trailing dims,
    e.g. SDD's regions, are carried through). NCKD removes the label by subtracting 1000 from its
    scaled logit (exactly zero probability in float32/64), as the reference does.
    """
    tckd = _kl_rows(_binary_log_probs(F.log_softmax(zs, dim=1), gt), _binary_log_probs(F.log_softmax(zt, dim=1), gt))
    shift = 1000.0 * gt.to(zs.dtype)
    return tckd, _kl_rows(F.log_softmax(zs - shift, dim=1), F.log_softmax(zt - shift, dim=1))


@_full_precision
def dkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float | Tensor = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary (target, rest) distributions, NCKD the KL
    between the softmaxes over the non-target classes; both ``T^2 * sum / B``.
    The binary log-probabilities come from logsumexp of the log-softmax (equal to
    the reference's ``log(sum p)`` but finite when the student is very confident).
    As in the reference, NCKD masks the target class by subtracting 1000 from its
    scaled logit, which in float32 gives it exactly zero teacher probability. The
    teacher side is kept in log space (``log_target=True``): with a probability target,
    ``kl_div``'s gradient with respect to that exact zero is NaN (0 * log 0), and a
    0-dim tensor ``temperature`` that requires gradient (CTKD) receives it.
    """
    gt = F.one_hot(target.reshape(-1).long(), logits_s.shape[1]).bool()
    tckd, nckd = _dkd_rows(logits_s / temperature, logits_t / temperature, gt)
    return temperature ** 2 * (alpha * tckd.mean() + beta * nckd.mean())


def _centred_cosine(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """DIST's ``rho`` along ``dim``: cosine of the mean-centred vectors, ``eps`` added once to the norms' product."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


@_full_precision
def dist(logits_s: Tensor, logits_t: Tensor, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 4.0) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``tau^2 * (beta * inter + gamma * intra)``.

    On ``Y = softmax(z / tau)``: ``inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (each sample
    across its classes), ``intra = 1 - mean_j rho(Y_s[:, j], Y_t[:, j])`` (each class across
    the batch, so the term depends on the batch's composition). ``rho`` is the Pearson
    correlation with 1e-8 added to the product of the centred norms (a constant vector
    gives 0). The ``tau^2`` factor is the authors' code's (their paper omits it).
    """
    y_s = F.softmax(logits_s / temperature, dim=1)
    y_t = F.softmax(logits_t / temperature, dim=1)
    inter = 1.0 - _centred_cosine(y_s, y_t, dim=1).mean()
    intra = 1.0 - _centred_cosine(y_s, y_t, dim=0).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


@_full_precision
def logit_standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): ``(z - mean_c z) / (std_c z + eps)`` per sample.

    ``std`` is unbiased (divisor C - 1) and ``eps`` is added to it, not under the root; the
    gradient flows through both mean and std. A constant row gives zeros (its std's own
    gradient is undefined; only teacher rows, which need none, are ever constant).
    ``kd(logit_standardize(z_s), logit_standardize(z_t), T)`` is KD+LS, likewise for ``dkd``.
    """
    centred = logits - logits.mean(dim=1, keepdim=True)
    return centred / (logits.std(dim=1, keepdim=True) + eps)


def ctkd_lambda(epoch: int, lambda_min: float = 0.0, lambda_max: float = 1.0, ramp_epochs: int = 10) -> float:
    """CTKD's reversal strength at ``epoch`` (counted from 1): a cosine ramp from ``lambda_min``
    to ``lambda_max`` over ``ramp_epochs`` epochs, ``lambda_max`` after; epoch <= 0 gives ``lambda_min``.
    """
    if ramp_epochs <= 0:
        raise UserError(f"ctkd ramp_epochs={ramp_epochs} must be a positive number of epochs")
    e = min(max(epoch, 0), ramp_epochs)
    return lambda_min + (lambda_max - lambda_min) * (1.0 - math.cos(math.pi * e / ramp_epochs)) / 2.0


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-strength``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


@_full_precision
def ctkd_temperature(theta: Tensor, lambda_: float, t_min: float = 1.0, t_range: float = 20.0) -> Tensor:
    """CTKD's temperature ``t_min + t_range * sigmoid(r(theta))``, shaped like ``theta``.

    ``r`` is gradient reversal with strength ``lambda_`` (positive): the student descends the
    logit loss while ``theta`` ascends it, which makes distillation harder as ``lambda_`` grows.
    """
    return t_min + t_range * torch.sigmoid(_GradientReversal.apply(theta, float(lambda_)))


@_full_precision
def wttm(logits_s: Tensor, logits_t: Tensor, gamma: float = 0.2, weighted: bool = True) -> Tensor:
    """(Weighted) transformed teacher matching (Zheng and Yang, ICLR 2024).

    The teacher's power transform ``q = softmax(z_t)^gamma / U`` is ``softmax(gamma * z_t)``
    (the teacher at temperature 1/gamma); the student stays at temperature 1.
    TTM (``weighted=False``) is ``mean_i KL(q_i || softmax(z_s,i))``, no ``T^2`` factor; WTTM
    weights sample i by ``U_i = sum_c softmax(z_t,i)_c^gamma``, from its log-sum-exp form.
    """
    log_q = F.log_softmax(gamma * logits_t, dim=1)
    kl = F.kl_div(F.log_softmax(logits_s, dim=1), log_q, reduction="none", log_target=True).sum(1)
    if weighted:
        kl = torch.logsumexp(gamma * F.log_softmax(logits_t, dim=1), dim=1).exp() * kl
    return kl.mean()


@_full_precision
def nkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 1.0,
        gamma: float = 1.5) -> Tensor:
    """Normalized KD (Yang et al., ICCV 2023): target term plus non-target term, both cross-entropies.

    ``L_t = -mean_i p_t[i, y_i] log p_s[i, y_i]`` at temperature 1; the label's column is
    removed from both logit sets and ``L_nt = -gamma * T^2 * mean_i sum_j t_ij log s_ij``
    with ``s``, ``t`` the softmaxes of the remaining C - 1 logits at ``T``. Not 0 when the
    student equals the teacher (the teacher's entropies are included); gradients are KL's.
    """
    b, c = logits_s.shape
    y = target.reshape(-1, 1).long()
    target_term = -(F.softmax(logits_t, dim=1).gather(1, y) * F.log_softmax(logits_s, dim=1).gather(1, y)).mean()
    keep = ~F.one_hot(y.reshape(-1), c).bool()
    log_s = F.log_softmax(logits_s[keep].reshape(b, c - 1) / temperature, dim=1)
    p_t = F.softmax(logits_t[keep].reshape(b, c - 1) / temperature, dim=1)
    return target_term - gamma * temperature ** 2 * (p_t * log_s).sum(1).mean()


@_full_precision
def mlkd_batch(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0) -> Tensor:
    """MLKD's batch level: ``||P_t P_t^T - P_s P_s^T||_F^2 / B`` of the [B, B] sample similarities
    of ``P = softmax(z / T)``; no ``T^2`` factor."""
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / logits_s.shape[0]


@_full_precision
def mlkd_class(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0) -> Tensor:
    """MLKD's class level: ``||P_t^T P_t - P_s^T P_s||_F^2 / C`` of the [C, C] class correlations
    of ``P = softmax(z / T)``; no ``T^2`` factor."""
    p_s = F.softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / logits_s.shape[1]


def _fraction_at_or_below_median(values: Tensor) -> Tensor:
    """The share of ``values`` <= their median (linearly interpolated, numpy's default)."""
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


@_full_precision
def mlkd(logits_s_weak: Tensor, logits_t_weak: Tensor, logits_s_strong: Tensor, logits_t_strong: Tensor,
         temperature: float = 4.0, standardize: bool = False) -> Tensor:
    """Multi-Level Logit Distillation (Jin et al., CVPR 2023) as released: the unweighted distillation term.

    Temperatures ``(T0, 3, 5, 2, 6)`` with ``T0 = temperature``. ``f_b`` and ``f_c`` are the
    shares of samples (max probability) and classes (summed probability) at or below their
    median, from the teacher's weak view at temperature 1. The sum: ``f_b * KD`` on the weak
    view at every T; KD on the strong view at T0, 3, 5 and on the weak view at 2 and 6 (the
    released code's choice); ``f_c * mlkd_class`` and ``f_b * mlkd_batch`` on the weak view at
    every T. The masks only scale batch scalars, as in the released code. ``standardize``
    applies :func:`logit_standardize` inside the KD terms only (MLKD+LS).
    """
    temps = (temperature, 3.0, 5.0, 2.0, 6.0)
    with torch.no_grad():
        q = F.softmax(logits_t_weak, dim=1)
        f_b = _fraction_at_or_below_median(q.max(dim=1).values)
        f_c = _fraction_at_or_below_median(q.sum(dim=0))

    def kd_term(a: Tensor, b: Tensor, t: float) -> Tensor:
        return kd(logit_standardize(a), logit_standardize(b), t) if standardize else kd(a, b, t)

    total = logits_s_weak.new_zeros(())
    for t in temps:
        total = total + f_b * kd_term(logits_s_weak, logits_t_weak, t)
    for t in temps[:3]:
        total = total + kd_term(logits_s_strong, logits_t_strong, t)
    for t in temps[3:]:
        total = total + kd_term(logits_s_weak, logits_t_weak, t)
    for t in temps:
        total = total + f_c * mlkd_class(logits_s_weak, logits_t_weak, t)
        total = total + f_b * mlkd_batch(logits_s_weak, logits_t_weak, t)
    return total


# --------------------------------------------------------------------------- feature maps

@_full_precision
def hint(f_s: Tensor, f_t: Tensor) -> Tensor:
    """FitNets hint: mean squared error over all elements (shapes must match)."""
    return F.mse_loss(f_s, f_t)


@_full_precision
def attention(f_s: Tensor, f_t: Tensor, p: float = 2) -> Tensor:
    """Attention transfer for one pair: ``mean((a(f_s) - a(f_t))^2)``, maps pooled to match.

    ``a(f)`` is the row-L2-normalised spatial map ``mean_c(f^p)``; channel counts may differ.
    """
    f_s, f_t = _pool_to_match(f_s, f_t)
    return (_spatial_attention(f_s, p) - _spatial_attention(f_t, p)).pow(2).mean()


@_full_precision
def similarity(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Similarity-preserving KD: row-normalised batch Gram matrices, ``sum((G_t - G_s)^2) / B^2``."""
    b = f_s.shape[0]

    def gram(f: Tensor) -> Tensor:
        flat = f.reshape(b, -1)
        return F.normalize(flat @ flat.t(), dim=1)

    return (gram(f_t) - gram(f_s)).pow(2).sum() / (b * b)


@_full_precision
def correlation(e_s: Tensor, e_t: Tensor) -> Tensor:
    """CC as benchmarked by RepDistiller: ``D = |e_s - e_t|``, ``mean_i sum_d D[i] * D[i+1]``.

    Consecutive samples of the batch are paired (i = 0..B-2), so B must be >= 2.
    """
    d = (e_s - e_t).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


@_full_precision
def correlation_gram(e_s: Tensor, e_t: Tensor) -> Tensor:
    """CC, Gram variant: ``G = E E^T / ||E E^T||_F`` per network, ``sum((G_t - G_s)^2) / B^2``."""
    b = e_s.shape[0]

    def gram(e: Tensor) -> Tensor:
        flat = e.reshape(b, -1)
        g = flat @ flat.t()
        return g / g.norm()

    return (gram(e_t) - gram(e_s)).pow(2).sum() / (b * b)


@_full_precision
def correlation_rbf(e_s: Tensor, e_t: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """CC as in its paper: Gaussian-RBF sample correlations by Taylor expansion, then MSE.

    For L2-normalised rows, ``exp(-gamma ||x_i - x_j||^2) = exp(-2 gamma) exp(2 gamma <x_i, x_j>)``;
    the second factor is expanded to ``order``: ``sum_p (2 gamma)^p / p! * <x_i, x_j>^p``.
    Result: mean over the B x B entries of the squared difference of the two matrices.
    """
    b = e_s.shape[0]

    def corr(e: Tensor) -> Tensor:
        x = F.normalize(e.reshape(b, -1), dim=1)
        sim = x @ x.t()
        out = torch.zeros_like(sim)
        for k in range(order + 1):
            out = out + (2 * gamma) ** k / math.factorial(k) * sim.pow(k)
        return math.exp(-2 * gamma) * out

    return (corr(e_s) - corr(e_t)).pow(2).mean()


@_full_precision
def vid(pred_mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """VID negative log-likelihood of ``target`` under N(pred_mean, var), var per channel.

    ``var = softplus(log_scale) + eps``; result ``mean(0.5 * ((mu - t)^2 / var + log var))``.
    ``pred_mean`` and ``target`` have the same shape [B, C, ...] (the method pools and regresses).
    """
    var = _channel_view(F.softplus(log_scale) + eps, target)
    return (0.5 * ((pred_mean - target).pow(2) / var + var.log())).mean()


@_full_precision
def ab(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss (alternative L2), summed over all elements without averaging.

    Penalises the student's pre-activation on the wrong side of ``+-margin`` where the
    teacher's neuron is off (``t <= 0``) or on (``t > 0``).
    """
    off = (source > -margin) & (target <= 0)
    on = (source <= margin) & (target > 0)
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


@_full_precision
def factor_transfer(f_s: Tensor, f_t: Tensor, p1: float = 2, p2: float = 1) -> Tensor:
    """Factor transfer on one (pooled-to-match) pair of factor maps.

    ``phi(f)`` is the row-normalised ``mean_c(f^p1)``; result ``mean|phi_s - phi_t|`` for
    ``p2 == 1`` else ``mean((phi_s - phi_t)^p2)``.
    """
    f_s, f_t = _pool_to_match(f_s, f_t)
    diff = _spatial_attention(f_s, p1) - _spatial_attention(f_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


@_full_precision
def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """FSP ("flow of solution procedure") matrix [B, C1, C2] of two maps of one network.

    ``G[b, i, j] = mean_hw(bottom[b, i] * top[b, j])`` after pooling to match.
    """
    bottom, top = _pool_to_match(bottom, top)
    b = bottom.shape[0]
    lo = bottom.reshape(b, bottom.shape[1], -1)
    hi = top.reshape(b, top.shape[1], -1)
    return lo @ hi.transpose(1, 2) / lo.shape[2]


@_full_precision
def fsp(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """FSP loss (Yim et al., CVPR 2017): per consecutive pair (k, k+1), MSE of the FSP
    matrices of student and teacher, summed over pairs.

    Raises:
        UserError: when the lists differ in length or the channel counts differ at any
            tapped position (the FSP matrices would not have the same shape).
    """
    if len(feats_s) != len(feats_t):
        raise UserError(f"fsp needs as many student as teacher feature maps, got {len(feats_s)} "
                        f"student and {len(feats_t)} teacher; tap the same positions in both networks")
    if len(feats_s) < 2:
        raise UserError(f"fsp needs at least 2 tapped feature maps per network, got {len(feats_s)}; "
                        "tap the stem and the stages")
    bad = [f"position {i} (student {s.shape[1]}, teacher {t.shape[1]} channels)"
           for i, (s, t) in enumerate(zip(feats_s, feats_t)) if s.shape[1] != t.shape[1]]
    if bad:
        raise UserError("fsp needs equal student and teacher channel counts at every tapped position, "
                        f"mismatched at {', '.join(bad)}; pick a teacher/student pair of the same width "
                        "(e.g. resnet110 -> resnet20) or another method")
    total = feats_s[0].new_zeros(())
    for k in range(len(feats_s) - 1):
        g_s = fsp_matrix(feats_s[k], feats_s[k + 1])
        g_t = fsp_matrix(feats_t[k], feats_t[k + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


@_full_precision
def nst(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Neuron selectivity transfer: squared MMD with the polynomial kernel ``(a . b)^2``
    between channels (each flattened over H*W and L2-normalised), maps pooled to match.

    ``mean k(t, t)`` is detached, as in the reference implementation: it is a constant
    for the student and must not push gradient into a teacher that requires grad.
    """
    f_s, f_t = _pool_to_match(f_s, f_t)
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def k(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.transpose(1, 2)).pow(2).mean()

    return k(t, t).detach() + k(s, s) - 2 * k(s, t)


@_full_precision
def hcl(fs: Sequence[Tensor], ft: Sequence[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over pairs of same-shape maps.

    Per pair: ``mse`` plus, for ``l`` in (4, 2, 1) with ``l < H``, ``mse`` of the maps
    pooled to l x l weighted 1/2, 1/4, 1/8; divided by the sum of the weights used.
    """
    total = fs[0].new_zeros(())
    for a, b in zip(fs, ft):
        loss, weight, weight_sum = F.mse_loss(a, b), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= a.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(a, level), F.adaptive_avg_pool2d(b, level))
            weight_sum += weight
        total = total + loss / weight_sum
    return total


# --------------------------------------------------------------------------- embeddings

@_full_precision
def rkd(e_s: Tensor, e_t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """Relational KD (Park et al., CVPR 2019): ``wd * distance + wa * angle`` on flattened vectors.

    Distance: pairwise Euclidean distances (squared clamped at 1e-12, diagonal 0), each
    matrix divided by the mean of its positive entries, smooth-L1. Angle: for every anchor
    i the unit vectors towards every j, cosines among them ([B, B, B]), smooth-L1.
    Distances are taken from explicit differences rather than ``|a|^2 + |b|^2 - 2ab``,
    which cancels badly in float32 for near points; the differences are needed for the
    angle term anyway.
    """
    b = e_s.shape[0]
    off_diag = ~torch.eye(b, dtype=torch.bool, device=e_s.device)

    def relations(e: Tensor) -> tuple[Tensor, Tensor]:
        x = e.reshape(b, -1)
        diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[i, j] = x_j - x_i
        dist = diff.pow(2).sum(-1).clamp(min=1e-12).sqrt() * off_diag
        dist = dist / dist[dist > 0].mean()
        unit = F.normalize(diff, p=2, dim=2)
        angle = unit @ unit.transpose(1, 2)  # angle[i, j, k] = cos(x_j - x_i, x_k - x_i)
        return dist, angle.reshape(-1)

    d_s, a_s = relations(e_s)
    d_t, a_t = relations(e_t)
    return distance_weight * F.smooth_l1_loss(d_s, d_t) + angle_weight * F.smooth_l1_loss(a_s, a_t)


@_full_precision
def pkt(e_s: Tensor, e_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL-like divergence of cosine-similarity
    distributions, ``mean(P_t * log((P_t + eps) / (P_s + eps)))``.
    """
    b = e_s.shape[0]

    def prob(e: Tensor) -> Tensor:
        x = e.reshape(b, -1)
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = prob(e_s), prob(e_t)
    return (p_t * ((p_t + eps) / (p_s + eps)).log()).mean()


@_full_precision
def crd_nce(probs: Tensor, n_data: int) -> Tensor:
    """CRD's NCE loss for one anchor side; ``probs`` [B, 1+K] (a trailing singleton dim is
    accepted), column 0 the positive pair, all entries positive un-normalised probabilities.

    With ``m = K``, ``Pn = 1 / n_data``: ``-(sum_b log(x_b0 / (x_b0 + m Pn + eps))
    + sum_{b, k>0} log(m Pn / (x_bk + m Pn + eps))) / B``.
    """
    x = probs.reshape(probs.shape[0], probs.shape[1]) if probs.dim() == 3 else probs
    eps = 1e-7
    m = x.shape[1] - 1
    noise = m / float(n_data)
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = (pos / (pos + noise + eps)).log()
    log_d0 = (noise / (neg + noise + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


@_full_precision
def ofd(f_s: Tensor, f_t: Tensor, margin: Tensor) -> Tensor:
    """Overhaul of feature distillation, one stage: partial L2 to the margin-clipped teacher.

    ``t' = max(f_t, margin)``; ``sum((f_s - t')^2 * [f_s > t' or t' > 0]) / B``, so a
    student value below a negative teacher target costs nothing. ``margin`` is [C].
    """
    t = torch.maximum(f_t, _channel_view(margin.to(f_t.dtype), f_t))
    mask = (f_s > t) | (t > 0)
    return ((f_s - t).pow(2) * mask).sum() / f_s.shape[0]


@torch.no_grad()
def ofd_margin(bn: nn.Module) -> Tensor:
    """OFD margin per channel [C] from the teacher's BatchNorm before the ReLU.

    The BN output of channel c is modelled as N(beta, gamma^2) (bias, |weight|); the margin
    is the mean of its negative part, ``beta - s * pdf(beta/s) / Phi(-beta/s)``, or ``-3 s``
    where ``P(x < 0) = Phi(-beta/s) <= 0.001`` (the reference's condition). The ratio is
    taken as ``exp(log pdf - log_ndtr)`` so it stays finite for any beta/s; a zero gamma
    gives ``beta`` (beta < 0) or 0. Computed in float32 or wider, returned in that dtype.
    """
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    if weight is None or bias is None:
        raise UserError(f"ofd_margin needs an affine BatchNorm (weight and bias), got {bn!r}; "
                        "tap a model whose pre-activation BN is affine")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    s = weight.detach().to(dtype).abs().clamp(min=torch.finfo(dtype).tiny)
    m = bias.detach().to(dtype)
    z = -m / s
    log_p_neg = torch.special.log_ndtr(z)
    log_pdf = -0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)  # pdf is even: pdf(m/s) = pdf(z)
    truncated_mean = m - s * torch.exp(log_pdf - log_p_neg)
    return torch.where(torch.special.ndtr(z) > 0.001, truncated_mean, -3.0 * s)


# =========================================================================== methods of 2023-2026
# docs/METHODS_2025_LOGIT.md and docs/METHODS_2025_FEATURE.md ("Pinned functions") are the
# specification. Unlike the functions above, these detach their teacher-side inputs themselves
# (those documents: "Teacher tensors never carry gradient"), so a caller that forgets no_grad
# cannot push gradient into the teacher; the functions that build a teacher's tensors
# (sdd_region_logits, class_activation_maps) serve both networks and detach nothing.

# --------------------------------------------------------------------------- logits (2023-2026)

@_full_precision
def rld(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, alpha_temperature: float | None = None) -> Tensor:
    """Refined logit distillation (Sun et al., ICCV 2025): ``alpha * SCD + beta * MCD``.

    SCD, at ``T_a`` (``alpha_temperature``, None = ``temperature``): ``T_a^2 * mean_i KL`` of the
    binary distributions (student: label vs rest; teacher: its own top class vs rest). MCD, at
    ``T``: the classes the teacher scores at or above the label (ties included) are dropped from
    both logit sets (filled with -1e9 after the division by T, as the reference does), and
    ``T^2 * mean_i KL`` of the softmaxes over the rest. A row whose label is the teacher's lowest
    class is masked entirely: both rows are constant, the KL is exactly 0 with zero gradient
    (-inf masking would give NaN); the mean still divides by B. With the teacher right on every
    sample and ``T_a = T`` this is :func:`dkd`.
    """
    logits_t = logits_t.detach()
    t_a = temperature if alpha_temperature is None else alpha_temperature
    c = logits_s.shape[1]
    y = target.reshape(-1).long()
    label = F.one_hot(y, c).bool()
    top = F.one_hot(logits_t.argmax(dim=1), c).bool()
    scd = _kl_rows(_binary_log_probs(F.log_softmax(logits_s / t_a, dim=1), label),
                   _binary_log_probs(F.log_softmax(logits_t / t_a, dim=1), top)).mean() * t_a ** 2
    mask = logits_t >= logits_t.gather(1, y.unsqueeze(1))
    log_q_s = F.log_softmax((logits_s / temperature).masked_fill(mask, -1e9), dim=1)
    log_q_t = F.log_softmax((logits_t / temperature).masked_fill(mask, -1e9), dim=1)
    mcd = _kl_rows(log_q_s, log_q_t).mean() * temperature ** 2
    return alpha * scd + beta * mcd


@_full_precision
def luminet(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0, eps: float = 1e-5) -> Tensor:
    """LumiNet (Hossain et al., TMLR 2025), unweighted: ``mean_i KL(softmax(P(z_t)/T) || softmax(P(z_s)/T))``.

    ``P`` standardises each class over the batch (BatchNorm without affine parameters): biased
    variance, ``eps`` inside the square root, statistics not detached (the student's gradient
    flows through its batch mean and variance). No ``T^2`` factor: the method weights the term
    by ``ALPHA**2``. Batch-coupled; a batch of one sample gives 0.
    """
    def perceive(z: Tensor) -> Tensor:
        return (z - z.mean(dim=0, keepdim=True)) / torch.sqrt(z.var(dim=0, correction=0, keepdim=True) + eps)

    log_p_s = F.log_softmax(perceive(logits_s) / temperature, dim=1)
    log_p_t = F.log_softmax(perceive(logits_t.detach()) / temperature, dim=1)
    return _kl_rows(log_p_s, log_p_t).mean()


@_full_precision
def skd_mahalanobis(logits_s: Tensor, logits_t: Tensor, tikhonov: float = 0.1) -> Tensor:
    """SKD's Gram-Mahalanobis term: ``mean_i sqrt(D_i Sigma^-1 D_i^T)``.

    ``u = z / |z|`` per row; ``G = u u^T / C``; ``D = G_s - G_t`` [B, B]; ``Sigma`` the unbiased
    covariance of D's columns over its rows plus ``tikhonov * I``. Sigma comes from the student
    and is not detached. Numerics: ``Sigma = L L^T`` by Cholesky and ``D_i Sigma^-1 D_i^T =
    |L^-1 D_i^T|^2`` by one triangular solve (no explicit inverse). Sigma's eigenvalues lie in
    ``[tikhonov, tikhonov + |cov(D)|]`` and ``|D| <= 2 / C``, so its condition number stays near 1
    and float32 loses nothing that matters (the tests compare float32 with float64 at B=64, C=100).
    """
    b, c = logits_s.shape
    if not tikhonov > 0:
        raise UserError(f"skd tikhonov={tikhonov} must be > 0: it keeps the B x B covariance invertible")
    if b < 2:
        raise UserError(f"skd needs at least 2 samples per batch (unbiased covariance over the batch), got {b}")

    def gram(z: Tensor) -> Tensor:
        u = F.normalize(z, dim=1, eps=1e-12)
        return u @ u.t() / c

    d = gram(logits_s) - gram(logits_t.detach())
    centred = d - d.mean(dim=0, keepdim=True)
    sigma = centred.t() @ centred / (b - 1) + tikhonov * torch.eye(b, dtype=d.dtype, device=d.device)
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(sigma), d.t(), upper=False)
    return white.pow(2).sum(dim=0).sqrt().mean()


@_full_precision
def skd(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0, tikhonov: float = 0.1) -> Tensor:
    """Streamlined KD (CVPR 2026) as released, unweighted: ``frac_s * KD_T + frac_c * MD``.

    ``KD_T`` is :func:`kd`, ``MD`` is :func:`skd_mahalanobis`. ``frac_s`` and ``frac_c`` are the
    shares of samples (teacher's max probability) and classes (teacher's summed probability) at or
    below their median, at temperature 1: the released code multiplies its "confidence masks"
    onto already-reduced scalars, so they only rescale the two terms.
    """
    logits_t = logits_t.detach()
    with torch.no_grad():
        q = F.softmax(logits_t, dim=1)
        frac_s = _fraction_at_or_below_median(q.max(dim=1).values)
        frac_c = _fraction_at_or_below_median(q.sum(dim=0))
    return frac_s * kd(logits_s, logits_t, temperature) + frac_c * skd_mahalanobis(logits_s, logits_t, tikhonov)


@_full_precision
def abkd(logits_s: Tensor, logits_t: Tensor, alpha: float = 0.5, beta: float = 0.5,
         temperature: float = 4.0) -> Tensor:
    """ABKD (Wang et al., ICML 2025): ``mean_i`` of the alpha-beta divergence between
    ``p = softmax(z_t/T)`` and ``q = softmax(z_s/T)``, summed over classes; no ``T^2`` factor.

    The limits are taken in the reference's order: alpha = beta = 0, alpha = 0, beta = 0,
    alpha + beta = 0, then the general formula. Powers are ``exp(a * log p)`` from log-softmax.
    ``alpha=1, beta=0`` is ``KL(p || q)``; ABLSD is ``T**2 * abkd(logit_standardize(z_s),
    logit_standardize(z_t), alpha, beta, T)``.
    """
    log_p = F.log_softmax(logits_t.detach() / temperature, dim=1)
    log_q = F.log_softmax(logits_s / temperature, dim=1)
    if alpha == 0 and beta == 0:
        div = 0.5 * (log_q - log_p).pow(2)
    elif alpha == 0:
        q_b = torch.exp(beta * log_q)
        div = (q_b * beta * (log_q - log_p) - q_b + torch.exp(beta * log_p)) / beta
    elif beta == 0:
        p_a = torch.exp(alpha * log_p)
        div = (p_a * alpha * (log_p - log_q) - p_a + torch.exp(alpha * log_q)) / alpha
    elif alpha + beta == 0:
        div = (alpha * (log_q - log_p) + torch.exp(alpha * (log_p - log_q)) - 1.0) / alpha
    else:
        s = alpha + beta
        div = -(torch.exp(alpha * log_p + beta * log_q) - alpha / s * torch.exp(s * log_p)
                - beta / s * torch.exp(s * log_q)) / (alpha * beta)
    return div.sum(dim=1).mean()


@_full_precision
def eakd_weight(logits_s: Tensor, logits_t: Tensor, entropy_temperature: float = 3.0,
                h_ub: float | None = None) -> Tensor:
    """EA-KD's per-sample weight [B] (Su et al., ICCV 2025): ``w_i = H_t,i (1 + H_s,i / H_ub) / 2``.

    Entropies of ``softmax(z / entropy_temperature)`` of each network's raw logits (exact entropy).
    ``h_ub=None`` means ``log C``; the released CIFAR code used 100, which its presets must pass.
    Computed without gradient: the weight is a constant to both networks.
    """
    if h_ub is not None and not h_ub > 0:
        raise UserError(f"eakd h_ub={h_ub} must be > 0 (or None for log C)")
    with torch.no_grad():
        def entropy(z: Tensor) -> Tensor:
            log_p = F.log_softmax(z / entropy_temperature, dim=1)
            return -(log_p.exp() * log_p).sum(dim=1)

        bound = math.log(logits_s.shape[1]) if h_ub is None else h_ub
        return 0.5 * entropy(logits_t) * (1.0 + entropy(logits_s) / bound)


@_full_precision
def eakd_kd(logits_s: Tensor, logits_t: Tensor, temperature: float = 4.0, entropy_temperature: float = 3.0,
            h_ub: float | None = None) -> Tensor:
    """EA-KD on KD: ``mean_i w_i * T^2 * KL(softmax(z_t,i/T) || softmax(z_s,i/T))``, ``w`` from :func:`eakd_weight`."""
    logits_t = logits_t.detach()
    w = eakd_weight(logits_s, logits_t, entropy_temperature, h_ub)
    kl = _kl_rows(F.log_softmax(logits_s / temperature, dim=1), F.log_softmax(logits_t / temperature, dim=1))
    return (w * kl).mean() * temperature ** 2


@_full_precision
def eakd_dkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0, entropy_temperature: float = 3.0, h_ub: float | None = None) -> Tensor:
    """EA-KD on DKD: ``mean_i w_i * T^2 * (alpha TCKD_i + beta NCKD_i)``, DKD's per-sample terms."""
    logits_t = logits_t.detach()
    w = eakd_weight(logits_s, logits_t, entropy_temperature, h_ub)
    gt = F.one_hot(target.reshape(-1).long(), logits_s.shape[1]).bool()
    tckd, nckd = _dkd_rows(logits_s / temperature, logits_t / temperature, gt)
    return (w * (alpha * tckd + beta * nckd)).mean() * temperature ** 2


def _normkd_temperatures(logits_s: Tensor, logits_t: Tensor, t_norm: float) -> tuple[Tensor, Tensor]:
    """NormKD's per-sample temperatures [B, 1]: ``t_norm`` times each row's unbiased std (no eps)."""
    return t_norm * logits_s.std(dim=1, keepdim=True), t_norm * logits_t.std(dim=1, keepdim=True)


@_full_precision
def normkd(logits_s: Tensor, logits_t: Tensor, t_norm: float = 2.0) -> Tensor:
    """NormKD (Chi et al., 2023): ``mean_i T_t,i^2 * KL(softmax(z_t,i/T_t,i) || softmax(z_s,i/T_s,i))``.

    ``T_.,i = t_norm * std_c(z_.,i)`` (unbiased, no eps); the student's std is not detached, so its
    gradient flows through ``T_s,i``. The ``T^2`` compensation uses the teacher's temperature. A
    constant row divides by zero (not guarded, as in the reference).
    """
    logits_t = logits_t.detach()
    t_s, t_t = _normkd_temperatures(logits_s, logits_t, t_norm)
    kl = _kl_rows(F.log_softmax(logits_s / t_s, dim=1), F.log_softmax(logits_t / t_t, dim=1))
    return (t_t.squeeze(1) ** 2 * kl).mean()


@_full_precision
def normkd_dkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
               t_norm: float = 2.0) -> Tensor:
    """NormKD+DKD: DKD's per-sample TCKD and NCKD on ``z_t,i / T_t,i`` and ``z_s,i / T_s,i`` (the label
    removed by subtracting 1000 after the division), each weighted by ``T_t,i^2`` and averaged:
    ``alpha * mean_i T_t,i^2 TCKD_i + beta * mean_i T_t,i^2 NCKD_i``.
    """
    logits_t = logits_t.detach()
    t_s, t_t = _normkd_temperatures(logits_s, logits_t, t_norm)
    gt = F.one_hot(target.reshape(-1).long(), logits_s.shape[1]).bool()
    tckd, nckd = _dkd_rows(logits_s / t_s, logits_t / t_t, gt)
    weight = t_t.squeeze(1) ** 2
    return alpha * (weight * tckd).mean() + beta * (weight * nckd).mean()


@_full_precision
def wkd_logit(logits_s: Tensor, logits_t: Tensor, target: Tensor, cost_matrix: Tensor, temperature: float = 8.0,
              gamma: float = 1.0, sinkhorn_lambda: float = 0.05, sinkhorn_iter: int = 10) -> Tensor:
    """WKD-L (Lv et al., NeurIPS 2024): ``L_t + gamma * mean_i WD_i``.

    ``L_t = -mean_i softmax(z_t,i)[y_i] * log_softmax(z_s,i)[y_i]`` (temperature 1). ``WD_i``: the
    label's column is removed from both logit sets and its row and column from ``cost_matrix``
    ([C, C], the sharpened teacher-derived cost); ``p = softmax(z'/T)``; ``M = relu(cost') + 1e-8``,
    ``K = exp(-M / lambda)``; exactly ``sinkhorn_iter`` Sinkhorn steps from ``u = 1/(C-1)``:
    ``v = p_t / (K^T u + 1e-8)``, ``u = p_s / (K v + 1e-8)``; ``WD_i = sum_jk u_j K_jk v_k M_jk``.
    Rows of K (and u) are the student's classes, columns (v) the teacher's. The gradient flows
    through every unrolled step.

    Numerics: no log-domain stabilisation and the 1e-8 guards are part of the value (the
    reference's). With the published cost (entries in [0, 1)) and lambda = 0.05, ``M / lambda <= 20``
    and ``K >= 2e-9``, far above float32's smallest normal (1e-38); the guards keep every division
    finite should a ``K v`` underflow (only when ``M / lambda`` exceeds ~87). Computed in float32 or
    wider; the tests compare float32 with float64 at the published setting (C = 100).
    """
    b, c = logits_s.shape
    if tuple(cost_matrix.shape) != (c, c):
        raise UserError(f"wkd cost_matrix has shape {tuple(cost_matrix.shape)}, expected ({c}, {c}) "
                        f"for {c} classes; build it for this data set's classes")
    if int(sinkhorn_iter) != sinkhorn_iter or sinkhorn_iter < 1:
        raise UserError(f"wkd sinkhorn_iter={sinkhorn_iter} must be a positive integer")
    if not sinkhorn_lambda > 0:
        raise UserError(f"wkd sinkhorn_lambda={sinkhorn_lambda} must be > 0")
    logits_t = logits_t.detach()
    y = target.reshape(-1).long()
    label = y.unsqueeze(1)
    target_term = -(F.softmax(logits_t, dim=1).gather(1, label) * F.log_softmax(logits_s, dim=1).gather(1, label))
    # the kept classes of each sample, in order: j below the label, j + 1 from it on
    j = torch.arange(c - 1, device=y.device).unsqueeze(0)
    keep = j + (j >= label).long()
    p_s = F.softmax(logits_s.gather(1, keep) / temperature, dim=1)
    p_t = F.softmax(logits_t.gather(1, keep) / temperature, dim=1)
    cost = cost_matrix.detach().to(device=p_s.device, dtype=p_s.dtype)
    m = F.relu(cost[keep.unsqueeze(2), keep.unsqueeze(1)]) + 1e-8  # [B, C-1, C-1]
    k = torch.exp(-m / sinkhorn_lambda)
    u = torch.full_like(p_s, 1.0 / (c - 1))
    for _ in range(int(sinkhorn_iter)):
        v = p_t / ((k.transpose(1, 2) @ u.unsqueeze(2)).squeeze(2) + 1e-8)
        u = p_s / ((k @ v.unsqueeze(2)).squeeze(2) + 1e-8)
    wd = (u.unsqueeze(2) * k * v.unsqueeze(1) * m).sum(dim=(1, 2))
    return target_term.mean() + gamma * wd.mean()


# --------------------------------------------------------------------------- features (2023-2026)

_SDD_SCALES = (1, 2, 4)


@_full_precision
def sdd_region_logits(feature: Tensor, fc_weight: Tensor, fc_bias: Tensor | None = None,
                      scales: Sequence[int] = (1, 2, 4)) -> Tensor:
    """SDD's region logits [B, C, N] (Wei et al., CVPR 2024), ``N = sum s^2``: the network's own
    classifier applied to every cell of the pre-pool map ``feature`` [B, D, H, W] pooled to s x s.

    The map is first pooled to 4 x 4; the 2 x 2 and 1 x 1 grids are pooled from that 4 x 4 map
    (equal to pooling ``feature`` directly only when H and W are multiples of 4). Cells are
    flattened row-major and concatenated in the order of ``scales``: region 0 is the global one.
    The bias is added to every region. Gradient reaches all three tensors.
    """
    scales = tuple(scales)
    if not scales or scales[0] != 1 or any(s not in _SDD_SCALES for s in scales) or list(scales) != sorted(set(scales)):
        raise UserError(f"sdd scales={list(scales)} must be ascending, distinct, drawn from {list(_SDD_SCALES)} "
                        "and start with 1 (region 0 is the global one), e.g. [1, 2] or [1, 2, 4]")
    p4 = F.adaptive_avg_pool2d(feature, 4)
    cells = torch.cat([(p4 if s == 4 else F.adaptive_avg_pool2d(p4, s)).flatten(2) for s in scales], dim=2)
    return F.linear(cells.transpose(1, 2), fc_weight, fc_bias).transpose(1, 2)


def _sdd_region_weights(logits_t: Tensor, target: Tensor) -> Tensor:
    """[B, N]: 2 where a region's teacher rightness (argmax == label) differs from region 0's, else 1."""
    right = logits_t.argmax(dim=1) == target.reshape(-1, 1).long()
    return 1.0 + (right != right[:, :1]).to(logits_t.dtype)


@_full_precision
def sdd_kd(logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 4.0) -> Tensor:
    """SD-KD on region logits [B, C, N]: ``sum_bn w_bn T^2 KL_bn / (B N)``, ``w`` the SDD region weight."""
    logits_t = logits_t.detach()
    w = _sdd_region_weights(logits_t, target)
    kl = _kl_rows(F.log_softmax(logits_s / temperature, dim=1), F.log_softmax(logits_t / temperature, dim=1))
    return temperature ** 2 * (w * kl).sum() / w.numel()


@_full_precision
def sdd_dkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
            temperature: float = 4.0) -> Tensor:
    """SD-DKD on region logits [B, C, N]: DKD's per-(sample, region) ``T^2 (alpha TCKD + beta NCKD)``,
    weighted by the SDD region weight, summed and divided by B N."""
    logits_t = logits_t.detach()
    w = _sdd_region_weights(logits_t, target)
    gt = F.one_hot(target.reshape(-1).long(), logits_s.shape[1]).bool().unsqueeze(2)
    tckd, nckd = _dkd_rows(logits_s / temperature, logits_t / temperature, gt)
    return temperature ** 2 * (w * (alpha * tckd + beta * nckd)).sum() / w.numel()


@_full_precision
def sdd_nkd(logits_s: Tensor, logits_t: Tensor, target: Tensor, temperature: float = 4.0,
            gamma: float = 8.0) -> Tensor:
    """SD-NKD as released, on region logits [B, C, N], weighted and divided by B N per region:
    ``-p_t[y] log p_s[y]`` (temperature 1) ``- gamma T^2 sum_c softmax(z_t/T)_c log_softmax(z_s/T)_c``
    over all C classes (the reference's non-target mask keeps the label: a cross-entropy, not NKD).
    """
    logits_t = logits_t.detach()
    w = _sdd_region_weights(logits_t, target)
    label = target.reshape(-1, 1, 1).long().expand(-1, 1, logits_s.shape[2])
    target_term = -(F.softmax(logits_t, dim=1).gather(1, label) * F.log_softmax(logits_s, dim=1).gather(1, label))
    cross = (F.softmax(logits_t / temperature, dim=1) * F.log_softmax(logits_s / temperature, dim=1)).sum(dim=1)
    per_region = target_term.squeeze(1) - gamma * temperature ** 2 * cross
    return (w * per_region).sum() / w.numel()


@_full_precision
def class_activation_maps(feature: Tensor, fc_weight: Tensor) -> Tensor:
    """CAT-KD's class activation maps [B, C, H, W]: ``sum_d W[c, d] A[b, d, h, w]``, no bias
    (Guo et al., CVPR 2023). Their spatial mean is the logit without bias; gradient reaches both."""
    return torch.einsum("cd,bdhw->bchw", fc_weight, feature)


@_full_precision
def cat_kd(cam_s: Tensor, cam_t: Tensor, resolution: int = 2, normalize: bool = False) -> Tensor:
    """CAT-KD: mean over all B C r r entries of ``(N(pool_r(CAM_s)) - N(pool_r(CAM_t)))^2``.

    ``pool_r`` is adaptive average pooling to ``resolution`` x ``resolution`` (maps of different
    sizes are fine); with ``normalize``, ``N`` divides each (sample, class) map by
    ``max(|map|_2, 1e-12)`` over its r x r cells, else it is the identity.
    """
    if int(resolution) != resolution or resolution < 1:
        raise UserError(f"cat_kd resolution={resolution} must be a positive integer (the pooled map's side)")

    def transfer(cam: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(cam, int(resolution)).flatten(2)
        return F.normalize(pooled, dim=2, eps=1e-12) if normalize else pooled

    return (transfer(cam_s) - transfer(cam_t.detach())).pow(2).mean()


def _grid_cell_stats(f: Tensor, g: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-(channel, cell) mean and ``sqrt(unbiased var + eps)`` of ``f`` [B, C, H, W] on a g x g grid,
    shaped [B, C, g*g]. Cells have adaptive-pooling bounds; each variance is taken around its own
    cell's mean (two-pass, no ``E[x^2] - E[x]^2`` cancellation).
    """
    b, c, h, w = f.shape

    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        # explicit two passes: torch.var's reduction is ~10x slower on many short rows on the CPU
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).sum(dim=-1) / (x.shape[-1] - 1)
        return mean.squeeze(-1), torch.sqrt(var + eps)

    if h % g == 0 and w % g == 0:  # disjoint equal cells: one reshape instead of g*g slices
        return stats(f.reshape(b, c, g, h // g, g, w // g).permute(0, 1, 2, 4, 3, 5).reshape(b, c, g * g, -1))

    def bounds(i: int, size: int) -> slice:
        return slice(i * size // g, -(-(i + 1) * size // g))

    cells = [stats(f[..., bounds(i, h), bounds(j, w)].flatten(-2)) for i in range(g) for j in range(g)]
    return torch.stack([m for m, _ in cells], dim=-1), torch.stack([s for _, s in cells], dim=-1)


@_full_precision
def wkd_feature(f_s: Tensor, f_t: Tensor, mean_cov_ratio: float = 4.0, grid: int = 1, eps: float = 1e-5) -> Tensor:
    """WKD-F (Lv et al., NeurIPS 2024): squared 2-Wasserstein distance between per-(channel, cell)
    diagonal Gaussians: ``mean_cov_ratio * sum (mu_s - mu_t)^2 / n + sum (sigma_s - sigma_t)^2 / n``.

    ``f_s`` is the projected student feature, shaped like ``f_t`` [B, C, H, W]. Cells of a
    ``grid`` x ``grid`` split with adaptive-pooling bounds (``floor(i H / g)`` to
    ``ceil((i + 1) H / g)``, overlapping when H is not a multiple of g); ``sigma = sqrt(var + eps)``
    with the unbiased variance over the cell's pixels (a one-pixel cell gives NaN, as in the
    reference); ``n = B * grid^2``.
    """
    if int(grid) != grid or grid < 1:
        raise UserError(f"wkd_feature grid={grid} must be a positive integer")
    g = int(grid)
    mu_s, sd_s = _grid_cell_stats(f_s, g, eps)
    mu_t, sd_t = _grid_cell_stats(f_t.detach(), g, eps)
    mean_sq = (mu_s - mu_t).pow(2).sum()
    cov_sq = (sd_s - sd_t).pow(2).sum()
    return (mean_cov_ratio * mean_sq + cov_sq) / (f_s.shape[0] * g * g)
