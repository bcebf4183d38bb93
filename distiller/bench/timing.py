"""Timers and the facts a timing is reported with: the device's name and the peak memory of the process.

Every measurement of :mod:`distiller.bench` times through :func:`seconds_per_call`
(``torch.utils.benchmark.Timer``, which synchronises the accelerator around each timed block and
runs two untimed calls first), with the threads the run itself uses.
"""
from __future__ import annotations

import platform
import resource
import sys
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator's queued work (a no-op on the CPU), so a wall clock around it is true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``; the platform's answer elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def timer(fn: Callable[[], Any]) -> Any:
    """A ``torch.utils.benchmark.Timer`` of ``fn()`` with this process's threads (its default is one)."""
    # imported here: importing it probes for a CUDA toolkit and logs a warning where none is installed,
    # which a command that fails early on a user error should not print
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds of one call over ``calls`` back-to-back calls (after the Timer's two untimed ones)."""
    return timer(fn).timeit(calls).mean
