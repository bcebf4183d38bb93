"""All-gather of a batch across DDP ranks for terms that couple the samples of a batch.

DIST's intra-class correlation and MLKD's batch- and class-level terms (and its confidence
masks) depend on the whole batch, not on each sample alone. Under DDP each rank holds B / W
samples; computing such a term on the local shard gives another loss than one process with the
global batch. :func:`gather_batch` concatenates every rank's rows in rank order (shards may
differ in size: the last batch of an epoch), so every rank evaluates the term on the global
batch, exactly as one process would.

Gradient. Every rank computes the same loss from the same gathered tensor; each keeps only the
gradient of its own rows, multiplied by the world size W. DDP then averages the parameters'
gradients over the ranks (a sum divided by W), which gives the sum over ranks of each shard's
contribution: the single-process gradient of the global-batch loss. (This equals all-reducing
the gathered tensor's gradient, without a collective inside the backward pass.) Terms that are
per-sample means need none of this: DDP's average of the local means is the global mean.

In one process (no process group, or a world of 1) :func:`gather_batch` returns its input.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_rows(x: Tensor) -> tuple[Tensor, int, int]:
    """Every rank's rows of ``x`` in rank order, and this rank's (offset, count) in the result."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_host = [int(s) for s in sizes]  # one small sync per gather, multi-process runs only
    m = max(sizes_host)
    padded = F.pad(x.contiguous(), (0, 0) * (x.dim() - 1) + (0, m - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = torch.cat([p[:s] for p, s in zip(parts, sizes_host)])
    return rows, sum(sizes_host[:rank]), sizes_host[rank]


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows; backward: this rank's rows of the gradient, times the world size."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        rows, offset, count = _all_rows(x)
        ctx.offset, ctx.count, ctx.world = offset, count, dist.get_world_size()
        return rows

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad[ctx.offset:ctx.offset + ctx.count] * ctx.world


def gather_batch(x: Tensor) -> Tensor:
    """``x`` [B_local, ...] gathered over the ranks to [B_global, ...] (rank order); ``x`` itself in one process.

    A tensor that requires gradient keeps it for this rank's rows, scaled so that DDP's gradient
    average yields the single-process gradient (module docstring); others are gathered as data.
    """
    if not distributed():
        return x
    if x.requires_grad:
        return _GatherRows.apply(x)
    with torch.no_grad():
        return _all_rows(x)[0]
