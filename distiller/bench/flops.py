"""FLOP accounting for the model FLOP utilisation (MFU): the FLOPs of one step, the device's matmul peak
measured in the run's precision, and the vendors' data-sheet peaks.

``mfu = flops_per_image * images_per_sec / peak``: the share of the device's dense matmul rate the
step turns into useful arithmetic (matmuls and convolutions, forward and backward; element-wise ops
are not counted).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from distiller.bench.timing import timer
from distiller.engine.runtime import PRECISIONS

# Dense tensor-core peaks from the vendors' data sheets (FLOP/s), for an MFU against the nominal
# peak beside the one against the measured matmul peak. Only where the name is unambiguous.
NOMINAL_PEAKS = {
    ("H100 80GB HBM3", "bf16"): 989.4e12, ("H100 80GB HBM3", "fp16"): 989.4e12,
    ("H200", "bf16"): 989.4e12, ("H200", "fp16"): 989.4e12,
    ("H100 PCIe", "bf16"): 756.0e12, ("H100 PCIe", "fp16"): 756.0e12,
    ("A100", "bf16"): 312.0e12, ("A100", "fp16"): 312.0e12,
}


def nominal_peak(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of the device named ``device_name`` in ``precision``, when :data:`NOMINAL_PEAKS` has it."""
    return next((v for (key, prec), v in NOMINAL_PEAKS.items() if key in device_name and prec == precision), None)


def matmul_peak(device: torch.device, precision: str, budget_s: float = 1.5) -> tuple[float, int]:
    """Best FLOP/s of square matmuls in the run's precision, and the size used.

    The size doubles until one product takes a few milliseconds (GPU) or tens of
    milliseconds (CPU), so slow dtypes (bf16 without hardware support) stay cheap to
    measure; then the fastest block of ``blocked_autorange`` counts (other processes only slow it down).
    """
    dtype = PRECISIONS[precision] or torch.float32
    cuda = device.type == "cuda"
    n, limit, enough = 256, (16384 if cuda else 4096), (2e-3 if cuda else 2e-2)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        clock = timer(lambda a=a, b=b: torch.mm(a, b))
        if clock.timeit(1).mean >= enough or n >= limit:
            break
        n *= 2
    best = min(clock.blocked_autorange(min_run_time=budget_s).times)
    return 2.0 * n ** 3 / best, n


def count_step_flops(step: Callable[[Any], Any], batch: Any) -> int:
    """FLOPs of one full step (matmuls/convolutions forward and backward), counted by dispatch, run eagerly."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        step(batch)
    return int(counter.get_total_flops())
