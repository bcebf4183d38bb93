"""The results collector on run directories written here with known numbers (no training).

Expected means / stds are worked out by hand below, and the published numbers are typed from
RECIPES.md's paper tables, never taken from the collector itself.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

from common.errors import UserError
from distiller.results import published, tables
from distiller.results import runs as run_dirs


def write_run(root: Path, teacher: str | None, student: str, method: str, seed: int | str, final: float | None,
              best: float | None, status: str = "finished", epochs: int = 3, hydra_only: bool = False,
              time_s: float = 60.0, extra: dict | None = None, config_extra: dict | None = None) -> Path:
    """A run directory as the engine leaves it: config.yaml, .hydra/config.yaml, metrics.json."""
    if teacher is None:
        path = root / "teacher" / student / f"seed{seed}"
        config = {"model": {"name": student, "lr": 0.05}, "seed": seed, "trainer": {"epochs": epochs}}
    else:
        path = root / "student" / f"{teacher}-{student}" / method / f"seed{seed}"
        config = {"teacher": {"name": teacher, "ckpt": "${teacher_dir}/x.pt"}, "student": {"name": student},
                  "distill": {"name": method, "method": method}, "combine": {}, "seed": seed,
                  "trainer": {"epochs": epochs}}
    config.update(config_extra or {})
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if hydra_only:  # a job that died before the engine wrote anything
        return path
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    done = epochs if status == "finished" else 1
    history = [{"epoch": e + 1, "train_loss": 1.0, "test_top1": final if e == done - 1 else 1.0,
                "test_top5": 90.0, "lr": 0.05, "time_s": time_s} for e in range(done)]
    (path / "metrics.json").write_text(json.dumps({
        "status": status, "final_top1": final, "best_top1": best, "final_top5": 90.0, "epochs": history,
        **(extra or {})}))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    # resnet32x4 -> resnet8x4, KD: last 70, 71, 72 (mean 71, std 1); best 72, 72, 75 (mean 73, std sqrt 3)
    for seed, (final, best) in enumerate([(70.0, 72.0), (71.0, 72.0), (72.0, 75.0)]):
        write_run(root, "resnet32x4", "resnet8x4", "kd", seed, final, best)
    # CRD+KD (config name crd_kd): one run -> mean only, no std
    write_run(root, "resnet32x4", "resnet8x4", "crd_kd", 0, 74.5, 75.0)
    # DKD: two finished (last 76, 77 -> 76.5 +- 0.7071), one still running, one that never wrote metrics
    write_run(root, "resnet32x4", "resnet8x4", "dkd", 0, 76.0, 76.5)
    write_run(root, "resnet32x4", "resnet8x4", "dkd", 1, 77.0, 77.5)
    write_run(root, "resnet32x4", "resnet8x4", "dkd", 2, 40.0, 40.0, status="running")
    write_run(root, "resnet32x4", "resnet8x4", "dkd", 3, None, None, hydra_only=True)
    write_run(root, "resnet32x4", "resnet8x4", "dkd", 4, 30.0, 30.0, status="failed",
              extra={"error": "non-finite kd at epoch 1, step 7"})
    # plain cross-entropy runs: the pair's teacher (1 run) and student (2 runs: 72, 73)
    write_run(root, None, "resnet32x4", "ce", 0, 79.0, 79.5)
    write_run(root, None, "resnet8x4", "ce", 0, 72.0, 72.4)
    write_run(root, None, "resnet8x4", "ce", 1, 73.0, 73.4)
    # a second pair, for the figure and grouping
    write_run(root, "resnet56", "resnet20", "at", 0, 70.0, 70.2)
    return root


def rows_by_key(csv_path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(csv_path, newline="") as f:
        return {(r["teacher"], r["student"], r["method"]): r for r in csv.DictReader(f)}


def test_means_stds_and_published_numbers(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report" / "table"
    tables.collect([str(runs)], out)
    rows = rows_by_key(out.with_suffix(".csv"))

    kd = rows[("resnet32x4", "resnet8x4", "kd")]
    assert kd["runs"] == "3"
    assert float(kd["last_top1_mean"]) == pytest.approx(71.0)
    assert float(kd["last_top1_std"]) == pytest.approx(1.0)
    assert float(kd["best_top1_mean"]) == pytest.approx(73.0)
    assert float(kd["best_top1_std"]) == pytest.approx(math.sqrt(3.0), abs=1e-4)
    # published: KD 73.33 in both the CRD table (last-epoch protocol) and the DKD table (best epoch)
    assert float(kd["crd_published"]) == pytest.approx(73.33)
    assert float(kd["crd_diff"]) == pytest.approx(71.0 - 73.33, abs=1e-4)
    assert float(kd["dkd_published"]) == pytest.approx(73.33)
    assert float(kd["dkd_diff"]) == pytest.approx(73.0 - 73.33, abs=1e-4)
    assert kd["seeds"] == "0 1 2"
    assert float(kd["hours_per_run"]) == pytest.approx(3 * 60.0 / 3600.0, abs=1e-4)

    # "CRD+KD" in the paper's CSV is our crd_kd; one run has no std
    crd_kd = rows[("resnet32x4", "resnet8x4", "crd_kd")]
    assert float(crd_kd["crd_published"]) == pytest.approx(75.46)
    assert crd_kd["dkd_published"] == ""
    assert crd_kd["runs"] == "1" and crd_kd["last_top1_std"] == ""

    # DKD: the running run and the one without metrics are counted as not finished, not averaged
    dkd = rows[("resnet32x4", "resnet8x4", "dkd")]
    assert dkd["runs"] == "2" and dkd["not_finished"] == "3"
    assert float(dkd["last_top1_mean"]) == pytest.approx(76.5)
    assert float(dkd["last_top1_std"]) == pytest.approx(math.sqrt(0.5), abs=1e-4)
    assert float(dkd["dkd_published"]) == pytest.approx(76.32)
    assert float(dkd["dkd_diff"]) == pytest.approx(77.0 - 76.32, abs=1e-4)  # best-epoch mean 77.0

    # baselines: the pair's teacher / student rows come from the plain cross-entropy runs
    teacher = rows[("resnet32x4", "resnet8x4", "teacher")]
    assert teacher["runs"] == "1" and float(teacher["last_top1_mean"]) == pytest.approx(79.0)
    assert float(teacher["crd_published"]) == pytest.approx(79.42)
    student = rows[("resnet32x4", "resnet8x4", "student")]
    assert float(student["last_top1_mean"]) == pytest.approx(72.5)
    assert float(student["crd_published"]) == pytest.approx(72.50)

    at = rows[("resnet56", "resnet20", "at")]
    assert float(at["crd_published"]) == pytest.approx(70.55)

    markdown = out.with_suffix(".md").read_text()
    assert "## resnet32x4 → resnet8x4" in markdown
    assert "| kd | 3 | 71.00 ± 1.00 | 73.00 ± 1.73 | 73.33 | -2.33 | 73.33 | -0.33 |" in markdown
    # unfinished runs are listed with their directory and status
    assert "## Runs not finished" in markdown
    assert f"{runs / 'student/resnet32x4-resnet8x4/dkd/seed2'} | running | 1 / 3 |  |" in markdown
    assert f"{runs / 'student/resnet32x4-resnet8x4/dkd/seed3'} | no metrics | 0 / 3 |  |" in markdown
    assert (f"{runs / 'student/resnet32x4-resnet8x4/dkd/seed4'} | failed | 1 / 3 | "
            "non-finite kd at epoch 1, step 7 |") in markdown
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_tidy_runs_csv_loads_with_pandas(runs: Path, tmp_path: Path) -> None:
    """``<out>_runs.csv``: one row per run directory, whose groups give the hand-computed statistics."""
    import pandas as pd

    out = tmp_path / "tidy" / "table"
    tables.collect([str(runs)], out, figure=False)
    frame = pd.read_csv(tmp_path / "tidy" / "table_runs.csv")
    assert len(frame) == 13  # 3 kd + 1 crd_kd + 5 dkd + 1 at + 3 plain cross-entropy runs
    for column in ("run_dir", "kind", "teacher", "student", "method", "seed", "status", "final_top1", "best_top1",
                   "final_top5", "best_top5", "epochs_done", "hours", "error"):
        assert column in frame.columns, column
    kd = frame[(frame["method"] == "kd") & (frame["status"] == "finished")].sort_values("seed")
    assert kd["seed"].tolist() == [0, 1, 2] and set(kd["teacher"]) == {"resnet32x4"}
    # last 70, 71, 72: mean 71, sample std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1;
    # best 72, 72, 75: mean 73, sample std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    assert kd["final_top1"].mean() == pytest.approx(71.0) and kd["final_top1"].std() == pytest.approx(1.0)
    assert kd["best_top1"].mean() == pytest.approx(73.0) and kd["best_top1"].std() == pytest.approx(math.sqrt(3.0))
    assert kd["hours"].tolist() == pytest.approx([3 * 60.0 / 3600.0] * 3)
    assert (kd["final_top5"] == 90.0).all() and (kd["best_top5"] == 90.0).all()
    dkd = frame[frame["method"] == "dkd"].set_index("seed")
    assert dkd["status"].to_dict() == {0: "finished", 1: "finished", 2: "running", 3: "no metrics", 4: "failed"}
    assert dkd.loc[4, "error"] == "non-finite kd at epoch 1, step 7"
    assert dkd.loc[3, "epochs_done"] == 0 and pd.isna(dkd.loc[3, "final_top1"])
    plain = frame[frame["kind"] == "teacher"]
    assert set(plain["method"]) == {"ce"} and plain["teacher"].isna().all()
    assert sorted(plain["student"]) == ["resnet32x4", "resnet8x4", "resnet8x4"]


def test_glob_selects_runs_and_table_layout(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "t1"
    rows, found = tables.collect([str(runs / "student" / "*-resnet8x4" / "kd" / "seed*")], out,
                             tables=["crd_table1"], figure=False)
    assert len(found) == 3 and all(r.method == "kd" for r in found)
    # CRD Table 1 has 7 pairs x (teacher, student, 14 methods) minus FSP on wrn_40_2 -> wrn_40_1
    assert len(rows) == 7 * 16 - 1
    fsp_pairs = {(r.teacher, r.student) for r in rows if r.method == "fsp"}
    assert ("wrn_40_2", "wrn_40_1") not in fsp_pairs and len(fsp_pairs) == 6
    ran = [r for r in rows if r.last.n]
    assert [(r.teacher, r.student, r.method) for r in ran] == [("resnet32x4", "resnet8x4", "kd")]
    # cells not run yet keep their published number
    assert next(r for r in rows if (r.student, r.method) == ("wrn_16_2", "crd")).published["crd"] == 75.48


def test_cli_prints_markdown_and_rejects_bad_input(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli" / "res"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), str(runs),
                             "--out", str(out), "--no-figure", "--sources", "crd,dkd,mdistiller"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| kd | 3 | 71.00 ± 1.00 |" in result.stdout
    assert "mdistiller README" in result.stdout
    assert out.with_suffix(".csv").exists() and not out.with_suffix(".png").exists()
    missing = run_cli("scripts/collect_results.py", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run_cli("scripts/collect_results.py", str(runs), "--out", str(tmp_path / "y"), "--table", "crd_table9")
    assert unknown.returncode == 2 and "unknown table 'crd_table9'" in unknown.stderr


def test_a_wrong_table_name_stops_the_collector_before_it_reads_a_run(runs: Path, tmp_path: Path, monkeypatch) -> None:
    """A typo in --table over a large runs tree is reported at once, not after every run was read."""
    def no_reading(paths):
        raise AssertionError("the runs were read before the table name was checked")

    monkeypatch.setattr(tables, "read_runs", no_reading)
    with pytest.raises(UserError, match="unknown table 'crd_table9'"):
        tables.collect([str(runs)], tmp_path / "res", tables=["crd_table9"], figure=False)
    assert not list(tmp_path.glob("res*"))


def test_unknown_paper_method_name_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "crd_paper_repdistiller_readme.csv").write_text(
        "table,teacher,student,method,top1\nt,resnet56,resnet20,Hint-KD,70.0\n")
    with pytest.raises(UserError, match="Hint-KD"):
        published.load_published(["crd"], folder=tmp_path)


def test_paper_tables_are_the_shared_data() -> None:
    """The project's copy of the published numbers is the shared research notes' data, unchanged."""
    shared = REPO.parent / "shared" / "docs" / "paper_tables"
    if not shared.is_dir():
        pytest.skip("shared research notes not present")
    for source in published.SOURCES.values():
        if source.key == "imagenet":  # gathered for the ImageNet tables, not from the notes (its README row)
            continue
        assert (published.PAPER_TABLES / source.file).read_text() == (shared / source.file).read_text()


def test_combined_methods_are_labelled_like_their_run_directories(tmp_path: Path) -> None:
    """distill=crd plus +distill@combine.at=at is the group "crd+at" (the run directory's label), read
    from the engine's resolved config, or rebuilt from Hydra's copy when only that exists."""
    root = tmp_path / "runs"
    resolved = write_run(root, "resnet32x4", "resnet8x4", "crd+at", 0, 75.0, 75.5)
    config = yaml.safe_load((resolved / "config.yaml").read_text())
    config.update(distill={"name": "crd"}, combine={"at": {"name": "at", "beta": 500.0}}, method_label="crd+at")
    (resolved / "config.yaml").write_text(yaml.safe_dump(config))
    hydra_only = write_run(root, "resnet32x4", "resnet8x4", "crd+at", 1, None, None, hydra_only=True)
    config["method_label"] = "${method_label:${distill.name},${combine}}"
    (hydra_only / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    runs = [run_dirs.read_run(p) for p in run_dirs.find_run_dirs([str(root)])]
    assert sorted((r.method, r.status) for r in runs) == [("crd+at", "finished"), ("crd+at", "no metrics")]


# ---- runs that must not be averaged, and runs that cannot be read -----------------------------------
def on(dataset: str, epochs: int = 240, lr: float = 0.05) -> dict:
    """The config keys that say where and how a run was trained."""
    return {"dataset": {"name": dataset}, "trainer": {"epochs": epochs}, "optim": {"name": "sgd", "lr": lr},
            "schedule": {"name": "step", "milestones": [150, 180, 210], "gamma": 0.1}}


def test_runs_on_two_data_sets_are_summarised_apart(tmp_path: Path, monkeypatch) -> None:
    """A CIFAR-100 run and an image-folder run of one cell: two rows, each its own mean, the data set named."""
    import matplotlib.figure

    root = tmp_path / "runs"
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 72.0, 73.0, config_extra=on("cifar100"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 74.0, 75.0, config_extra=on("cifar100"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 2, 10.0, 12.0, config_extra=on("imagefolder"))
    write_run(root, None, "resnet32x4", "ce", 0, 79.0, 79.5, config_extra=on("cifar100"))
    write_run(root, None, "resnet32x4", "ce", 1, 20.0, 21.0, config_extra=on("imagefolder"))
    titles: list[str] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.extend(ax.get_title() for ax in fig.axes if ax.get_title()))
    out = tmp_path / "report" / "table"
    rows, _ = tables.collect([str(root)], out)
    by_key = {(r.dataset, r.method): r for r in rows}
    kd, kd_folder = by_key[("cifar100", "kd")], by_key[("imagefolder", "kd")]
    assert (kd.last.n, kd.last.mean, kd.last.std) == (2, 73.0, pytest.approx(math.sqrt(2.0)))  # 72, 74
    assert (kd_folder.last.n, kd_folder.last.mean) == (1, 10.0)
    assert by_key[("cifar100", "teacher")].last.mean == 79.0 and by_key[("imagefolder", "teacher")].last.mean == 20.0
    assert kd.our_recipe == "240 ep, lr 0.05, step x0.1 at 150/180/210"
    with open(out.with_suffix(".csv"), newline="") as f:
        summary = {(r["dataset"], r["method"]): r for r in csv.DictReader(f)}
    assert summary[("imagefolder", "kd")]["runs"] == "1" and summary[("cifar100", "kd")]["runs"] == "2"
    markdown = out.with_suffix(".md").read_text()
    assert "Data sets (each summarised apart): cifar100 (3 runs), imagefolder (2 runs)." in markdown
    assert "## resnet32x4 → resnet8x4 (cifar100)" in markdown and "## resnet32x4 → resnet8x4 (imagefolder)" in markdown
    assert titles == ["resnet32x4 → resnet8x4 (cifar100)", "resnet32x4 → resnet8x4 (imagefolder)"]


def test_published_numbers_stand_only_beside_runs_on_their_data_set(tmp_path: Path) -> None:
    """KD resnet32x4 -> resnet8x4 is 73.33 on CIFAR-100 (CRD and DKD papers); a synthetic-data or
    image-folder run of the same cell has no published number, so no difference to it either."""
    root = tmp_path / "runs"
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 72.0, 73.0, config_extra=on("cifar100"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 2.0, 3.0, config_extra=on("synthetic"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 2, 10.0, 12.0, config_extra=on("imagefolder"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 3, 70.0, 71.0)  # recorded no data set: compared as before
    out = tmp_path / "report" / "table"
    rows, _ = tables.collect([str(root)], out, figure=False)
    kd = {r.dataset: r for r in rows if r.method == "kd"}
    assert kd["cifar100"].published == {"crd": 73.33, "dkd": 73.33, "post_dkd": 73.33}
    assert kd["synthetic"].published == {"crd": None, "dkd": None, "post_dkd": None}
    assert kd["imagefolder"].published == {"crd": None, "dkd": None, "post_dkd": None}
    assert kd[""].published["crd"] == 73.33
    with open(out.with_suffix(".csv"), newline="") as f:
        summary = {(r["dataset"], r["method"]): r for r in csv.DictReader(f)}
    assert summary[("synthetic", "kd")]["crd_diff"] == "" and summary[("synthetic", "teacher")]["crd_published"] == ""
    assert float(summary[("cifar100", "kd")]["crd_diff"]) == pytest.approx(72.0 - 73.33, abs=1e-4)


def test_runs_of_one_cell_with_different_recipes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    long = write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 72.0, 73.0, config_extra=on("cifar100"))
    short = write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 30.0, 31.0, config_extra=on("cifar100", epochs=1))
    write_run(root, "resnet32x4", "resnet8x4", "at", 0, 71.0, 72.0, config_extra=on("cifar100", lr=0.1))  # own cell
    out = tmp_path / "report" / "table"
    with pytest.raises(UserError) as err:
        tables.collect([str(root)], out)
    assert str(err.value) == (
        f"the runs of kd on resnet32x4 → resnet8x4 on cifar100 differ in recipe and cannot be averaged: "
        f"1 ep, lr 0.05, step x0.1 at 150/180/210 (1 run, e.g. {short}); 240 ep, lr 0.05, step x0.1 at "
        f"150/180/210 (1 run, e.g. {long}); collect one recipe at a time (name its run directories or a glob)")
    assert not out.parent.exists()  # nothing written
    rows, _ = tables.collect([str(long), str(root / "student" / "resnet32x4-resnet8x4" / "at")], out, figure=False)
    assert {r.method: r.last.mean for r in rows if r.last.n} == {"kd": 72.0, "at": 71.0}


def test_unreadable_run_directories_are_skipped_with_a_warning(runs: Path, tmp_path: Path, capsys) -> None:
    """A sweep job that died on a typo (seed=abc), a truncated metrics.json, a non-number top-1: each is named."""
    typo = write_run(runs, "resnet32x4", "resnet8x4", "kd", "abc", None, None, hydra_only=True)
    truncated = write_run(runs, "resnet32x4", "resnet8x4", "kd", 7, 70.0, 71.0)
    (truncated / "metrics.json").write_text((truncated / "metrics.json").read_text()[:40])
    garbled = write_run(runs, "resnet32x4", "resnet8x4", "kd", 8, 70.0, 71.0)
    metrics = json.loads((garbled / "metrics.json").read_text())
    (garbled / "metrics.json").write_text(json.dumps({**metrics, "final_top1": "n/a"}))
    out = tmp_path / "report" / "table"
    rows, found = tables.collect([str(runs)], out, figure=False)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3 and "Traceback" not in "".join(warnings)
    assert f"warning: skipped {typo.resolve()}: seed='abc' is not an integer" in warnings
    assert f"warning: skipped {garbled.resolve()}: final_top1='n/a' is not a number" in warnings
    assert any(w.startswith(f"warning: skipped {truncated.resolve()}: metrics.json is unreadable (") for w in warnings)
    assert len(found) == 13  # the fixture's runs, all still there
    kd = next(r for r in rows if (r.teacher, r.method) == ("resnet32x4", "kd"))
    assert (kd.last.n, kd.last.mean) == (3, 71.0)  # as without the damaged runs


def test_a_folder_without_runs_is_status_2_and_keeps_earlier_results(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report" / "table"
    assert run_cli("scripts/collect_results.py", str(runs), "--out", str(out), "--no-figure").returncode == 0
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    (tmp_path / "empty").mkdir()
    captured = run_cli("scripts/collect_results.py", str(tmp_path / "empty"), "--out", str(out), "--no-figure")
    assert captured.returncode == 2
    assert captured.stderr.splitlines() == [
        f"error: no run directories under {tmp_path / 'empty'}: nothing was written "
        f"(the earlier results at {out} are kept); give run directories, multirun folders or globs"]
    assert captured.stdout == ""
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
    # with no earlier results the line claims none
    fresh = run_cli("scripts/collect_results.py", str(tmp_path / "empty"), "--out", str(tmp_path / "new" / "t"))
    assert fresh.returncode == 2 and fresh.stderr.splitlines() == [
        f"error: no run directories under {tmp_path / 'empty'}: nothing was written; give run directories, "
        "multirun folders or globs"]


def test_an_out_the_files_cannot_take_is_one_line_before_anything_is_written(runs: Path, tmp_path: Path) -> None:
    """An --out under a file, empty, a folder, or whose .md name is a folder: tracebacks (FileExistsError,
    ValueError, IsADirectoryError), or files written beside the folder the user named."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "t.md").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, words in [(tmp_path / "a_file" / "x", f"{tmp_path / 'a_file'} is a file, not a folder"),
                       ("", "--out is empty"),
                       (tmp_path / "folder", f"--out {tmp_path / 'folder'} is a folder"),
                       (tmp_path / "t", f"would write {tmp_path / 't.md'}, which is a folder")]:
        result = run_cli("scripts/collect_results.py", str(runs), "--out", str(out), "--no-figure")
        lines = result.stderr.splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_folder_of_unreadable_runs_is_one_line_naming_why(tmp_path: Path) -> None:
    """Nothing readable: the one error line says how many were skipped and why the first was."""
    broken = tmp_path / "odd" / "runA"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text("{not json")
    result = run_cli("scripts/collect_results.py", str(tmp_path / "odd"), "--out", str(tmp_path / "r"), "--no-figure")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: no readable run directories under {tmp_path / 'odd'} (1 skipped; ") and \
        "metrics.json is unreadable" in line, line


def test_a_table_of_a_source_not_loaded_says_which_source_to_add(runs: Path, tmp_path: Path) -> None:
    """The ImageNet tables live in the 'imagenet' source, which is not loaded by default."""
    rows = published.load_published(["imagenet"])
    table = rows["table"].iloc[0]
    result = run_cli("scripts/collect_results.py", str(runs), "--out", str(tmp_path / "r"), "--no-figure",
                     "--table", table)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert f"table '{table}' is in the published source imagenet" in line and "--sources crd,dkd,post_dkd,imagenet" \
        in line, line


# ---- runs that are not one sample of seeds, half-written runs, image folders, output names --------------
def kd_settings(temperature: float = 4.0, alpha: float = 0.9, gamma: float = 0.1) -> dict:
    """configs/distill/kd.yaml's keys as a run records them (defaults: T 4, alpha 0.9, gamma 0.1)."""
    return {"name": "kd", "method": "kd", "gamma": gamma, "alpha": alpha, "beta": 0.0, "temperature": temperature}


def test_runs_of_one_cell_that_differ_in_a_training_setting_are_refused_naming_it(tmp_path: Path) -> None:
    """The tester's three KD runs: seed 0 as configured, seed 1 with T 1 / alpha 0.1 / gamma 0.9, seed 2 with
    batch 32 instead of 64. Not one cell of three seeds: one line names the keys, each setting and a run of it."""
    root = tmp_path / "runs"
    data = {"name": "cifar100", "batch_size": 64}
    plain = write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 70.0, 71.0,
                      config_extra={"distill": kd_settings(), "dataset": data})
    soft = write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 60.0, 61.0,
                     config_extra={"distill": kd_settings(temperature=1.0, alpha=0.1, gamma=0.9), "dataset": data})
    small = write_run(root, "resnet32x4", "resnet8x4", "kd", 2, 72.0, 73.0,
                      config_extra={"distill": kd_settings(), "dataset": {**data, "batch_size": 32}})
    out = tmp_path / "report" / "table"
    result = run_cli("scripts/collect_results.py", str(root), "--out", str(out), "--no-figure")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: the runs of kd on resnet32x4 → resnet8x4 on cifar100 differ in dataset.batch_size, distill.alpha, "
        "distill.gamma, distill.temperature and cannot be averaged: "
        f"dataset.batch_size 32, distill.alpha 0.9, distill.gamma 0.1, distill.temperature 4 (1 run, e.g. {small}); "
        f"dataset.batch_size 64, distill.alpha 0.1, distill.gamma 0.9, distill.temperature 1 (1 run, e.g. {soft}); "
        f"dataset.batch_size 64, distill.alpha 0.9, distill.gamma 0.1, distill.temperature 4 (1 run, e.g. {plain}); "
        "collect one setting at a time (name its run directories or a glob)"]
    assert not out.parent.exists()  # nothing written
    with pytest.raises(UserError, match=r"differ in dataset.batch_size and cannot be averaged: dataset.batch_size 32 "):
        tables.collect([str(plain), str(small)], out, figure=False)  # the batch size alone is enough
    rows, _ = tables.collect([str(plain)], out, figure=False)  # one setting at a time
    assert [(r.method, r.last.n, r.last.mean) for r in rows if r.last.n] == [("kd", 1, 70.0)]


