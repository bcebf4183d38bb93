"""CRD's memory: two banks of past embeddings, their normalisers, and on-device negative sampling.

Contrastive Representation Distillation (Tian et al., ICLR 2020) scores each
sample's embedding against one positive and K negative rows of a memory bank that
holds a momentum-averaged embedding of every training sample. Everything here
lives on the training device and runs as a handful of batched tensor ops per
step: no per-sample Python loops, no data-loader workers, no host syncs after the
first step.

Sampling (:class:`ContrastSampler`). The training labels are sorted once into a
class-sorted index ``order`` with per-class ``start`` offsets and ``count`` sizes,
so class c occupies ``order[start_c : start_c + n_c]``. A negative for a sample of
class c is drawn uniformly among the ``N - n_c`` samples of other classes by drawing
``r`` uniformly in ``[0, N - n_c)`` and stepping over the class block:
``p = r + n_c * (r >= start_c)``, negative ``= order[p]``. That is one ``randint``,
one comparison and one gather for the whole [B, K] matrix. Negatives are drawn with
replacement (independent draws from the noise distribution, as NCE assumes and as
CRD's own alias-method sampler does; RepDistiller's data set draws without
replacement, which for K = 16384 of 49500 changes the set of rows by ~15 %).

Modes:
* ``exact`` (default, the published setting): positive = the sample itself,
  negatives from other classes only;
* ``relax``: positive = a uniformly drawn sample of the same class (possibly the
  sample itself), negatives from other classes only -- RepDistiller's
  ``CIFAR100InstanceSample(mode='relax')``;
* ``uniform``: positive = the sample itself, negatives uniform over all N samples
  (CRD's memory-bank sampler when no class information is used).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import UserError

MODES = ("exact", "relax", "uniform")

# randint's upper bound: taking the remainder by any data-set size below 2^31 leaves a
# modulo bias of at most 2^31 / 2^62, far below anything a training run can notice.
_RAND_RANGE = 1 << 62


def _randbelow(high: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uniform integers in ``[0, high)``, ``high`` an int64 tensor broadcast against ``shape``."""
    return torch.randint(0, _RAND_RANGE, shape, device=high.device, dtype=torch.int64) % high


