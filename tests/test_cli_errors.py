"""Bad input as typed: one line on stderr, status 2, no traceback, nothing written.

``tests/test_config.py`` checks each wrong value through ``preflight`` and a few as typed; here the
issue's list is run as a user types it, and a run directory that cannot be created although the
permission bits allow it (``/proc/x/y``: root passes ``os.access`` everywhere, ``/proc`` refuses at
``mkdir``).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from helpers import run_cli, tiny_overrides

from common.errors import UserError
from distiller.config.preflight import preflight
from distiller.config.run_record import check_run_dir

EXIT_USER_ERROR = 2
HAS_PROC = sys.platform.startswith("linux") and Path("/proc/self").is_dir()


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc, where mkdir fails whatever the permissions")
def test_check_run_dir_refuses_a_folder_that_cannot_be_created():
    with pytest.raises(UserError, match=r"hydra\.run\.dir=/proc/x/y cannot be created") as caught:
        check_run_dir(Path("/proc/x/y"))
    assert "\n" not in str(caught.value) and "choose another hydra.run.dir" in str(caught.value)
    assert not Path("/proc/x").exists()


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc, an existing folder that refuses new files")
def test_check_run_dir_refuses_an_existing_folder_that_cannot_be_written():
    with pytest.raises(UserError, match=r"hydra\.run\.dir=/proc "):
        check_run_dir(Path("/proc"))


def test_check_run_dir_leaves_nothing_behind(tmp_path):
    """A creatable run directory passes, and the check removes the folders it made to find out."""
    check_run_dir(tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("old")
    check_run_dir(tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.txt"]


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_preflight_one_line_for_an_uncreatable_run_dir(capsys):
    with pytest.raises(SystemExit) as caught:
        preflight("train_teacher", ["model=resnet8", "dataset=synthetic", "hydra.run.dir=/proc/x/y"])
    assert caught.value.code == EXIT_USER_ERROR
    line = _one_line(capsys.readouterr().err)
    assert line == ("error: hydra.run.dir=/proc/x/y cannot be created or written (No such file or directory); "
                    "choose another hydra.run.dir"), line


# The list, as typed (train_teacher.py; the words the line must hold). Each is refused before
# anything is written: no run directory, no data set generated.
AS_TYPED = [
    (["seed=abc"], ["seed=abc"]),
    (["schedule.milestones=[abc]"], ["schedule.milestones[0]=abc"]),
    (["schedule.milestones=5"], ["schedule.milestones=5", "list"]),
    (["optim.momentum=1.5"], ["optim.momentum=1.5", "< 1"]),
    (["optim.lr=0.1,0.05"], ["optim.lr=0.1,0.05", "add -m", "optim.lr=[0.1,0.05]"]),  # a sweep without -m
    (["optim=sgd,dot"], ["optim=sgd,dot", "several optim choices", "add -m"]),
]


@pytest.mark.parametrize("overrides, words", AS_TYPED, ids=[a[0][0] for a in AS_TYPED])
def test_wrong_value_as_typed(tmp_path, overrides, words):
    result = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={tmp_path / 'run'}",
                     *tiny_overrides(tmp_path), *overrides)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    line = _one_line(result.stderr)
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_uncreatable_run_dir_as_typed(tmp_path):
    result = run_cli("train_teacher.py", "model=resnet8", *tiny_overrides(tmp_path), "hydra.run.dir=/proc/x/y")
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    line = _one_line(result.stderr)
    assert "hydra.run.dir=/proc/x/y cannot be created" in line, line
    assert not (tmp_path / "data").exists() and not (tmp_path / "teachers").exists()


@pytest.mark.parametrize("args, missing", [
    (["scripts/evaluate.py"], "checkpoint"),
    (["scripts/teachers.py", "add"], "file"),
    (["scripts/teachers.py", "cache"], "file"),
    (["scripts/sweep_table.py"], "table"),
])
def test_a_missing_argument_is_named_alone(args: list, missing: str) -> None:
    """The overrides a command takes are optional: the line names only the argument that is missing."""
    result = run_cli(*args)
    assert result.returncode == 2
    (line,) = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("usage:")
               and not x.startswith(" ")]
    assert line.rstrip().endswith(f"required: {missing}") or f"required: {missing} (see --help)" in line, line


@pytest.mark.parametrize("args, words", [
    (["crd_tabel1", "--dry-run"], ["invalid choice: 'crd_tabel1'"]),
    (["crd_table1", "seeed=0", "--dry-run"], ["'seeed' does not exist", "did you mean seed?"]),
    (["dkd", "distill=kdd", "--dry-run"], ["unknown distill 'kdd'", "Did you mean 'kd'?"]),
    (["dkd", "seed=0,l", "--dry-run"], ["seed=l is not a whole number"]),
    (["imagenet"], ["dataset.root", "has no value"]),  # checked before any job would start
    # an override that clashes with the preset's own cells (its pairs), found before any job starts
    (["crd_table1", "teacher=resnet8", "--dry-run"], ["pair=wrn_40_2-wrn_16_2 carries the settings published",
                                                       "distills resnet8 -> wrn_16_2", "nothing was run"]),
    # another preset in the overrides would run under this table's name
    (["crd_table1", "experiment=dkd_tables", "--dry-run"], ["experiment= is not an override of a table"]),
    (["crd_table1", "distill=dkd", "--dry-run"], ["no cell of the crd_table1 table has distill=dkd",
                                                   "python train_student.py -m experiment=crd_table1 distill=dkd"]),
])
def test_sweep_table_checks_its_overrides_first_in_one_line(args: list, words: list) -> None:
    result = run_cli("scripts/sweep_table.py", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and all(w in line for w in words), line
    assert "$ " not in result.stdout  # no preset was started (nor listed)


def test_overrides_may_follow_a_scripts_options() -> None:
    """``evaluate.py FILE --json trainer.device=cpu``: the override after the option is an override."""
    result = run_cli("scripts/evaluate.py", "missing.pt", "--json", "trainer.device=cpu")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: checkpoint not found: missing.pt"]
    bogus = run_cli("scripts/evaluate.py", "missing.pt", "--jsn")
    assert bogus.stderr.splitlines() == ["error: unrecognized arguments: --jsn (see --help)"]


@pytest.mark.parametrize("args, line", [
    (["scripts/stream_benchmark.py", "--images", "0"], "error: argument --images: 0 is less than 2 (see --help)"),
    (["scripts/stream_benchmark.py", "--workers", "0"], "error: argument --workers: 0 is less than 1 (see --help)"),
    (["scripts/stream_memory.py", "--images", "-5"], "error: argument --images: -5 is less than 2 (see --help)"),
    (["scripts/teacher_cache_check.py", "--epochs", "x"],
     "error: argument --epochs: 'x' is not a whole number (see --help)"),
    (["scripts/teacher_cache_check.py", "--per-class", "3"],
     "error: --per-class 3: give TRAIN,TEST, two whole numbers of at least 1 (see --help)"),
    (["scripts/gpu_check.py", "--cpu-precision-check", "--epochs", "0"],
     "error: argument --epochs: 0 is less than 1 (see --help)"),
    (["scripts/gpu_check.py", "--nope"], "error: unrecognized arguments: --nope (see --help)"),
    # a negative budget skipped every step with status 0; an --only of commas ran none; a misspelt network was
    # a 93-line Hydra report after the script had written its data
    (["scripts/gpu_check.py", "--budget-s", "-5", "--dry-run"],
     "error: argument --budget-s: -5 is not greater than 0 (see --help)"),
    (["scripts/gpu_check.py", "--only", ",", "--dry-run"],
     "error: --only ',' names no step; give one or more of tests,benchmark,compile,concurrency,accuracy,ddp, "
     "comma-separated"),
    (["scripts/demo.py", "--data-root", "/nonexistent"],
     "error: --data-root is the folder of the real CIFAR-100: add --real to use it (the built-in data needs no "
     "folder) (see --help)"),
    (["scripts/teachers.py", "cache", "x.pt", "--batch-size", "0"],
     "error: argument --batch-size: 0 is less than 1 (see --help)"),
])
def test_the_measurement_scripts_refuse_bad_numbers_in_one_line(args: list, line: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.splitlines() == [line], result.stderr[-2000:]


def test_a_misspelt_network_is_the_parsers_line_naming_the_zoo(tmp_path: Path) -> None:
    """teacher_cache_check.py --teacher resnet9 was a 93-line Hydra report, after the script had written its data."""
    from models import list_models

    result = run_cli("scripts/teacher_cache_check.py", "--teacher", "resnet9", "--work", str(tmp_path / "w"))
    line = _one_line(result.stderr)
    assert result.returncode == 2 and line.startswith("error: argument --teacher: unknown model 'resnet9'. Did you "
                                                      "mean 'resnet8'? Valid models: "), line
    assert all(name in line for name in list_models()) and not (tmp_path / "w").exists()


def test_the_measurement_scripts_refuse_a_missing_folder_in_one_line(tmp_path: Path) -> None:
    """A folder that is not there is the one line of the data's own check, not a traceback (nor a warning)."""
    result = run_cli("scripts/stream_benchmark.py", "--root", str(tmp_path / "none"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {tmp_path / 'none' / 'train'} holds no .JPEG files: give an ImageNet-layout folder "
        "(train/<wnid>/*.JPEG and val/<wnid>/*.JPEG), or leave --root out to generate one"], result.stderr
    cifar = run_cli("scripts/teacher_cache_check.py", "--source", str(tmp_path / "none"), "--work", str(tmp_path / "w"))
    assert cifar.returncode == 2 and len(cifar.stderr.splitlines()) == 1 and "no CIFAR-100" in cifar.stderr


# ---- table presets (experiment=) run as their sweep, with their own entry point -----------------------------
@pytest.mark.parametrize("script, args, words", [
    # without -m Hydra ignores a preset's sweep and would run the defaults as one job
    ("train_student.py", ["experiment=crd_table1"],
     ["experiment=crd_table1 is a sweep over pair, distill, seed", "add -m", "pair=... distill=..."]),
    ("train_teacher.py", ["experiment=table_teachers"], ["experiment=table_teachers is a sweep over model", "add -m"]),
    # the other entry point's preset: Hydra's own report was four lines advising +model=...
    ("train_student.py", ["-m", "experiment=table_teachers"],
     ["sweeps model, which train_student.py has not", "python train_teacher.py -m experiment=table_teachers"]),
    ("train_teacher.py", ["-m", "experiment=crd_table1"],
     ["sweeps pair, which train_teacher.py has not", "python train_student.py -m experiment=crd_table1"]),
])
def test_a_table_preset_outside_its_sweep_is_one_line_and_writes_nothing(tmp_path, script, args, words) -> None:
    result = run_cli(script, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    line = _one_line(result.stderr)
    assert result.returncode == EXIT_USER_ERROR and all(w in line for w in words), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_cell_of_a_table_preset_runs_without_m() -> None:
    """Every swept key but the seed (0 unless given) chosen: one job, as the preset's cell."""
    preflight("train_student", ["experiment=mlkd_paper", "pair=resnet56-resnet20", "distill=mlkd"])
    preflight("train_student", ["experiment=imagenet/r34_r18/dkd", "dataset.root=."])  # a one-job preset


@pytest.mark.parametrize("script", ["train_teacher.py", "train_student.py"])
@pytest.mark.parametrize("variable, key", [("KD_TEACHER_DIR", "teacher_dir"), ("KD_DATA_ROOT", "dataset.root")])
def test_an_empty_path_variable_is_one_line_for_both_entry_points(tmp_path, script, variable, key) -> None:
    """Set but empty: the teacher job stored into the working folder while the student looked in '/'."""
    result = run_cli(script, "dataset=synthetic", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                     env={variable: ""})
    line = _one_line(result.stderr)
    assert result.returncode == EXIT_USER_ERROR and line.startswith(f"error: {key} is empty") and variable in line
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_whose_jobs_would_share_a_run_directory_is_one_line_before_any_runs(capsys) -> None:
    """distill.temperature is not in the run folder's name: job #1 was refused as 'a different run' after job #0
    trained (and trainer.force=true, the advice then, moved #0's results aside)."""
    with pytest.raises(SystemExit) as caught:
        preflight("train_student", ["-m", "distill.temperature=2,3"])
    line = _one_line(capsys.readouterr().err)
    assert caught.value.code == EXIT_USER_ERROR
    assert ("jobs with distill.temperature=2 and distill.temperature=3 would share one run directory "
            "(resnet32x4-resnet8x4/kd/seed0)") in line, line
    # what the line advises, pasted into a shell (shlex.split reads it as the shell does): the key in the folder
    # name, one value for Hydra although it holds commas, and the sweep is accepted
    advised = line.split("e.g. ")[1].split(", or run one value")[0]
    argv = shlex.split(advised)
    assert len(argv) == 1 and argv[0].startswith("hydra.sweep.subdir=") and "${distill.temperature}" in argv[0]
    preflight("train_student", ["-m", "distill.temperature=2,3", *argv])
    preflight("train_student", ["-m", "distill=kd,dkd", "seed=0,1"])  # keys the folder names hold


def test_a_value_named_twice_in_a_sweep_is_one_line(capsys) -> None:
    """seed=0,0 made two identical jobs, and the check of their shared folder died on an IndexError."""
    with pytest.raises(SystemExit) as caught:
        preflight("train_student", ["-m", "seed=0,0"])
    line = _one_line(capsys.readouterr().err)
    assert caught.value.code == EXIT_USER_ERROR and "seed=0 more than once (seed=0,0)" in line, line


@pytest.mark.parametrize("script", ["train_teacher.py", "train_student.py"])
def test_the_run_and_sweep_folders_are_checked_before_anything_is_written(tmp_path: Path, script: str) -> None:
    """An empty hydra.run.dir trained into the folder the command started in; a sweep folder that is a file
    ended in a FileExistsError traceback; hydra.job.chdir=true moved every relative path the job reads."""
    (tmp_path / "taken").write_text("a file")
    cases = [(["hydra.run.dir="], "hydra.run.dir is empty"),
             (["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'taken'}"],
              f"hydra.sweep.dir={tmp_path / 'taken'} is a file, not a directory"),
             (["hydra.job.chdir=true", f"hydra.run.dir={tmp_path / 'run'}"], "hydra.job.chdir=true is not supported")]
    for args, words in cases:
        result = run_cli(script, "dataset=synthetic", *args, cwd=tmp_path)
        line = _one_line(result.stderr)
        assert result.returncode == EXIT_USER_ERROR and words in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_gpu_checks_out_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """It ran the steps, then died on a FileExistsError writing the table."""
    (tmp_path / "taken").write_text("a file")
    result = run_cli("scripts/gpu_check.py", "--out", str(tmp_path / "taken"), "--dry-run")
    line = _one_line(result.stderr)
    assert result.returncode == 2 and f"--out {tmp_path / 'taken'} cannot be a folder" in line, line
    assert (tmp_path / "taken").read_text() == "a file"