def test_runs_that_differ_only_where_nothing_trained_changes_are_averaged(tmp_path: Path) -> None:
    """Paths, device, threads, workers, logging, progress bars, checkpointing frequency, evaluation batch, memory
    layout, the method's config name (kd_dot through its preset, or distill=kd optim=dot: both kd_dot) and the
    order the milestones are written in (the lr drops after each either way) change nothing trained: seeds 0 and 1
    are one cell, last 72 and 74 (mean 73, sample std sqrt(2))."""
    root = tmp_path / "runs"
    recipe = on("cifar100")
    first = {**recipe, "teacher": {"name": "resnet32x4", "ckpt": "/home/a/teachers/resnet32x4.pt", "verify": True},
             "teacher_dir": "/home/a/teachers", "distill": {**kd_settings(), "name": "kd_dot"},
             "optim": {**recipe["optim"], "name": "dot"},
             "dataset": {"name": "cifar100", "root": "/home/a/data", "batch_size": 64, "eval_batch_size": 1024,
                         "workers": 2},
             "trainer": {"epochs": 240, "device": "cpu", "num_threads": 2, "progress": True, "log_interval": 50,
                         "checkpoint_every_steps": 0, "channels_last": "auto", "compile": "auto"},
             "logger": {"backends": ["tensorboard"]}}
    second = {**first, "teacher": {"name": "resnet32x4", "ckpt": "/scratch/b/resnet32x4.pt", "verify": False},
              "teacher_dir": "/scratch/b", "distill": kd_settings(),
              "dataset": {**first["dataset"], "root": "/scratch/b/data", "eval_batch_size": 256, "workers": 8},
              "trainer": {**first["trainer"], "device": "cuda", "num_threads": 16, "progress": False,
                          "log_interval": 10, "checkpoint_every_steps": 500, "channels_last": True, "compile": True},
              "logger": {"backends": ["wandb"], "project": "kd"},
              "schedule": {**first["schedule"], "milestones": [210, 150, 180]}}
    write_run(root, "resnet32x4", "resnet8x4", "kd_dot", 0, 72.0, 73.0, config_extra=first)
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 74.0, 75.0, config_extra=second)
    rows, runs = tables.collect([str(root)], tmp_path / "report" / "table", figure=False)
    assert sorted(r.method for r in runs) == ["kd_dot", "kd_dot"]
    (kd_dot,) = [r for r in rows if r.last.n]
    assert (kd_dot.method, kd_dot.seeds, kd_dot.last.n, kd_dot.last.mean) == ("kd_dot", [0, 1], 2, 73.0)
    assert kd_dot.last.std == pytest.approx(math.sqrt(2.0))


