"""LumiNet and SKD under DDP: two gloo processes equal one process with the whole batch.

LumiNet standardises each class over the batch; SKD builds B x B Gram matrices, their covariance and the
median fractions over the batch. Each of two forked ranks holds a shard of one global batch (7 samples, split
4 + 3), computes the registered method's term through a DDP-wrapped linear student and back-propagates; DDP
averages the gradients. The single-process reference is the pinned function on the full batch with the same
weights, in the parent: the loss on every rank and the averaged gradient must equal it (float64, so only the
summation order differs).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import generator, run_ranks, seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import Features
from distiller.methods import METHODS, TermContext

N, D, C = 7, 5, 6
SHARDS = [(0, 4), (4, 7)]
SETTINGS = {"luminet": {"luminet_alpha": 3.0, "luminet_temperature": 2.0}, "skd": {"skd_temperature": 4.0,
                                                                                   "tikhonov": 0.1}}
REFERENCE = {"luminet": lambda s, t: 3.0 ** 2 * F.luminet(s, t, temperature=2.0),
             "skd": lambda s, t: F.skd(s, t, temperature=4.0, tikhonov=0.1)}


def data() -> dict[str, torch.Tensor]:
    g = generator(40)
    return {"x": torch.randn(N, D, generator=g, dtype=torch.float64),
            "t": 3 * torch.randn(N, C, generator=g, dtype=torch.float64), "y": torch.randint(0, C, (N,), generator=g)}


def student() -> nn.Linear:
    torch.manual_seed(seed(41))
    return nn.Linear(D, C).double()


def method_term(name: str, net: nn.Module, d: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    method = METHODS.get(name)(**SETTINGS[name])
    batch = Batch(images=d["x"][rows], labels=d["y"][rows], indices=torch.arange(N)[rows])
    return method(Features(logits=net(d["x"][rows])), Features(logits=d["t"][rows]), batch, TermContext(epoch=1))[name]


def _worker(rank: int, world: int, init_file: str, out_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = DistributedDataParallel(student())
        loss = method_term(name, net, data(), slice(*SHARDS[rank]))
        loss.backward()
        torch.save({"loss": loss.item(), "grads": [p.grad for p in net.parameters()]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_imports() -> None:
    """DDP's constructor imports torch._dynamo (seconds); imported once here, the forked ranks inherit it."""
    import torch._dynamo  # noqa: F401


@pytest.mark.parametrize("name", ["luminet", "skd"])
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path: Path, name: str, ddp_imports: None) -> None:
    run_ranks(_worker, 2, str(tmp_path / "pg"), str(tmp_path), name)
    d, net = data(), student()
    loss = REFERENCE[name](net(d["x"]), d["t"])
    want = torch.autograd.grad(loss, list(net.parameters()))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-12)
        for got, ref in zip(out["grads"], want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    # one shard's own term differs from the global one: the gather is what makes them agree
    shard = method_term(name, student(), d, slice(*SHARDS[0])).item()
    assert abs(shard - loss.item()) > 1e-6 * abs(loss.item())
