"""GPU slots for local multiruns: a Hydra callback that gives each job's process its own slot on a GPU.

Used by ``hydra/launcher=local_gpus`` (Hydra's joblib launcher). A small CIFAR run uses a few
percent of a modern GPU, so each GPU offers ``jobs_per_gpu`` slots: ``G`` GPUs give
``G x jobs_per_gpu`` slots, and the launcher runs that many jobs at once (``hydra.launcher.n_jobs``,
by default computed from the same plan by the ``kd_gpu_slots`` resolver).

Joblib runs at most ``n_jobs`` jobs at once, each in a long-lived worker process. The first job a
worker runs takes an exclusive lock on one slot (``<lock_dir>/gpu<id>.slot<k>.lock``, ``fcntl.flock``)
and the worker keeps it until it exits, when the operating system releases it; every job of that
worker runs with ``CUDA_VISIBLE_DEVICES=<id>``. So no two running jobs ever share a slot and no GPU
ever runs more than ``jobs_per_gpu`` jobs: with ``n_jobs`` <= slots a worker always finds a free
one, and a worker that finds none (another sweep on the same machine holds them, the locks are
machine-wide) waits until one is released. Slots are tried round-robin over the GPUs (slot 0 of
every GPU first), so fewer jobs than slots spread over all GPUs instead of piling onto the first.

``jobs_per_gpu: auto`` packs by memory: ``floor(0.9 x GPU memory / footprint)``, at most
``max_jobs_per_gpu`` (8: past that the GPU's compute, not its memory, is the limit; ``scripts/gpu_check.py``
measures aggregate images/s for 1, 2, 4 and 8 runs on one GPU). The footprint is the measured one
when ``scripts/gpu_check.py`` has written it (``footprint_mib`` in its JSON), else an estimate of
3 GiB per run (CUDA context, data set on the GPU, both networks, compile workspace). Memory comes
from ``nvidia-smi`` (no CUDA context in the launching process); without it, one job per GPU.

Why not ``hydra/launcher=submitit_local``: submitit's local executor starts every job of the sweep at
once and gives each the same ``CUDA_VISIBLE_DEVICES`` (the first ``gpus_per_node`` ids), so all jobs
would share GPU 0 (see ``tests/test_sweeps.py::test_submitit_local_puts_every_job_on_the_same_gpus``).
"""
from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from common.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_FOOTPRINT_MIB = 3072  # estimated device memory of one CIFAR run, context included
MEMORY_SHARE = 0.9  # of each GPU's memory the packed runs may plan to use
MAX_JOBS_PER_GPU = 8
# Set by the launching process to the plan's GPU ids: a worker's CUDA_VISIBLE_DEVICES is its own GPU,
# so the default devices (and the n_jobs resolver) must not read that in a job.
PLAN_DEVICES_ENV = "KD_GPU_SLOTS_DEVICES"

# The slot this process holds, with the open lock file that keeps it; one per process, kept until exit.
_HELD: dict[str, Any] = {}


@dataclass(frozen=True)
class SlotPlan:
    """Which GPUs the jobs use and how many jobs each one runs at once."""

    devices: tuple[str, ...]
    jobs_per_gpu: int
    found: bool = True  # False: no GPU was listed or visible, and ``devices`` is the assumed ``0 .. gpus-1``

    @property
    def num_slots(self) -> int:
        return len(self.devices) * self.jobs_per_gpu

    def slots(self) -> list[tuple[str, int]]:
        """``(gpu id, slot index)`` in the order a worker tries them: slot 0 of every GPU first."""
        return [(device, k) for k in range(self.jobs_per_gpu) for device in self.devices]