def test_a_seed_repeated_in_one_cell_is_refused_naming_the_seed_and_its_runs(tmp_path: Path) -> None:
    """Three finished seed-0 runs of one cell are one seed three times, not three seeds: refused in one line
    naming the seed and every directory. A seed repeated by a run that did not finish is averaged nowhere: fine."""
    root = tmp_path / "runs"
    first = write_run(root / "first", "resnet32x4", "resnet8x4", "kd", 0, 70.0, 71.0)
    write_run(root / "first", "resnet32x4", "resnet8x4", "kd", 1, 72.0, 73.0)
    second = write_run(root / "second", "resnet32x4", "resnet8x4", "kd", 0, 70.5, 71.5)
    third = write_run(root / "third", "resnet32x4", "resnet8x4", "kd", 0, 69.5, 70.5)
    failed = write_run(root / "retry", "resnet32x4", "resnet8x4", "kd", 1, 10.0, 10.0, status="failed")
    out = tmp_path / "report" / "table"
    with pytest.raises(UserError) as err:
        tables.collect([str(root)], out, figure=False)
    assert str(err.value) == (
        f"the runs of kd on resnet32x4 → resnet8x4 repeat seed 0 ({first}, {second}, {third}) and cannot be "
        f"averaged: runs of one seed are not independent; collect one run per seed (name its run directories or a "
        f"glob)")
    assert not out.parent.exists()
    rows, _ = tables.collect([str(root / "first"), str(failed)], out, figure=False)
    kd = next(r for r in rows if r.method == "kd")
    assert (kd.seeds, kd.last.n, kd.last.mean, kd.unfinished) == ([0, 1], 2, 71.0, 1)  # (70 + 72) / 2


