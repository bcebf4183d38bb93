"""Where and how a run executes: device, precision, seeding, and the torch.distributed process group."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What ``trainer.precision=auto`` resolves to on a CPU, when set (fp32 or bf16): the machine's own
# answer is overridden, so the tests can take the native-bf16 path on any CPU and an AVX2 path on a
# native-bf16 one (``KD_AUTO_PRECISION=bf16 python -m pytest ...``), and a sweep can be made alike on both.
AUTO_PRECISION_ENV = "KD_AUTO_PRECISION"
CPU_AUTO_CHOICES = ("fp32", "bf16")


def _autocast(device: torch.device, precision: str) -> ContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Runtime:
    """The resolved execution settings of one process."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    eval_precision: str = "fp32"  # fp32 | bf16 | fp16: evaluation's own (trainer.eval_precision, resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> ContextManager:
        """Mixed-precision context for training forward passes (a no-op in fp32)."""
        return _autocast(self.device, self.precision)

    def eval_autocast(self) -> ContextManager:
        """Context for evaluation forward passes: fp32 by default whatever training uses, so reported
        accuracy (and the best epoch picked from it) is not moved by bf16/fp16 rounding."""
        return _autocast(self.device, self.eval_precision)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without an index uses the process's local rank."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu or auto")
        device = torch.device(name)
        if device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if name != "cpu":
        raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def _auto_flag(value: Any, default: bool, key: str) -> bool:
    if value == "auto" or value is None:
        return default
    if isinstance(value, bool):
        return value
    raise UserError(f"{key}={value} is not valid; use auto, true or false")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX; bf16 on Arm), where bf16 beats fp32.

    Both must agree: oneDNN's own probe (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, what
    PyTorch uses to route bf16 convolutions to its fast kernels) and the CPU's flags. The probe
    alone also says yes on plain AVX-512, where bf16 is emulated with fp32 FMAs and gains
    nothing; without oneDNN support bf16 convolutions take ATen's emulated slow path, ~10x
    slower than fp32 (docs/benchmarks.md). Where the flags cannot be read, the probe decides.
    """
    if not _onednn_bf16_probe():
        return False
    flags = _cpu_flags()
    if flags is None:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _onednn_bf16_probe() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) from /proc/cpuinfo; None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def auto_precision(device: torch.device) -> str:
    """``trainer.precision=auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere.

    bf16 on such CPUs rests on the fp32/bf16 accuracy pair of docs/benchmarks.md (same seed,
    real-data subset: ``scripts/gpu_check.py --cpu-precision-check``); elsewhere bf16 is
    emulated and slower than fp32, so auto keeps fp32. ``KD_AUTO_PRECISION`` overrides the CPU's answer.
    """
    if device.type == "cuda":
        return "bf16"
    forced = forced_cpu_precision()
    if device.type == "cpu" and forced is not None:
        return forced
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def forced_cpu_precision() -> str | None:
    """``KD_AUTO_PRECISION`` (fp32 or bf16) when set: what ``auto`` then resolves to on a CPU."""
    value = os.environ.get(AUTO_PRECISION_ENV, "").strip()
    if not value:
        return None
    if value not in CPU_AUTO_CHOICES:
        raise UserError(f"{AUTO_PRECISION_ENV}={value} is not valid; use {' or '.join(CPU_AUTO_CHOICES)}, "
                        f"or unset it to let the CPU decide")
    return value


def make_runtime(trainer_cfg: Any) -> Runtime:
    """Resolve ``trainer.*`` switches for this process (and join the process group under torchrun)."""
    rank, world_size, local_rank = init_distributed(trainer_cfg.device)
    if rank != 0:  # one voice per run: other ranks only report problems
        logging.getLogger("distiller").setLevel(logging.WARNING)
    device = resolve_device(trainer_cfg.device, local_rank)
    precision = str(trainer_cfg.precision)
    if precision == "auto":
        precision = auto_precision(device)
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision={precision} is not valid; use auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("trainer.precision=fp16 needs a CUDA device; on CPU use bf16 or fp32")
    emulated = device.type == "cpu" and not cpu_has_native_bf16() and forced_cpu_precision() is None
    if precision == "bf16" and emulated:
        logging.getLogger("distiller").warning(
            "this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 is emulated and much slower than fp32")
    channels_last = _auto_flag(trainer_cfg.channels_last, device.type == "cuda", "trainer.channels_last")
    compile_ = _auto_flag(trainer_cfg.compile, device.type == "cuda", "trainer.compile")
    if trainer_cfg.get("num_threads"):
        torch.set_num_threads(int(trainer_cfg.num_threads))
    eval_precision = resolve_eval_precision(trainer_cfg.get("eval_precision", "fp32"), precision, device)
    return Runtime(device, precision, channels_last, compile_, rank, world_size, local_rank, eval_precision)


def resolve_eval_precision(value: Any, precision: str, device: torch.device) -> str:
    """``trainer.eval_precision``: fp32 (default), ``same`` (the resolved training precision), bf16 or fp16."""
    value = "fp32" if value is None else str(value)
    if value == "same":
        return precision
    if value not in PRECISIONS:
        raise UserError(f"trainer.eval_precision={value} is not valid; use fp32, same, bf16 or fp16")
    if value == "fp16" and device.type != "cuda":
        raise UserError("trainer.eval_precision=fp16 needs a CUDA device; on CPU use fp32, same or bf16")
    return value


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and str(device_name) != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world_size, local_rank


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states, as plain containers and tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def share_rank0_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers of ``module`` (BatchNorm's running statistics): DDP leaves buffers
    rank-local here and each rank's track its own shard, while rank 0's model is the one saved, so this is
    what every rank must evaluate (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
