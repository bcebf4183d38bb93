"""The teacher-output cache on real CIFAR-100: a KD run on the cache against the same run with the live teacher.

    python scripts/teacher_cache_check.py                          # /work/shared/data (or $KD_DATA_ROOT)
    python scripts/teacher_cache_check.py --per-class 3,10 --teacher resnet20 --student resnet8 --epochs 60

A full CIFAR-100 cache is 8.1 million teacher forwards (about a day on a 2-core CPU), so the check runs
on a class-balanced subset written in the official format (``--per-class TRAIN,TEST`` images of every
class, ``scripts/gpu_check.py``'s writer). Steps, all in this process, each timed:

1. the subset, under ``--work``;
2. a teacher trained on it with ``train_teacher.py``'s job (``--teacher``, ``--teacher-epochs``), stored
   and indexed in ``--work/teachers``;
3. its cache built by ``scripts/teachers.py cache``'s function: forwards per second;
4. the student distilled with KD from the same seed twice, fp32: ``teacher.cache=false``, then ``true``;
5. compared: the cached rows against the live teacher on the run's own batches, the two students'
   weights, their top-1 after every epoch; the fp16 and bf16 roundings of the cached logits (largest
   absolute and relative error, rows whose argmax changes); with ``--dtype-runs``, the same KD run on an
   fp16 and a bf16 cache (derived from the fp32 one) against the fp32-cache run.

Prints a short report and one JSON object (also written to ``--work/report.json``). Runs that finished
are not run again (rerun the command to resume after a kill).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.files import atomic_write
from datasets import load_dataset
from datasets.device_loader import DeviceLoader
from distiller.bench.gpu_check.cifar_subset import write_cifar_subset
from distiller.config.command_line import OneLineParser, at_least, fail, zoo_model
from distiller.config.compose import compose
from distiller.config.validation import load_job
from distiller.engine.teacher_cache import DTYPES
from distiller.jobs.cache_build import cache_teacher_file
from distiller.jobs.train import distill, train_network
from models import build_model


def data_overrides(root: Path) -> list[str]:
    return ["dataset=cifar100", f"dataset.root={root}", "dataset.verify_checksums=false", "dataset.download=false"]


def common_overrides(args: argparse.Namespace, root: Path) -> list[str]:
    # fp32 both in training and evaluation: the check is about the cache, not about bf16's rounding
    return [*data_overrides(root), f"dataset.batch_size={args.batch}", "dataset.eval_batch_size=500",
            "trainer.device=cpu", "trainer.precision=fp32", "trainer.eval_precision=fp32", "trainer.progress=false",
            "logger=none", f"teacher_dir={args.work / 'teachers'}", f"seed={args.seed}"]


def schedule(epochs: int) -> list[str]:
    return [f"trainer.epochs={epochs}", f"schedule.milestones=[{max(1, (3 * epochs) // 4)}]"]


def metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def images_per_s(run_dir: Path) -> float | None:
    """Training images/s of a run: the median over its epochs (the first one warms up)."""
    rates = sorted(e["images_per_s"] for e in metrics(run_dir)["epochs"][1:] if e.get("images_per_s"))
    return rates[len(rates) // 2] if rates else None


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def weight_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bitwise equality, and the largest |a - b| relative to the tensor's largest |a|, over floating tensors."""
    floats = [k for k in a if a[k].is_floating_point()]
    relative = [float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30))
                for k in floats]
    worst = max(range(len(floats)), key=lambda i: relative[i])
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "tensors": len(floats),
            "tensors_bitwise_equal": sum(torch.equal(a[k], b[k]) for k in floats),
            "max_relative_difference": relative[worst], "worst_tensor": floats[worst]}


def rows_against_live(cache: Any, teacher: torch.nn.Module, data: Any, batch: int, seed: int,
                      epochs: int = 1) -> dict[str, Any]:
    """The cached rows of the run's own batches (the loader's draws for ``seed``) against the live teacher."""
    loader = DeviceLoader(data.train_images, data.train_labels, batch, "cpu", train=True, seed=seed,
                          mean=data.mean, std=data.std)
    diff, scale, equal, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for epoch in range(1, epochs + 1):
            for b in loader.epoch(epoch):
                live, cached = teacher(b.images), cache.lookup(b)
                diff = max(diff, float((live - cached).abs().max()))
                scale = max(scale, float(live.abs().max()))
                equal += int((live == cached).all(dim=1).sum())
                total += len(b)
    return {"rows": total, "rows_bitwise_equal": equal, "max_abs_difference": diff, "max_abs_logit": scale}


def dtype_rounding(logits: torch.Tensor) -> dict[str, dict[str, float]]:
    """What storing the fp32 rows as fp16 / bf16 does to them (what a cache of that dtype holds: each row rounded
    once): largest absolute and relative error, and the share of rows whose argmax (the teacher's class) changes."""
    out = {}
    wide = logits.double()
    for name in ("fp16", "bf16"):
        narrow = logits.to(DTYPES[name]).double()
        error = (narrow - wide).abs()
        big = wide.abs() >= 1e-3  # relative error where it means something (fp16 subnormals below ~6e-5)
        out[name] = {"max_abs_error": float(error.max()), "max_relative_error": float((error[big] / wide.abs()[big])
                                                                                       .max()),
                     "argmax_changed_share": float((narrow.argmax(1) != wide.argmax(1)).double().mean())}
    return out