def test_a_run_without_a_readable_config_yaml_is_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    """A run whose config.yaml was deleted (only Hydra's copy left, whose lr is an unresolved ${...}) or is
    damaged is skipped with a warning naming it, not read from Hydra's copy or refused as another recipe."""
    root = tmp_path / "runs"
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 70.0, 71.0, config_extra=on("cifar100"))
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 72.0, 73.0, config_extra=on("cifar100"))
    deleted = write_run(root, "resnet32x4", "resnet8x4", "kd", 2, 10.0, 11.0, config_extra=on("cifar100"))
    (deleted / "config.yaml").unlink()
    hydra_copy = yaml.safe_load((deleted / ".hydra" / "config.yaml").read_text())
    hydra_copy["optim"]["lr"] = "${student.lr}"
    (deleted / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra_copy))
    damaged = write_run(root, "resnet32x4", "resnet8x4", "kd", 3, 10.0, 11.0, config_extra=on("cifar100"))
    (damaged / "config.yaml").write_text("teacher: {name: resnet32x4\nseed: [3\n")
    rows, found = tables.collect([str(root)], tmp_path / "report" / "table", figure=False)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert f"warning: skipped {deleted.resolve()}: it has metrics.json but no config.yaml (a half-written or " \
           f"damaged run)" in warnings
    assert any(w.startswith(f"warning: skipped {damaged.resolve()}: config.yaml is unreadable (") for w in warnings)
    assert sorted(r.seed for r in found) == [0, 1]
    kd = next(r for r in rows if r.method == "kd")
    assert (kd.last.n, kd.last.mean, kd.unfinished) == (2, 71.0, 0)  # (70 + 72) / 2; the skipped ones not counted


