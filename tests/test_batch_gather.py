"""Batch-coupled terms under DDP (distiller/gather.py): two gloo processes equal one process with the whole batch.

DIST's intra-class correlation and MLKD's batch/class levels and confidence masks depend on
every sample of the batch. Each of two forked ranks holds a shard of one global batch (7 samples
split 4 + 3, so the gather pads the shorter shard), computes the method's term through a
DDP-wrapped linear student, and back-propagates; DDP averages the gradients. The single-process
reference evaluates the pinned function on the full batch, in the parent process, with the same
weights: the loss on every rank and the averaged gradient must equal it (float64 throughout, so
the only differences are summation orders: 1e-12 relative).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import generator, run_ranks, seed
from torch import nn

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.gather import distributed, gather_batch
from distiller.methods import METHODS, TermContext

N, D, C = 7, 5, 6
SHARDS = [(0, 4), (4, 7)]  # rank 0 takes 4 samples, rank 1 takes 3


def data() -> dict[str, torch.Tensor]:
    """The global batch: weak and strong inputs, the teacher's logits on both, labels."""
    g = generator(30)
    return {"x_w": torch.randn(N, D, generator=g, dtype=torch.float64),
            "x_s": torch.randn(N, D, generator=g, dtype=torch.float64),
            "t_w": 3 * torch.randn(N, C, generator=g, dtype=torch.float64),
            "t_s": 3 * torch.randn(N, C, generator=g, dtype=torch.float64),
            "y": torch.randint(0, C, (N,), generator=g)}


def student() -> nn.Linear:
    torch.manual_seed(seed(31))
    return nn.Linear(D, C).double()


def method_term(name: str, net: nn.Module, d: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    """The registered method's own term on the samples ``rows`` (a shard, or all in one process)."""
    method = METHODS.get(name)()
    s, t = Features(logits=net(d["x_w"][rows])), Features(logits=d["t_w"][rows])
    if name == "mlkd":
        s.views["strong"], t.views["strong"] = Features(logits=net(d["x_s"][rows])), Features(logits=d["t_s"][rows])
    batch = Batch(images=d["x_w"][rows], labels=d["y"][rows], indices=torch.arange(N)[rows])
    return method(s, t, batch, TermContext(epoch=1))[name]


def reference(name: str) -> tuple[float, list[torch.Tensor]]:
    """One process, the whole batch, the pinned function with the method's published defaults."""
    d, net = data(), student()
    z_w, z_s = net(d["x_w"]), net(d["x_s"])
    if name == "dist":
        loss = F.dist(z_w, d["t_w"], beta=1.0, gamma=1.0, temperature=4.0)
    else:
        loss = 0.9 * F.mlkd(z_w, d["t_w"], z_s, d["t_s"], temperature=4.0)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return loss.item(), [g.clone() for g in grads]


def _worker(rank: int, world: int, init_file: str, out_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        d = data()
        net = DistributedDataParallel(student())
        lo, hi = SHARDS[rank]
        loss = method_term(name, net, d, slice(lo, hi))
        loss.backward()
        local = gather_batch(torch.arange(lo, hi))  # a tensor without gradient is gathered as data
        torch.save({"loss": loss.item(), "grads": [p.grad for p in net.parameters()], "order": local},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["dist", "mlkd"])
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path: Path, name: str) -> None:
    run_ranks(_worker, 2, str(tmp_path / "pg"), str(tmp_path), name)
    want_loss, want_grads = reference(name)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["loss"] == pytest.approx(want_loss, rel=1e-12)
        assert torch.equal(out["order"], torch.arange(N))  # rank order, the shorter shard's padding removed
        for got, want in zip(out["grads"], want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    # the per-shard term alone would differ: the gather is what makes the two agree
    d, net = data(), student()
    shard = method_term(name, net, d, slice(*SHARDS[0])).item()
    assert abs(shard - want_loss) > 1e-6 * abs(want_loss)


def test_one_process_returns_its_input_unchanged() -> None:
    assert not distributed()
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_batch(x) is x