def student_run(args: argparse.Namespace, root: Path, name: str, *extra: str) -> Path:
    run_dir = args.work / "runs" / name
    cfg = compose("train_student", [f"teacher={args.teacher}", f"student={args.student}", "distill=kd",
                                    *common_overrides(args, root), *schedule(args.epochs), *extra])
    started = time.perf_counter()
    distill(cfg, run_dir)
    print(f"{name}: {time.perf_counter() - started:.0f} s, final top-1 {metrics(run_dir)['final_top1']:.2f}",
          flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path(os.environ.get("KD_DATA_ROOT", "/work/shared/data")))
    p.add_argument("--work", type=Path, default=Path("/tmp/teacher-cache-check"))
    p.add_argument("--per-class", default="3,10", help="TRAIN,TEST images of every class (default 3,10)")
    p.add_argument("--teacher", type=zoo_model, default="resnet20")
    p.add_argument("--student", type=zoo_model, default="resnet8")
    p.add_argument("--teacher-epochs", type=at_least(1), default=30)
    p.add_argument("--epochs", type=at_least(1), default=60, help="student epochs (300 images, batch 64: 5 steps each)")
    p.add_argument("--batch", type=at_least(1), default=64)
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--dtype-runs", action="store_true", help="also the KD run on fp16 and bf16 caches")
    args = p.parse_args(argv)
    pieces = args.per_class.split(",")
    if len(pieces) != 2 or not all(n.strip().isdigit() and int(n) >= 1 for n in pieces):
        p.error(f"--per-class {args.per_class}: give TRAIN,TEST, two whole numbers of at least 1")
    per_class = tuple(int(n) for n in pieces)
    try:
        return _check(args, per_class)
    except UserError as err:
        fail(str(err))
    return 2


def _check(args: argparse.Namespace, per_class: tuple[int, ...]) -> int:
    """Train, build the cache, run live and cached, compare, and write the report."""
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "per_class": per_class,
                              "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                              "pair": f"{args.teacher}->{args.student}", "seed": args.seed}

    root = args.work / "data"
    write_cifar_subset(args.source, root, per_class, seed=args.seed)
    teacher_dir = args.work / "runs" / "teacher"
    started = time.perf_counter()
    train_network(compose("train_teacher", [f"model={args.teacher}", *common_overrides(args, root),
                                            *schedule(args.teacher_epochs)]), teacher_dir)
    report["teacher_top1"] = metrics(teacher_dir)["final_top1"]
    report["teacher_s"] = time.perf_counter() - started
    teacher_file = args.work / "teachers" / f"{args.teacher}.pt"
    print(f"teacher {args.teacher}: top-1 {report['teacher_top1']:.2f} ({report['teacher_s']:.0f} s)", flush=True)

    started = time.perf_counter()
    cache = cache_teacher_file(teacher_file, data_overrides(root), "fp32", "fp32", 256, None, False)
    report["build"] = {"built_now": cache.built, "forwards": cache.key.rows, "seconds": time.perf_counter() - started,
                       "bytes": cache.nbytes}
    header = json.loads(cache.path.with_suffix(".json").read_text())
    report["build"]["forwards_per_s"] = header.get("forwards_per_s")
    print(f"cache: {cache.key.rows} forwards, {header.get('forwards_per_s')} forwards/s", flush=True)

    live = student_run(args, root, "live")
    cached = student_run(args, root, "cached", "teacher.cache=true")
    job = load_job(compose("train_student", [f"teacher={args.teacher}", *data_overrides(root)]), "train_student")
    data = load_dataset(job.dataset)
    teacher = build_model(args.teacher, num_classes=data.num_classes)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True)["model"])
    report["rows_against_live"] = rows_against_live(cache, teacher.eval(), data, args.batch, args.seed)
    report["weights"] = weight_agreement(weights(live), weights(cached))
    tops = {name: [e["test_top1"] for e in metrics(d)["epochs"]] for name, d in (("live", live), ("cached", cached))}
    report["top1"] = {"live": tops["live"][-1], "cached": tops["cached"][-1],
                      "difference": tops["cached"][-1] - tops["live"][-1],
                      "max_epoch_difference": max(abs(a - b) for a, b in zip(tops["live"], tops["cached"]))}
    report["steps"] = args.epochs * -(-len(data.train_labels) // args.batch)
    report["images_per_s"] = {"live": images_per_s(live), "cached": images_per_s(cached)}
    report["dtype_rounding"] = dtype_rounding(cache.logits)
    atomic_write(report, args.work / "report.json", "json")  # the main comparison is kept if what follows is cut
    if args.dtype_runs:
        reference = weights(cached)
        report["dtype_runs"] = {}
        for name in ("fp16", "bf16"):
            run = student_run(args, root, f"cached_{name}", "teacher.cache=true", f"teacher.cache_dtype={name}")
            report["dtype_runs"][name] = {"weights": weight_agreement(reference, weights(run)),
                                          "top1": metrics(run)["final_top1"],
                                          "difference": metrics(run)["final_top1"] - report["top1"]["cached"]}
    atomic_write(report, args.work / "report.json", "json")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