def test_runs_on_different_image_folders_are_different_data_sets(tmp_path: Path) -> None:
    """Plain training of resnet8 on three image folders, two of them named 'data': three sections, each headed by
    the folder's shortest path that tells it apart; one folder spelt with a trailing slash is still one folder."""
    folder_a, folder_b, folder_ok = tmp_path / "A" / "data", tmp_path / "B" / "data", tmp_path / "ok"
    root = tmp_path / "runs"

    def on_folder(folder: str) -> dict:
        return {**on("imagefolder"), "dataset": {"name": "imagefolder", "root": folder, "batch_size": 64}}

    write_run(root / "a", None, "resnet8", "ce", 0, 40.0, 41.0, config_extra=on_folder(str(folder_a)))
    write_run(root / "a", None, "resnet8", "ce", 1, 44.0, 45.0, config_extra=on_folder(f"{folder_a}/"))
    write_run(root / "b", None, "resnet8", "ce", 0, 90.0, 91.0, config_extra=on_folder(str(folder_b)))
    write_run(root / "ok", None, "resnet8", "ce", 0, 60.0, 61.0, config_extra=on_folder(str(folder_ok)))
    out = tmp_path / "report" / "table"
    rows, _ = tables.collect([str(root)], out, figure=False)
    by_folder = {r.data_folder: r for r in rows}
    assert set(by_folder) == {str(folder_a), str(folder_b), str(folder_ok)}
    assert {r.dataset for r in rows} == {"imagefolder"}
    assert (by_folder[str(folder_a)].last.n, by_folder[str(folder_a)].last.mean) == (2, 42.0)  # (40 + 44) / 2
    assert (by_folder[str(folder_b)].last.n, by_folder[str(folder_b)].last.mean) == (1, 90.0)
    assert (by_folder[str(folder_ok)].last.n, by_folder[str(folder_ok)].last.mean) == (1, 60.0)
    markdown = out.with_suffix(".md").read_text()
    assert "Data sets (each summarised apart): imagefolder (A/data) (2 runs), imagefolder (B/data) (1 run), " \
           "imagefolder (ok) (1 run)." in markdown
    for heading in ("## resnet8 (imagefolder (A/data))", "## resnet8 (imagefolder (B/data))",
                    "## resnet8 (imagefolder (ok))"):
        assert heading in markdown
    with open(out.with_suffix(".csv"), newline="") as f:
        summary = {r["data_folder"]: r for r in csv.DictReader(f)}
    assert summary[str(folder_b)]["dataset"] == "imagefolder" and summary[str(folder_b)]["runs"] == "1"


