"""The whole story on the built-in synthetic data, in about 7 minutes on 2 CPU cores.

1. train a teacher (resnet20) with cross-entropy,
2. train the student (resnet8) alone with cross-entropy, as a baseline,
3. distill the teacher into the student with KD,
then print the three test accuracies. Each step is the command a user would type;
add Hydra overrides after ``--`` to change all three, e.g. ``-- trainer.device=cuda``.

    python scripts/demo.py [--epochs 6] [--train-size 5000] [--teacher resnet20] [--student resnet8] [-- OVERRIDES...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(script: str, overrides: list[str]) -> None:
    command = [sys.executable, str(REPO / script), *overrides]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def top1(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["final_top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each of the three runs")
    parser.add_argument("--train-size", type=int, default=5000, help="synthetic training images")
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--out", default="runs/demo", help="folder for the demo's run directories")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()
    # one folder per setting: rerunning the same demo only prints the stored results
    out = REPO / args.out / f"{args.teacher}-{args.student}-e{args.epochs}-n{args.train_size}"
    common = ["dataset=synthetic", f"dataset.train_size={args.train_size}", f"trainer.epochs={args.epochs}",
              f"teacher_dir={out / 'teachers'}",
              # the published lr decays at 150/180/210 of 240 epochs; keep that shape for a short run
              f"schedule.milestones=[{int(args.epochs * 0.625)},{int(args.epochs * 0.75)},{int(args.epochs * 0.875)}]",
              *args.overrides]
    teacher_dir, baseline_dir, kd_dir = out / "teacher", out / "student_alone", out / "student_kd"
    run("train_teacher.py", [f"model={args.teacher}", f"hydra.run.dir={teacher_dir}", *common])
    run("train_teacher.py", [f"model={args.student}", "save_teacher=false", f"hydra.run.dir={baseline_dir}", *common])
    run("train_student.py", [f"teacher={args.teacher}", f"student={args.student}", "distill=kd",
                             f"hydra.run.dir={kd_dir}", *common])
    print()
    print(f"teacher          {args.teacher:>10}: test top-1 {top1(teacher_dir):6.2f}")
    print(f"student alone    {args.student:>10}: test top-1 {top1(baseline_dir):6.2f}")
    print(f"student with KD  {args.student:>10}: test top-1 {top1(kd_dir):6.2f}")


if __name__ == "__main__":
    main()
