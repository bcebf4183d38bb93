"""Speed of the full distillation step, and the same work done the way the older frameworks do it.

    python scripts/benchmark.py teacher=resnet32x4 student=resnet8x4 distill=kd
    python scripts/benchmark.py distill=crd trainer.device=cuda trainer.compile=false bench.steps=100 bench.rounds=3
    python scripts/benchmark.py --methods new trainer.device=cpu bench.steps=6 bench.rounds=2
    python scripts/benchmark.py --teacher-cache bench.steps=8 bench.warmup=2 bench.rounds=3

``--teacher-cache`` times the step with the live teacher and with the teacher-output cache
(``teacher.cache=true``) on the same batches, alternating rounds, for the pair given or for three pairs
(resnet32x4 -> resnet8x4, resnet56 -> resnet20, wrn_40_2 -> wrn_16_2; KD, fp32 on the CPU unless
``distill=``, ``trainer.device=``, ``trainer.precision=`` say otherwise), with the teacher's build rate
(forwards/s, and the hours a CIFAR-100 cache takes at that rate); a table, then one JSON object
(``{"teacher_cache": [...]}``; ``distiller.bench.cache_speed``).

``--methods SET`` times each method of a preset (``distiller.bench.method_speed.METHOD_SETS``; ``new``:
the 2022-2024 methods next to KD; ``methods_2025``: those of 2023-2026) on the same pair
(resnet32x4 -> resnet8x4 unless ``teacher=``/``student=`` say otherwise) in this process, all built
first and then timed in interleaved rounds (``bench.rounds``), and prints a table with each method's
images/s and its ratio to KD's, then one JSON object (``{"methods": [...]}``). The reference
loop is off there (``bench.reference_steps=0``) unless given; a method whose config does not
exist yet is listed as unavailable, one that fails is reported and the others still run (exit 1).

Overrides are those of ``train_student.py`` (``teacher=``, ``student=``, ``distill=``,
``trainer.device=``, ``trainer.precision=``, ``trainer.channels_last=``, ``trainer.compile=``,
``dataset.batch_size=`` ...) plus the ``bench.*`` keys of ``configs/benchmark.yaml``
(``bench.steps``, ``bench.warmup``, ``bench.reference_steps``, ``bench.data`` ...): the
config is ``benchmark.yaml``, which includes ``train_student.yaml`` and adds ``bench``.
On a shared machine use ``bench.rounds=3``: both loops are timed in alternating rounds and
the best round of each counts. Results and method: ``docs/benchmarks.md``.

Ours: the run assembled as ``train_student.py`` assembles it (``distiller.jobs.train.assemble_distillation``,
the teacher randomly initialised: speed does not depend on its weights), then ``Trainer.train_step`` on
batches of its on-device loader (augmentation included): teacher forward, student forward/backward,
method loss, optimizer step (``distiller.bench.timed_step``).

Reference: the loop of the older CIFAR distillation frameworks on the same images
(``distiller.bench.reference_loop``): a Dataset returning PIL images (torchvision's CIFAR100
``__getitem__``), a torchvision DataLoader with RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor /
Normalize in ``os.cpu_count()`` workers, fp32, contiguous memory, forward hooks on every declared
feature, teacher under ``no_grad``, per-batch ``.item()`` of loss and accuracy, plain
``torch.optim.SGD``; CRD draws its contrast indices in the Dataset with ``np.random.choice``
as RepDistiller's ``CIFAR100InstanceSample`` does. Its networks and loss come from a second,
independent assembly in fp32 (same seed, so the same initial weights).

Timing: ``torch.utils.benchmark.Timer`` (which synchronises the accelerator around each timed
block and runs two untimed calls before it) over ``bench.steps`` back-to-back steps per round.
Printed: a table, then as the last line one JSON object (images_per_sec, ms_per_step,
reference_images_per_sec, speedup, flops_per_image, achieved_flops, peak_flops, mfu,
peak_memory_bytes, device, ...). FLOPs are counted with ``torch.utils.flop_counter`` over
one step (matmuls and convolutions, forward and backward); ``peak_flops`` is measured in
the same run with large matmuls in the run's precision (``Timer.blocked_autorange``), and
``mfu = achieved / peak`` (``distiller.bench.flops``). Peak memory: ``torch.cuda.max_memory_allocated``
on CUDA (over the timed steps), the process's peak resident set size (``getrusage``) on the CPU.
"""
from __future__ import annotations

import json
import sys

from common.errors import UserError
from distiller.bench.bench_settings import compose_benchmark
from distiller.bench.cache_speed import cache_speed_table, measure_cache_speed
from distiller.bench.method_speed import METHOD_SETS, measure_methods, methods_table
from distiller.bench.report import jsonable
from distiller.bench.step_speed import measure_step_speed, step_speed_table
from distiller.config.command_line import debug_mode, fail


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        return measure_and_report(argv)
    except UserError as err:
        if debug_mode():
            raise
        fail(str(err))


def measure_and_report(argv: list[str]) -> int:
    """The mode ``argv`` asks for (``--methods SET``, ``--teacher-cache`` or the step), its table and JSON line."""
    if "--methods" in argv:
        at = argv.index("--methods")
        if at + 1 >= len(argv):
            fail(f"--methods needs a set name: {', '.join(METHOD_SETS)}")
        rows = measure_methods(argv[at + 1], argv[:at] + argv[at + 2:])
        print(methods_table(rows))
        print(json.dumps(jsonable({"methods": rows})), flush=True)
        return 0 if all(r["status"] != "failed" for r in rows) else 1
    if "--teacher-cache" in argv:
        rows = measure_cache_speed([a for a in argv if a != "--teacher-cache"])
        print(cache_speed_table(rows))
        print(json.dumps(jsonable({"teacher_cache": rows})), flush=True)
        return 0
    result = measure_step_speed(compose_benchmark(argv))
    print(step_speed_table(result))
    print(json.dumps(jsonable(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
