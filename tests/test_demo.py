"""The README's main command: the demo runs the three jobs and prints the three accuracies."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def test_demo_prints_teacher_student_and_distilled_accuracy(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--epochs", "1", "--train-size", "200",
         "--teacher", "resnet8", "--student", "resnet8", "--out", str(tmp_path / "demo"), "--",
         f"dataset.root={tmp_path / 'data'}", "dataset.test_size=100", "trainer.device=cpu", "trainer.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()[-3:]
    for line, label in zip(lines, ("teacher", "student alone", "student with KD")):
        assert line.startswith(label), lines
        assert re.search(r"test top-1 +\d+\.\d\d$", line), line
