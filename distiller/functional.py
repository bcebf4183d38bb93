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
does (the teacher-teacher term of :func:`nst`).
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
    zs, zt = logits_s / temperature, logits_t / temperature
    ls, lt = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
    neg_inf = torch.finfo(ls.dtype).min

    def binary(logp: Tensor) -> Tensor:
        tgt = logp.masked_fill(~gt, neg_inf).logsumexp(1)
        rest = logp.masked_fill(gt, neg_inf).logsumexp(1)
        return torch.stack([tgt, rest], dim=1)

    b = logits_s.shape[0]
    tckd = F.kl_div(binary(ls), binary(lt), reduction="sum", log_target=True) * temperature ** 2 / b
    shift = 1000.0 * gt.to(zs.dtype)
    nckd = F.kl_div(F.log_softmax(zs - shift, dim=1), F.log_softmax(zt - shift, dim=1),
                    reduction="sum", log_target=True) * temperature ** 2 / b
    return alpha * tckd + beta * nckd


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
