"""Float64 inputs and a closeness check for the pure-function tests of the losses (test_functional_*).

Seeded through :func:`helpers.generator`, so ``KD_TEST_SEED_OFFSET`` moves them like every other draw.
"""
from __future__ import annotations

import pytest
import torch
from helpers import generator

D = torch.float64


def rnd(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal draws times ``scale``."""
    return torch.randn(*shape, generator=generator(seed), dtype=D) * scale


def quarters(*shape: int, seed: int) -> torch.Tensor:
    """Logits k/4, |k| <= 24: exact in bf16 and fp16, ties possible."""
    return torch.randint(-24, 25, shape, generator=generator(seed)).to(D) / 4


def labels(n: int, c: int, seed: int) -> torch.Tensor:
    """``n`` class indices below ``c``."""
    return torch.randint(0, c, (n,), generator=generator(seed))


def close(value: torch.Tensor, ref: float, rel: float = 1e-10, abs_: float = 1e-12) -> None:
    """``value``, a 0-dim tensor, equals ``ref`` to float64 rounding."""
    assert value.dim() == 0
    assert value.item() == pytest.approx(ref, rel=rel, abs=abs_)