@functools.lru_cache(maxsize=1)
def gpu_memory_mib() -> dict[str, int]:
    """Total memory (MiB) of each physical GPU by id, from ``nvidia-smi``; empty when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    memory = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            memory[parts[0]] = int(parts[1])
    return memory


def measured_footprint_mib(path: str | Path | None) -> int | None:
    """``footprint_mib`` that ``scripts/gpu_check.py`` measured (its JSON file), when there is one."""
    if not path:
        return None
    try:
        value = json.loads(Path(path).read_text()).get("footprint_mib")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def choose_jobs_per_gpu(memory_mib: int | None, footprint_mib: int, max_jobs: int = MAX_JOBS_PER_GPU) -> int:
    """Runs of ``footprint_mib`` that fit in ``MEMORY_SHARE`` of ``memory_mib``: 1 .. ``max_jobs`` (1 if unknown)."""
    if not memory_mib:
        return 1
    return max(1, min(int(max_jobs), int(MEMORY_SHARE * memory_mib) // max(1, int(footprint_mib))))


def _listed(value: Sequence[Any] | str | int) -> list[str]:
    if isinstance(value, (int, str)):
        return [d.strip() for d in str(value).split(",") if d.strip()]
    return [str(d).strip() for d in value]


def visible_gpus() -> list[str]:
    """The GPU ids the launching shell sees: ``CUDA_VISIBLE_DEVICES`` (or the plan's ids, in a job), else those
    ``nvidia-smi`` lists; empty when neither lists one."""
    env = (os.environ.get(PLAN_DEVICES_ENV) or os.environ.get("CUDA_VISIBLE_DEVICES", "")).strip()
    return _listed(env) if env else sorted(gpu_memory_mib(), key=int)


def resolve_devices(devices: Sequence[Any] | str | int | None, gpus: int | None) -> list[str]:
    """The physical GPU ids jobs may use: ``devices`` when given; else the visible GPUs
    (``CUDA_VISIBLE_DEVICES`` of the launching shell, else those ``nvidia-smi`` lists, else ``0``),
    the first ``gpus`` of them when ``gpus`` is set (``0 .. gpus-1`` when none are listed)."""
    if devices is not None:
        found = _listed(devices)
        if not found:
            raise UserError("hydra.callbacks.gpu_slots.devices is empty; list GPU ids, e.g. [0,1], or set it to null")
        return found
    visible = visible_gpus()
    if gpus is None:
        return visible or ["0"]
    if isinstance(gpus, bool) or int(gpus) < 1:
        raise UserError(f"hydra.callbacks.gpu_slots.gpus={gpus} must be a whole number >= 1 (or null: all visible)")
    if not visible:
        return [str(i) for i in range(int(gpus))]
    if int(gpus) > len(visible):
        raise UserError(f"hydra.callbacks.gpu_slots.gpus={gpus} but only {len(visible)} GPU(s) are visible "
                        f"({','.join(visible)}); lower it or list the ids in hydra.callbacks.gpu_slots.devices")
    return visible[: int(gpus)]


def plan_slots(devices: Sequence[Any] | str | int | None = None, gpus: int | None = None,
               jobs_per_gpu: int | str = "auto", footprint_mib: int | str = "auto",
               footprint_from: str | Path | None = None, max_jobs_per_gpu: int = MAX_JOBS_PER_GPU,
               memory_mib: Mapping[str, int] | None = None) -> SlotPlan:
    """The slot plan of a sweep; ``memory_mib`` (GPU id -> MiB) defaults to :func:`gpu_memory_mib`."""
    ids = resolve_devices(devices, gpus)
    if jobs_per_gpu == "auto" or jobs_per_gpu is None:
        if footprint_mib == "auto" or footprint_mib is None:
            footprint = measured_footprint_mib(footprint_from) or DEFAULT_FOOTPRINT_MIB
        elif isinstance(footprint_mib, bool) or not isinstance(footprint_mib, int) or footprint_mib < 1:
            raise UserError(f"hydra.callbacks.gpu_slots.footprint_mib={footprint_mib} must be auto or MiB >= 1")
        else:
            footprint = footprint_mib
        memory = gpu_memory_mib() if memory_mib is None else dict(memory_mib)
        known = [memory.get(d) for d in ids]
        smallest = min(known) if known and all(known) else None  # the tightest GPU sets the packing
        per_gpu = choose_jobs_per_gpu(smallest, footprint, max_jobs_per_gpu)
        log.debug("jobs_per_gpu=auto: %s MiB per GPU, %s MiB per run -> %d", smallest, footprint, per_gpu)
    elif isinstance(jobs_per_gpu, bool) or not isinstance(jobs_per_gpu, int) or jobs_per_gpu < 1:
        raise UserError(f"hydra.callbacks.gpu_slots.jobs_per_gpu={jobs_per_gpu} must be auto or a whole number >= 1")
    else:
        per_gpu = jobs_per_gpu
    return SlotPlan(tuple(ids), per_gpu, found=devices is not None or bool(visible_gpus()))


def _plan_from_node(node: Any) -> SlotPlan:
    get = node.get if hasattr(node, "get") else (lambda key, default=None: default)
    return plan_slots(get("devices"), get("gpus"), get("jobs_per_gpu", "auto"), get("footprint_mib", "auto"),
                      get("footprint_from"), get("max_jobs_per_gpu", MAX_JOBS_PER_GPU))


def _slots_resolver(node: Any) -> int:
    """``${kd_gpu_slots:${hydra.callbacks.gpu_slots}}``: the number of slots, the launcher's default ``n_jobs``."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return _plan_from_node(node).num_slots


if not OmegaConf.has_resolver("kd_gpu_slots"):
    OmegaConf.register_new_resolver("kd_gpu_slots", _slots_resolver)


def acquire_slot(slots: Sequence[tuple[str, int]], lock_dir: Path, poll_s: float = 1.0) -> tuple[str, int]:
    """Lock one free ``(gpu, slot)`` of ``slots`` for the lifetime of this process and return it.

    Idempotent: a process that already holds a slot gets the same one back (CUDA cannot move to
    another device once initialised in a process).
    """
    if "slot" in _HELD:
        return _HELD["slot"]
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device, k in slots:
            handle = open(lock_dir / f"gpu{device}.slot{k}.lock", "a+")  # kept open: the lock lives as long as it
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _HELD.update(slot=(device, k), handle=handle)
            return device, k
        if not waited:
            log.info("all %d GPU slots are busy (locks in %s); waiting for one to be released", len(slots), lock_dir)
            waited = True
        time.sleep(poll_s)


class GpuSlots(Callback):
    """Hydra callback: before each job, pin the job's process to a GPU slot no other running job holds."""

    def __init__(self, lock_dir: str, num_slots: int | None = None,
                 devices: Sequence[int] | str | int | None = None, gpus: int | None = None,
                 jobs_per_gpu: int | str = 1, footprint_mib: int | str = "auto", footprint_from: str | None = None,
                 max_jobs_per_gpu: int = MAX_JOBS_PER_GPU, poll_s: float = 1.0) -> None:
        # resolved here, in the launching process, so every worker sees the same plan
        self.plan = plan_slots(devices, gpus, jobs_per_gpu, footprint_mib, footprint_from, max_jobs_per_gpu)
        self.lock_dir = str(lock_dir)
        self.poll_s = float(poll_s)
        self.num_slots = self.plan.num_slots
        if num_slots is not None:
            self._check_jobs(num_slots)

    def _check_jobs(self, n_jobs: Any) -> None:
        """Jobs at once must fit the slots: a worker without a slot would wait for ever (workers never exit)."""
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
            raise UserError(f"hydra.launcher.n_jobs={n_jobs}: set it to the number of jobs to run at once (>= 1)")
        if n_jobs > self.plan.num_slots:
            raise UserError(
                f"hydra.launcher.n_jobs={n_jobs} parallel jobs but only {len(self.plan.devices)} GPU(s) "
                f"({','.join(self.plan.devices)}) x {self.plan.jobs_per_gpu} job(s) per GPU = {self.plan.num_slots} "
                "slot(s); lower hydra.launcher.n_jobs, raise hydra.callbacks.gpu_slots.jobs_per_gpu or list more "
                "GPUs in hydra.callbacks.gpu_slots.devices")
        self.num_slots = n_jobs

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The launcher's n_jobs is read here, not passed in: it defaults to the kd_gpu_slots resolver,
        # registered when this module is imported, i.e. after Hydra resolved this callback's arguments.
        self._check_jobs(int(config.hydra.launcher.n_jobs))
        os.environ[PLAN_DEVICES_ENV] = ",".join(self.plan.devices)  # inherited by the workers started next
        if not self.plan.found:
            log.warning("no GPU found (nvidia-smi lists none and CUDA_VISIBLE_DEVICES is unset): the plan assumes GPU "
                        "%s; on a machine without one the jobs run on the CPU, %d at once (hydra/launcher=joblib "
                        "is the launcher for CPU sweeps)", ",".join(self.plan.devices), self.num_slots)
        log.info("GPU slots: %d GPU(s) %s x %d job(s) per GPU; %d job(s) at once", len(self.plan.devices),
                 ",".join(self.plan.devices), self.plan.jobs_per_gpu, self.num_slots)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        device, k = acquire_slot(self.plan.slots(), Path(self.lock_dir), self.poll_s)
        # read by CUDA when it initialises in this process: the job's "cuda" is this GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        where = f"GPU {device}" if self.plan.found else f"GPU {device} if there is one (none was found)"
        log.info("job %s runs on %s, slot %d (process %d)", config.hydra.job.get("num", "-"), where, k, os.getpid())
