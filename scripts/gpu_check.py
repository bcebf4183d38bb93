"""The GPU proof in one command: tests, speed, accuracy, compile equality, DDP and packing on one machine.

    python scripts/gpu_check.py                  # on a CUDA machine; about 8 minutes on one H100/H200
    python scripts/gpu_check.py --dry-run        # every step with tiny settings on the CPU (~45 s of CPU)
    python scripts/gpu_check.py --write-subset   # once: the CIFAR-100 subset the accuracy step trains on
    python scripts/gpu_check.py --cpu-precision-check   # fp32 vs bf16 on this CPU, same seed, subset

Steps, in this order, most important first (``--only a,b`` runs some of them):

``tests``        the ``gpu``-marked tests (``pytest -m gpu``, in a subprocess).
``benchmark``    ``scripts/benchmark.py``'s measurement (``distiller.bench.step_speed``, in this process) for
                 resnet32x4->resnet8x4 (kd, crd, dkd), wrn_40_2->wrn_16_2 (kd) and vgg13->MobileNetV2 (kd), each in fp32
                 (fp32, contiguous, eager) and in the default fast path (trainer.* on ``auto``: bf16,
                 channels-last, torch.compile), each against the older frameworks' reference loop.
``compile``      a few KD steps eager vs ``torch.compile`` vs CUDA graphs (compile's ``reduce-overhead``
                 mode), fp32 with TF32 off: the largest relative difference of the losses and weights.
``concurrency``  aggregate images/s of 1, 2, 4 and 8 KD runs started together on one GPU (processes),
                 and the largest per-run memory footprint, which ``hydra/launcher=local_gpus`` reads
                 (``jobs_per_gpu: auto``) from the JSON file written here.
``accuracy``     fp32 vs the fast path, same seed: a small teacher (resnet8x4) trained a few epochs
                 (fast path), then KD into resnet8 in both precisions; then fp32 vs bf16 alone (autocast,
                 nothing else changed) on the same seeds (0 and 1) with that teacher, and one row of
                 bf16 - fp32 per seed and on average: the evidence behind the table presets' fp32 and
                 ordinary runs' bf16. On the CIFAR-100 subset of ``--write-subset`` when it exists
                 (``data/cifar100-subset``), else on synthetic data (then the top-1 pairs only show that
                 the paths train alike).
``ddp``          ``torchrun`` with two ranks (NCCL) when two or more GPUs are present.

A step that fails is reported in the table and the others still run; the exit status is 1 when any
failed, 2 when no CUDA device is present (without ``--dry-run``). The steps share a time budget
(``--budget-s``, 450 s of work after start-up); what would start past it is reported as skipped.
Output: one Markdown table (date, GPU, torch/CUDA versions, command; per row images/s, ms/step,
MFU, peak memory, speedup, accuracy pair) and a JSON file of the same figures, under
``runs/gpu_check/`` (``--out``), paths printed at the end. The table goes into docs/benchmarks.md.
The steps themselves: ``distiller.bench.gpu_check``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common.errors import UserError
from distiller.bench.gpu_check.check_run import cpu_precision_check, parse_steps, run_check
from distiller.bench.gpu_check.check_settings import STEPS, dry_settings, full_settings
from distiller.bench.gpu_check.cifar_subset import (
    REPO,
    SUBSET_DIR,
    SUBSET_PER_CLASS,
    default_source,
    write_cifar_subset,
)
from distiller.bench.gpu_check.concurrency import concurrency_worker
from distiller.config.command_line import OneLineParser, at_least, more_than, zoo_model

EXIT_USER_ERROR = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="every step with tiny settings on the CPU")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps (default: all of {','.join(STEPS)})")
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="folder of the table and JSON file")
    p.add_argument("--budget-s", type=more_than(0), default=None,
                   help="time budget of the steps in seconds (default 450; dry run 3600)")
    p.add_argument("--write-subset", action="store_true", help="write the CIFAR-100 subset and exit")
    p.add_argument("--source", default=None, help="CIFAR-100 to take the subset from (default ../shared/data)")
    p.add_argument("--subset-dir", default=str(SUBSET_DIR), help="where the subset goes")
    p.add_argument("--per-class", default=f"{SUBSET_PER_CLASS[0]},{SUBSET_PER_CLASS[1]}",
                   help="train,test images per class of the subset")
    p.add_argument("--force", action="store_true", help="rewrite the subset even when it exists")
    p.add_argument("--cpu-precision-check", action="store_true",
                   help="fp32 vs bf16 on this CPU, same seed, on the subset (--model, --epochs)")
    p.add_argument("--model", type=zoo_model, default="resnet8", help="network of --cpu-precision-check")
    p.add_argument("--epochs", type=at_least(1), default=3, help="epochs of --cpu-precision-check")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one concurrent run (as the concurrency step's)
    return p.parse_args(argv)


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    return EXIT_USER_ERROR


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return concurrency_worker(Path(args.worker))
    try:
        if args.write_subset:
            per_class = tuple(int(x) for x in args.per_class.split(","))
            if len(per_class) != 2 or min(per_class) < 1:
                raise UserError(f"--per-class {args.per_class}: give train,test images per class, e.g. 140,50")
            folder = write_cifar_subset(Path(args.source) if args.source else default_source(), Path(args.subset_dir),
                                        per_class, args.seed, args.force)
            size = sum(f.stat().st_size for f in folder.iterdir())
            print(f"CIFAR-100 subset: {folder} ({size / 1e6:.1f} MB)")
            return 0
        if args.cpu_precision_check:
            return cpu_precision_check(Path(args.subset_dir), args.model, args.epochs, args.seed, Path(args.out), argv)
        steps = parse_steps(args.only)
        out = Path(args.out)
        if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.absolute().parents):
            raise UserError(f"--out {out} cannot be a folder: it, or a folder above it, is a file; choose another "
                            f"--out")
        if not args.dry_run and not torch.cuda.is_available():
            raise UserError("no CUDA device is present: scripts/gpu_check.py measures the GPU; run it on a CUDA "
                            "machine, or pass --dry-run to rehearse every step on the CPU")
    except UserError as err:
        return _fail(str(err))
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-settings-") as work:
        s = dry_settings(Path(work)) if args.dry_run else full_settings(Path(work))
        # the dry run rehearses every step, however slow a shared CPU is; the GPU check must fit its slot
        budget = args.budget_s if args.budget_s is not None else (3600.0 if args.dry_run else 450.0)
        return run_check(s, steps, Path(args.out), argv, budget)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