@pytest.mark.parametrize("given", ["res", "res.md", "res.csv", "res.png"])
def test_out_with_or_without_a_known_suffix_names_the_same_files(runs: Path, tmp_path: Path, given: str) -> None:
    """--out res.md is --out res: res.md, res.csv, res_runs.csv (not res.md_runs.csv), and the line saying so."""
    result = run_cli("scripts/collect_results.py", str(runs / "student"), "--out", str(tmp_path / given),
                     "--no-figure")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["res.csv", "res.md", "res_runs.csv"]
    assert result.stderr.splitlines()[-1] == (f"wrote {tmp_path / 'res.md'}, {tmp_path / 'res.csv'}, "
                                              f"{tmp_path / 'res_runs.csv'}")


def test_out_with_another_suffix_keeps_it_in_every_name(runs: Path, tmp_path: Path) -> None:
    """A dot that is not a known suffix is part of the name: v1.2 writes v1.2.md, v1.2.csv, v1.2_runs.csv, v1.2.png."""
    tables.collect([str(runs / "student" / "resnet56-resnet20")], tmp_path / "v1.2")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "v1.2.csv", "v1.2.md", "v1.2.png", "v1.2_runs.csv"]


def test_students_of_different_teacher_files_are_refused(tmp_path: Path) -> None:
    """A teacher retrained in its place between the seeds of one cell: the cell averaged students of two teachers
    without a word. Refused in one line naming both files; runs that recorded no file are not compared."""
    root = tmp_path / "runs"
    old, new = "a" * 64, "b" * 64
    write_run(root, "resnet32x4", "resnet8x4", "kd", 0, 70.0, 71.0, extra={"teacher_sha256": old})
    write_run(root, "resnet32x4", "resnet8x4", "kd", 1, 72.0, 73.0, extra={"teacher_sha256": old})
    third = write_run(root, "resnet32x4", "resnet8x4", "kd", 2, 60.0, 61.0, extra={"teacher_sha256": new})
    out = tmp_path / "report" / "table"
    with pytest.raises(UserError) as err:
        tables.collect([str(root)], out, figure=False)
    assert str(err.value).startswith(
        "the runs of kd on resnet32x4 → resnet8x4 were distilled from different teacher files and cannot be "
        "averaged: teacher sha256 aaaaaaaaaaaa... (2 runs, e.g. ")
    assert f"teacher sha256 bbbbbbbbbbbb... (1 run, e.g. {third})" in str(err.value)
    assert not out.parent.exists()
    metrics = json.loads((third / "metrics.json").read_text())
    del metrics["teacher_sha256"]
    (third / "metrics.json").write_text(json.dumps(metrics))
    rows, _ = tables.collect([str(root)], out, figure=False)
    assert next(r for r in rows if r.method == "kd").last.n == 3
