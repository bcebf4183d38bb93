"""One GPU per job for local multiruns: a Hydra callback that gives each job's process its own GPU.

Used by ``hydra/launcher=local_gpus`` (Hydra's joblib launcher with ``n_jobs`` = number of GPUs).
Joblib runs at most ``n_jobs`` jobs at once, each in a long-lived worker process. The first job a
worker runs takes an exclusive lock on one GPU (``<lock_dir>/gpu<id>.lock``, ``fcntl.flock``) and
the worker keeps it until it exits, when the operating system releases it; every job of that worker
runs with ``CUDA_VISIBLE_DEVICES=<id>``. So no two running jobs ever share a GPU: with ``n_jobs``
workers and ``n_jobs`` GPUs a worker always finds a free one, and a worker that finds none (another
sweep on the same machine holds them, the locks are machine-wide) waits until one is released.

Why not ``hydra/launcher=submitit_local``: submitit's local executor starts every job of the sweep at
once and gives each the same ``CUDA_VISIBLE_DEVICES`` (the first ``gpus_per_node`` ids), so all jobs
would share GPU 0 (see ``tests/test_sweeps.py::test_submitit_local_puts_every_job_on_the_same_gpus``).
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from common.errors import UserError

log = logging.getLogger(__name__)

# The GPU this process holds, with the open lock file that keeps it; one per process, kept until exit.
_HELD: dict[str, Any] = {}


def _parse_devices(devices: Sequence[int] | str | int | None, num_slots: int) -> list[str]:
    """The physical GPU ids jobs may use: explicit list, else the launching process's
    ``CUDA_VISIBLE_DEVICES``, else ``0 .. num_slots-1``."""
    if devices is None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env:
            return [d.strip() for d in env.split(",") if d.strip()]
        return [str(i) for i in range(num_slots)]
    if isinstance(devices, (int, str)):
        return [d.strip() for d in str(devices).split(",") if d.strip()]
    return [str(d) for d in devices]


def acquire_gpu(devices: Sequence[str], lock_dir: Path, poll_s: float = 1.0) -> str:
    """Lock one free GPU of ``devices`` for the lifetime of this process and return its id.

    Idempotent: a process that already holds a GPU gets the same one back (CUDA cannot move to
    another device once initialised in a process).
    """
    if "device" in _HELD:
        return _HELD["device"]
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in devices:
            path = lock_dir / f"gpu{device}.lock"
            handle = open(path, "a+")  # kept open on purpose: the lock lives as long as it
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _HELD.update(device=device, handle=handle)
            return device
        if not waited:
            log.info("all GPUs %s are busy (locks in %s); waiting for one to be released", list(devices), lock_dir)
            waited = True
        time.sleep(poll_s)


class GpuSlots(Callback):
    """Hydra callback: before each job, pin the job's process to a GPU no other running job uses."""

    def __init__(self, num_slots: int, lock_dir: str, devices: Sequence[int] | str | int | None = None,
                 poll_s: float = 1.0) -> None:
        if int(num_slots) < 1:
            raise UserError(f"hydra.launcher.n_jobs={num_slots}: set it to the number of GPUs to use (>= 1)")
        self.num_slots = int(num_slots)
        # resolved here, in the launching process, so every worker sees the same list
        self.devices = _parse_devices(devices, self.num_slots)
        self.lock_dir = str(lock_dir)
        self.poll_s = float(poll_s)
        if len(self.devices) < self.num_slots:
            raise UserError(f"hydra.launcher.n_jobs={self.num_slots} parallel jobs but only {len(self.devices)} "
                            f"GPU(s) to give them ({','.join(self.devices)}); lower hydra.launcher.n_jobs or "
                            f"list more GPUs in hydra.callbacks.gpu_slots.devices")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        device = acquire_gpu(self.devices, Path(self.lock_dir), self.poll_s)
        # read by CUDA when it initialises in this process: the job's "cuda" is this GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("job %s runs on GPU %s (process %d)", config.hydra.job.get("num", "-"), device, os.getpid())