class ContrastSampler(nn.Module):
    """Draws ``[B, 1 + K]`` memory indices per batch: column 0 the positive, then K negatives.

    Built once from the training labels (``[N]`` int64); the class index lives in
    non-persistent buffers, so it follows the module to its device and stays out of
    checkpoints (it is rebuilt from the data set's labels).
    """

    def __init__(self, labels: Tensor, k: int, mode: str = "exact") -> None:
        super().__init__()
        if mode not in MODES:
            raise UserError(f"unknown CRD mode '{mode}'; use distill.mode= one of {', '.join(MODES)}")
        labels = labels.detach().reshape(-1).long()
        n = labels.numel()
        if n == 0:
            raise UserError("CRD needs the training labels to build its sampler, got an empty data set")
        if int(labels.min()) < 0:
            raise UserError(f"CRD needs class labels >= 0, the training labels contain {int(labels.min())}")
        count = torch.bincount(labels)
        largest = int(count.max())
        k = int(k)
        if k < 1:
            raise UserError(f"CRD needs at least one negative per sample, got distill.nce_k={k}")
        if mode == "uniform":
            if k >= n:
                raise UserError(f"distill.nce_k={k} negatives is too many for a training set of N={n} samples "
                                f"(mode uniform needs nce_k < N); set distill.nce_k={max(1, min(16384, n // 2))} "
                                "or lower")
        else:
            if int((count > 0).sum()) < 2:
                raise UserError(f"CRD mode '{mode}' draws negatives from other classes, but the training set has "
                                "a single class; use distill.mode=uniform")
            if k > n - largest:
                raise UserError(f"distill.nce_k={k} negatives is too many for this training set: mode '{mode}' draws "
                                f"them from other classes, and the largest class has {largest} of N={n} samples, "
                                f"leaving only {n - largest}; set distill.nce_k={n - largest} or lower "
                                "(or use a larger data set)")
        self.k = k
        self.mode = mode
        self.num_samples = n
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("count", count, persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)

    @torch.no_grad()
    def forward(self, indices: Tensor) -> Tensor:
        """Contrast indices ``[B, 1 + K]`` for the data-set ``indices`` [B] of a batch."""
        indices = indices.reshape(-1).to(self.order.device).long()
        b = indices.numel()
        if self.mode == "uniform":
            neg = torch.randint(0, self.num_samples, (b, self.k), device=indices.device)
            return torch.cat([indices.unsqueeze(1), neg], dim=1)
        y = self.labels[indices]
        n_c, start_c = self.count[y], self.start[y]
        r = _randbelow((self.num_samples - n_c).unsqueeze(1), (b, self.k))
        neg = self.order[r + n_c.unsqueeze(1) * (r >= start_c.unsqueeze(1))]
        if self.mode == "relax":
            pos = self.order[start_c + _randbelow(n_c, (b,))]
        else:
            pos = indices
        return torch.cat([pos.unsqueeze(1), neg], dim=1)

    def extra_repr(self) -> str:
        return f"N={self.num_samples}, k={self.k}, mode={self.mode}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(idx: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' ``(idx, rows)`` concatenated in rank order, padded gathers for unequal batch sizes.

    Duplicated indices (a distributed sampler pads the last batch by repeating samples)
    keep their first occurrence, so every rank writes exactly the same rows and the
    banks stay identical (``index_copy_`` with duplicates is nondeterministic on GPU).
    """
    world = dist.get_world_size()
    n = torch.tensor([idx.numel()], device=idx.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_host = [int(s) for s in sizes]  # one small sync, multi-process runs only
    m = max(sizes_host)
    pad = m - idx.numel()
    idx_p = F.pad(idx, (0, pad))
    rows_p = F.pad(rows, (0, 0, 0, pad))
    all_idx = [torch.empty_like(idx_p) for _ in range(world)]
    all_rows = [torch.empty_like(rows_p) for _ in range(world)]
    dist.all_gather(all_idx, idx_p)
    dist.all_gather(all_rows, rows_p)
    idx = torch.cat([t[:s] for t, s in zip(all_idx, sizes_host)])
    rows = torch.cat([t[:s] for t, s in zip(all_rows, sizes_host)])
    uniq, inverse = torch.unique(idx, return_inverse=True)
    first = torch.full_like(uniq, idx.numel()).scatter_reduce_(
        0, inverse, torch.arange(idx.numel(), device=idx.device), reduce="amin")
    return idx[first], rows[first]


@torch.no_grad()
def momentum_update(bank: Tensor, idx: Tensor, v: Tensor, momentum: float) -> None:
    """``bank[idx] <- normalise(momentum * bank[idx] + (1 - momentum) * v)`` in place."""
    rows = bank.index_select(0, idx)
    rows.mul_(momentum).add_(v.to(bank.dtype), alpha=1.0 - momentum)
    bank.index_copy_(0, idx, F.normalize(rows, p=2, dim=1))


class ContrastMemory(nn.Module):
    """Two memory banks [N, feat_dim] (student side ``memory_s``, teacher side ``memory_t``)
    and their NCE normalisers ``norm_s``, ``norm_t``, all buffers, hence checkpointed.

    Scores (RepDistiller's ``ContrastMemory``): student-anchored
    ``out_s = exp(<memory_t[j], v_s> / T) / Z_s`` and teacher-anchored
    ``out_t = exp(<memory_s[j], v_t> / T) / Z_t`` for the ``1 + K`` contrast indices j.
    ``Z`` is fixed on the first batch as ``mean(scores) * N`` (-1 marks "not yet set").
    """

    def __init__(self, num_samples: int, feat_dim: int = 128, temperature: float = 0.07,
                 momentum: float = 0.5) -> None:
        super().__init__()
        self.num_samples = int(num_samples)
        self.feat_dim = int(feat_dim)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_samples, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(num_samples, feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("norm_s", torch.tensor(-1.0))
        self.register_buffer("norm_t", torch.tensor(-1.0))
        # Host-side cache of "both Z are set", so only the first step reads a value back.
        self._norms_known = False

    def forward(self, v_s: Tensor, v_t: Tensor, contrast_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised scores ``(out_s, out_t)``, each [B, 1 + K] with the positive in column 0."""
        b, k1 = contrast_idx.shape
        # float32 with autocast off: exp(x / 0.07) turns bf16 rounding of x into percent errors.
        with torch.autocast(v_s.device.type, enabled=False):
            # float32 at least (bf16 scores would lose the negatives), the banks' dtype when wider
            dtype = torch.promote_types(self.memory_t.dtype, torch.float32)
            v_s, v_t = v_s.to(dtype), v_t.to(dtype)
            if self.memory_t.shape[0] <= b * k1:
                # Score against every bank row ([B, N]: 12 MiB for CIFAR-100) and keep the 1 + K wanted
                # columns: cheaper than gathering [B, 1+K, D] rows (512 MiB per side at K = 16384, both
                # kept for the backward). The clones are needed because update() overwrites the banks
                # in place before the backward runs.
                out_s = torch.exp(torch.mm(v_s, self.memory_t.clone().t()).gather(1, contrast_idx) / self.temperature)
                out_t = torch.exp(torch.mm(v_t, self.memory_s.clone().t()).gather(1, contrast_idx) / self.temperature)
            else:  # a bank larger than the batch's samples: gather only the rows the batch needs
                flat = contrast_idx.reshape(-1)
                w_t = self.memory_t.index_select(0, flat).view(b, k1, self.feat_dim)
                out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.temperature)
                w_s = self.memory_s.index_select(0, flat).view(b, k1, self.feat_dim)
                out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.temperature)
            if not self._norms_known:
                self._set_norms(out_s, out_t)
            return out_s / self.norm_s, out_t / self.norm_t

    @torch.no_grad()
    def _set_norms(self, out_s: Tensor, out_t: Tensor) -> None:
        if bool((self.norm_s < 0) | (self.norm_t < 0)):
            z = torch.stack([out_s.mean(), out_t.mean()]) * self.num_samples
            if _distributed():
                # Every rank must divide by the same Z, or their losses (and banks) drift apart.
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.norm_s.copy_(torch.where(self.norm_s < 0, z[0], self.norm_s))
            self.norm_t.copy_(torch.where(self.norm_t < 0, z[1], self.norm_t))
        self._norms_known = True

    @torch.no_grad()
    def update(self, idx: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of both banks at the batch's own data-set indices.

        Under ``torch.distributed`` the rows of all ranks are gathered first so every
        rank applies the same update; a single process does no communication.
        """
        idx = idx.reshape(-1).to(self.memory_s.device).long()
        v_s, v_t = v_s.detach().float(), v_t.detach().float()
        if _distributed():
            idx, rows = _gather_rows(idx, torch.cat([v_s, v_t], dim=1))
            v_s, v_t = rows[:, :self.feat_dim], rows[:, self.feat_dim:]
        momentum_update(self.memory_s, idx, v_s, self.momentum)
        momentum_update(self.memory_t, idx, v_t, self.momentum)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._norms_known = False  # re-read the loaded Z once

    def extra_repr(self) -> str:
        return (f"N={self.num_samples}, feat_dim={self.feat_dim}, temperature={self.temperature}, "
                f"momentum={self.momentum}")
