"""Evaluate a checkpoint on a data set's test split: top-1, top-5, loss, accuracy per class.

    python scripts/evaluate.py runs/teacher/resnet56/seed0/final.pt
    python scripts/evaluate.py save/models/resnet56_vanilla/ckpt_epoch_240.pth dataset=cifar100 --json
    python scripts/evaluate.py weights.pth model=resnet20 dataset=synthetic --per-class

Any checkpoint: ours (final.pt, best.pt, last.pt, a stored teacher), the older frameworks'
``{'model': state_dict}`` files, plain state dicts. The architecture comes from ``model=ARCH`` when
given (a file it does not fit is one line), else from our file's header, else from the parameter
shapes. Overrides are those of training (``dataset=``, ``dataset.*``, ``trainer.device``,
``trainer.precision``, ``trainer.eval_precision``); without ``dataset=`` a checkpoint of ours is
evaluated on the data set it was trained on (its stored config), any other on CIFAR-100.
Evaluation runs in fp32 unless ``trainer.eval_precision=`` or ``trainer.precision=`` says otherwise. For the
widely shared teachers on CIFAR-100, and torchvision's ResNet18/34/50 weights on ImageNet's val
split (``model=torchvision model.name=resnet34 dataset=imagenet dataset.root=DIR``), the measured
top-1 is compared with the published one; a file in an indexed teacher folder is checked against
its index entry. Mistakes end with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from common.errors import UserError
from distiller.config.command_line import OneLineParser, fail
from distiller.jobs.evaluate import evaluate_checkpoint


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the checkpoint file")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="model=ARCH, dataset=NAME, dataset.KEY=VALUE, trainer.device=...")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--per-class", action="store_true", help="list every class's accuracy (text output)")
    return parser.parse_args(argv)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(result: dict[str, Any], per_class: bool = False) -> str:
    """The human-readable report of :func:`evaluate_checkpoint`'s result."""
    lines = [f"checkpoint  {result['checkpoint']} ({result['layout']}: {result['arch']} from {result['arch_from']}, "
             f"{result['num_classes']} classes"
             + (f", epoch {result['epoch']}" if result["epoch"] is not None else "")
             + (f", stored top-1 {_fmt(result['stored_top1'])}" if result["stored_top1"] is not None else "") + ")",
             f"data        {result['dataset']} test split, {result['num_images']} images (data set from "
             f"{result['dataset_from']}; {result['precision']} on {result['device']})",
             f"top-1       {_fmt(result['test_top1'])}",
             f"top-5       {_fmt(result['test_top5'])}",
             f"loss        {result['test_loss']:.4f}"]
    names, per1 = result["class_names"], result["per_class_top1"]
    present = [(acc, c) for c, acc in enumerate(per1) if acc is not None]
    if present:
        (low, lo_c), (high, hi_c) = min(present), max(present)
        lines.append(f"per class   top-1 lowest {_fmt(low)} ({names[lo_c]}), highest {_fmt(high)} ({names[hi_c]})"
                     + ("" if per_class else "; --per-class lists every class"))
    if per_class:
        for c, name in enumerate(names):
            lines.append(f"  {c:4d} {name:<24} top-1 {_fmt(per1[c]):>6}  top-5 {_fmt(result['per_class_top5'][c]):>6}"
                         f"  ({result['per_class_count'][c]} images)")
    if result["published"]:
        p = result["published"]
        verdict = "ok" if p["ok"] else f"more than {p['tolerance']:.1f} below the published number: check the file"
        lines.append(f"published   {result['arch']} {_fmt(p['published_top1'])}; measured {_fmt(p['measured_top1'])} "
                     f"({p['difference']:+.2f}): {verdict}")
    if result["index"]:
        entry = result["index"]["entry"]
        state = "matches" if result["index"]["sha256_matches"] else "DIFFERS from (the file changed since indexed)"
        lines.append(f"index       sha256 {state} the teacher index entry ({entry.get('arch')}, "
                     f"{entry.get('dataset')}, test top-1 {_fmt(entry.get('test_top1'))} when stored "
                     f"{entry.get('date')})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.overrides)
    except UserError as err:
        fail(str(err))
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result, args.per_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
