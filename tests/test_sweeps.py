"""Sweeps and paper-table presets: Hydra multirun, relaunch skipping, launchers, preset cells.

Training here is tiny (synthetic data, 200 images, 1 epoch, CPU). Expected cells and weights are
typed from RECIPES.md below, never read from the configs under test.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import CONFIGS, REPO, run_cli, tiny_overrides, train_tiny_teacher

import distiller.config.compose  # noqa: F401 - the config store and resolvers composed configs use

# ---- RECIPES.md, typed by hand -----------------------------------------------------------------------
CRD_T1_PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20",
                "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8"]
CRD_T2_PAIRS = ["vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
                "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1"]
CRD_METHODS = ["kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd_kd"]
DKD_METHODS = ["kd", "fitnet", "rkd", "crd", "ofd", "reviewkd", "dkd"]
# DKD per pair: NCKD weight beta_nc and the lr
DKD_PAIRS = {"resnet56-resnet20": (2.0, 0.05), "resnet110-resnet32": (2.0, 0.05),
             "resnet32x4-resnet8x4": (8.0, 0.05), "wrn_40_2-wrn_16_2": (6.0, 0.05),
             "wrn_40_2-wrn_40_1": (6.0, 0.05), "vgg13-vgg8": (6.0, 0.05), "vgg13-MobileNetV2": (6.0, 0.01),
             "ResNet50-MobileNetV2": (8.0, 0.01), "resnet32x4-ShuffleV1": (8.0, 0.01),
             "resnet32x4-ShuffleV2": (8.0, 0.01), "wrn_40_2-ShuffleV1": (8.0, 0.01)}
# gamma (CE), alpha (KD), beta (method), warm-up epochs, and method parameters (RECIPES.md), T = 4 for all
WEIGHTS = {
    "kd": (0.1, 0.9, 0.0, 0, {}),
    "fitnet": (1.0, 0.0, 100.0, 0, {"hint_layer": 2}),
    "at": (1.0, 0.0, 1000.0, 0, {"p": 2}),
    "sp": (1.0, 0.0, 3000.0, 0, {}),
    "cc": (1.0, 0.0, 0.02, 0, {"feat_dim": 128}),
    "vid": (1.0, 0.0, 1.0, 0, {"init_pred_var": 5.0, "eps": 1e-5}),
    "rkd": (1.0, 0.0, 1.0, 0, {"distance_weight": 25.0, "angle_weight": 50.0}),
    "pkt": (1.0, 0.0, 30000.0, 0, {}),
    "ab": (1.0, 0.0, 0.0, 0, {"init_epochs": 30, "margin": 1.0}),
    "ft": (1.0, 0.0, 200.0, 0, {"init_epochs": 30, "k": 0.5}),
    "fsp": (1.0, 0.0, 0.0, 0, {"init_epochs": 30}),
    "nst": (1.0, 0.0, 50.0, 0, {}),
    "crd": (1.0, 0.0, 0.8, 0, {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact"}),
    "crd_kd": (1.0, 1.0, 0.8, 0, {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact"}),
    "ofd": (1.0, 0.0, 0.001, 0, {}),
    "dkd": (1.0, 0.0, 1.0, 20, {"tckd_weight": 1.0}),
    "reviewkd": (1.0, 0.0, 5.0, 20, {}),
}
LOW_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}  # lr 0.01, others 0.05
# ReviewKD's loss weight per pair (the ReviewKD authors' CIFAR-100/script/reviewKD.sh), 5.0 elsewhere
REVIEWKD_WEIGHT = {"resnet56-resnet20": 0.6, "resnet110-resnet32": 1.0, "resnet32x4-ShuffleV2": 8.0}
# FT's paraphraser init lr (RepDistiller): 0.01 for ResNet/WRN students, else the student's lr
FT_INIT_LR = {"vgg8": 0.05, "MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}
TABLE_TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"]
SEEDS = ["0", "1", "2", "3", "4"]


def expected_cells(table: str) -> set[tuple[str, str]]:
    if table == "crd_table1":
        return {(p, m) for p in CRD_T1_PAIRS for m in CRD_METHODS} - {("wrn_40_2-wrn_40_1", "fsp")}
    if table == "crd_table2":
        return {(p, m) for p in CRD_T2_PAIRS for m in CRD_METHODS if m != "fsp"}
    return {(p, m) for p in DKD_PAIRS for m in DKD_METHODS}


def sweep_params(compose, preset: str, entry: str = "train_student") -> dict[str, list[str]]:
    cfg = compose(entry, [f"experiment={preset}"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


# ---- presets ------------------------------------------------------------------------------------------
TABLE_PRESETS = {"crd_table1": ["crd_table1", "crd_table1_fsp"], "crd_table2": ["crd_table2"],
                 "dkd": ["dkd_tables"]}


@pytest.mark.parametrize("table", sorted(TABLE_PRESETS))
def test_presets_sweep_exactly_the_published_cells(compose, table: str) -> None:
    cells: list[tuple[str, str]] = []
    for preset in TABLE_PRESETS[table]:
        params = sweep_params(compose, preset)
        assert sorted(params) == ["distill", "pair", "seed"]
        assert params["seed"] == SEEDS
        cells += [(p, m) for p in params["pair"] for m in params["distill"]]
    assert len(cells) == len(set(cells)), "a cell is swept twice"
    assert set(cells) == expected_cells(table)


def test_presets_cover_every_cell_of_the_paper_csvs() -> None:
    """Every published (pair, method) of the CRD and DKD tables is a cell of one of our presets."""
    import csv

    names = {"KD": "kd", "FitNet": "fitnet", "AT": "at", "SP": "sp", "CC": "cc", "VID": "vid", "RKD": "rkd",
             "PKT": "pkt", "AB": "ab", "FT": "ft", "FSP": "fsp", "NST": "nst", "CRD": "crd", "CRD+KD": "crd_kd",
             "OFD": "ofd", "ReviewKD": "reviewkd", "DKD": "dkd"}
    ours = expected_cells("crd_table1") | expected_cells("crd_table2") | expected_cells("dkd")
    for name in ("crd_paper_repdistiller_readme.csv", "dkd_paper.csv"):
        with open(REPO / "scripts" / "paper_tables" / name, newline="") as f:
            for row in csv.DictReader(f):
                if row["method"] in ("teacher", "student"):
                    continue
                assert (f"{row['teacher']}-{row['student']}", names[row["method"]]) in ours, row


ALL_PAIRS = sorted(set(CRD_T1_PAIRS) | set(CRD_T2_PAIRS))
ALL_METHODS = sorted(set(CRD_METHODS) | set(DKD_METHODS))


def compose_cells(cells, extra=()):
    """Compose ``train_student`` for each (pair, method) with Hydra's compose API; returns
    {cell: (resolved task config, hydra.sweep.subdir)}."""
    from omegaconf import OmegaConf, open_dict

    from distiller.config.compose import compose

    composed = {}
    for pair, method in cells:
        cfg = compose("train_student", [f"pair={pair}", f"distill={method}", "seed=3", *extra],
                      return_hydra_config=True)
        subdir = str(cfg.hydra.sweep.subdir)
        with open_dict(cfg):
            del cfg["hydra"]
        composed[(pair, method)] = (OmegaConf.to_container(cfg, resolve=True), subdir)
    return composed


def check_cell(pair: str, method: str, cfg: dict, subdir: str) -> None:
    """The composed cell has the pair's networks and lr, and RECIPES.md's weights for the method."""
    teacher, student = pair.split("-")
    where = f"cell {pair} {method}"
    assert (cfg["teacher"]["name"], cfg["student"]["name"]) == (teacher, student), where
    assert subdir == f"{pair}/{method}/seed3", where
    distill = cfg["distill"]
    gamma, alpha, beta, warmup, params = WEIGHTS[method]
    if method == "reviewkd":
        beta = REVIEWKD_WEIGHT.get(pair, beta)
    assert distill["name"] == method, where
    assert (distill["gamma"], distill["alpha"], distill["beta"]) == pytest.approx((gamma, alpha, beta)), where
    assert distill["temperature"] == 4.0 and distill["warmup_epochs"] == warmup, where
    for key, value in params.items():
        assert distill[key] == pytest.approx(value), f"{where}: {key}"
    assert cfg["optim"]["lr"] == (0.01 if student in LOW_LR_STUDENTS else 0.05), where
    assert (cfg["optim"]["momentum"], cfg["optim"]["weight_decay"]) == (0.9, 5e-4), where
    assert cfg["trainer"]["epochs"] == 240 and cfg["schedule"]["milestones"] == [150, 180, 210], where
    assert cfg["dataset"]["batch_size"] == 64, where
    if method == "dkd":
        nckd, lr = DKD_PAIRS.get(pair, (8.0, None))
        assert distill["nckd_weight"] == nckd, where
        assert lr is None or cfg["optim"]["lr"] == lr, where
    if method == "ft":
        assert distill["init_lr"] == FT_INIT_LR.get(student, 0.01), where


def test_every_pair_and_method_composes_with_the_published_settings() -> None:
    """Every pair (with DKD and FT, whose settings depend on the pair) and every method (on one pair)
    composes to RECIPES.md's settings. A cell's config is its pair's part plus its method's part; the
    only links between them are DKD's, FT's and ReviewKD's per-pair values, checked here for every pair."""
    cells = [(p, m) for p in ALL_PAIRS for m in ("dkd", "ft", "reviewkd")]
    cells += [("resnet32x4-resnet8x4", m) for m in ALL_METHODS if m not in ("dkd", "ft", "reviewkd")]
    composed = compose_cells(cells)
    for (pair, method), (cfg, subdir) in composed.items():
        check_cell(pair, method, cfg, subdir)


CELL_BY_CELL = {"crd_table1": "crd_table1", "crd_table2": "crd_table2", "dkd": "dkd_tables"}  # table: its preset


def test_the_cell_by_cell_tables_hold_every_distinct_cell() -> None:
    cells = set().union(*(expected_cells(table) for table in CELL_BY_CELL))
    assert len(cells) == 7 * 14 - 1 + 6 * 13 + 11 * 3  # 208: the DKD tables add ofd, reviewkd and dkd


@pytest.mark.slow
@pytest.mark.parametrize("table", [*CELL_BY_CELL, "the other tables"])
def test_every_table_cell_composes_with_the_published_settings(table: str) -> None:
    """Each (pair, method) cell of the CRD and DKD presets, composed on its own under its preset, with the
    published settings and in fp32; the first and last job of every other preset of scripts/sweep_table.py
    composed as its multirun composes it, in fp32 (about a minute in all, in four parts)."""
    from omegaconf import OmegaConf

    from distiller.config.compose import compose
    from scripts import sweep_table

    if table in CELL_BY_CELL:
        composed = compose_cells(sorted(expected_cells(table)), [f"experiment={CELL_BY_CELL[table]}"])
        for (pair, method), (cfg, subdir) in composed.items():
            check_cell(pair, method, cfg, subdir)
            assert cfg["trainer"]["precision"] == "fp32", (table, pair, method)
        return
    for name, (entry, table_presets) in sweep_table.TABLES.items():
        if name in CELL_BY_CELL:  # composed cell by cell, under the same presets
            continue
        for preset in table_presets:
            jobs = sweep_table.expand_preset(preset, ["seed=0"])
            # the first and last job of each: that every job of a preset resolves alike (nothing swept sets a
            # trainer key, experiment= comes after the swept groups) is checked per preset by the fast test below
            for job in {json.dumps(j, sort_keys=True): j for j in (jobs[0], jobs[-1])}.values():
                cell = [f"experiment={preset}", *(f"{k}={v}" for k, v in job.items())]
                cfg = compose(entry.removesuffix(".py"), cell)
                assert OmegaConf.select(cfg, "trainer.precision") == "fp32", (name, preset, job)
                epochs = OmegaConf.select(cfg, "trainer.epochs")  # every lr drop of the recipe happens
                assert all(m < epochs for m in OmegaConf.select(cfg, "schedule.milestones")), (name, preset, job)


# ---- table presets train in fp32, as the papers did -------------------------------------------------------
PRIMARY_CONFIGS = {"train_student": ("teacher", "student", "distill", "pair", "trainer"),
                   "train_teacher": ("model", "trainer")}
SWEPT_GROUPS = {"pair", "distill", "model", "seed"}  # what a table preset's cells differ in


def group_sets_trainer(group: str, name: str) -> bool:
    """Whether ``configs/<group>/<name>.yaml`` (or a file it pulls in from its group) sets any trainer key."""
    from omegaconf import OmegaConf

    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():  # model/teacher/student: ConfigStore nodes of the schema, which has no trainer key
        return False
    raw = OmegaConf.load(path)
    if "trainer" in raw or any("trainer" in str(d) for d in raw.get("defaults", [])):
        return True
    return any(group_sets_trainer(group, str(d)) for d in raw.get("defaults", [])
               if isinstance(d, str) and d != "_self_" and not d.startswith("/"))


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_trains_in_fp32(compose, preset: str) -> None:
    """Every table preset trains in fp32 (the papers' precision), in every cell it sweeps: the preset sets
    trainer.precision, it comes after the swept groups in the primary config's defaults, and no pair or
    method file the preset sweeps sets a trainer key, so no cell can change it."""
    from omegaconf import OmegaConf

    entry = "train_teacher" if preset.startswith("table_") else "train_student"
    cfg = compose(entry, [f"experiment={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"experiment/{preset}.yaml sweeps nothing"
    assert cfg.trainer.precision == "fp32", preset
    assert set(params) <= SWEPT_GROUPS, preset
    order = [next(iter(d)) if isinstance(d, dict) else str(d)
             for d in OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{entry}.yaml").defaults)]
    assert all(order.index(group) < order.index("experiment") for group in PRIMARY_CONFIGS[entry]), order
    for group in ("pair", "distill"):  # the swept ones and the preset's own choice
        names = [*str(params.get(group, "")).split(","), str(cfg.hydra.runtime.choices.get(group) or "")]
        for name in filter(None, names):
            assert not group_sets_trainer(group, name), f"configs/{group}/{name}.yaml sets trainer"


def test_the_command_line_wins_over_the_table_precision_and_plain_runs_keep_auto(compose) -> None:
    cell = ["experiment=new_methods_table", "pair=vgg13-vgg8", "distill=ctkd_ls"]
    assert compose("train_student", cell).trainer.precision == "fp32"
    assert compose("train_student", [*cell, "trainer.precision=bf16"]).trainer.precision == "bf16"
    assert compose("train_student", ["pair=vgg13-vgg8", "distill=kd"]).trainer.precision == "auto"
    assert compose("train_teacher", ["model=resnet8"]).trainer.precision == "auto"
    from scripts import sweep_table  # the table command passes its overrides on to every preset

    (command,) = sweep_table.commands("crd_table2", ["trainer.precision=bf16"])
    assert command[-2:] == ["experiment=crd_table2", "trainer.precision=bf16"]


def test_teacher_presets(compose) -> None:
    assert sweep_params(compose, "table_teachers", "train_teacher") == {"model": TABLE_TEACHERS, "seed": ["0"]}
    cfg = compose("train_teacher", ["experiment=table_teachers", "model=resnet32x4"])
    assert cfg.save_teacher is True and cfg.optim.lr == 0.05 and cfg.trainer.epochs == 240
    baselines = sweep_params(compose, "table_baselines", "train_teacher")
    students = {p.split("-")[1] for p in [*CRD_T1_PAIRS, *CRD_T2_PAIRS]}
    assert set(baselines["model"]) == students and baselines["seed"] == SEEDS
    cfg = compose("train_teacher", ["experiment=table_baselines", "model=ShuffleV2"])
    assert cfg.save_teacher is False and cfg.optim.lr == 0.01


@pytest.mark.parametrize("method, presets, runs, command", [
    # KD on the 7 pairs; the FSP preset holds no KD cell (it ran KD on 6 pairs again)
    ("kd", ["crd_table1"], 7, "experiment=crd_table1 seed=0 distill=kd"),
    # each preset its own method: FSP on its own 6 pairs
    ("kd,fsp", ["crd_table1", "crd_table1_fsp"], 7 + 6, "experiment=crd_table1_fsp seed=0 distill=fsp"),
    ("hint", ["crd_table1"], 7, "experiment=crd_table1 seed=0 distill=fitnet"),  # the README's alias of FitNet
])
def test_a_method_override_keeps_the_presets_that_hold_it(capsys, method: str, presets: list, runs: int,
                                                          command: str) -> None:
    from scripts import sweep_table

    assert sweep_table.main(["crd_table1", f"distill={method}", "seed=0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^# experiment=(\S+):", out, re.M) == presets
    assert out.rstrip().endswith(f"# crd_table1: {runs} runs in all")
    assert f"train_student.py -m {command}\n" in out


def test_sweep_table_dry_run_lists_the_cells(capsys) -> None:
    from scripts import sweep_table

    assert sweep_table.main(["crd_table1", "seed=0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# experiment=crd_table1: 91 runs" in out and "# experiment=crd_table1_fsp: 6 runs" in out
    assert "# crd_table1: 97 runs in all" in out
    assert "  pair=wrn_40_2-wrn_40_1 distill=fsp seed=0" not in out
    assert "  pair=vgg13-vgg8 distill=fsp seed=0" in out
    assert "$ " + str(REPO / "train_student.py") + " -m experiment=crd_table1_fsp seed=0" in out


# ---- launchers -----------------------------------------------------------------------------------------
def test_slurm_launcher_config(compose) -> None:
    cfg = compose("train_student", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.partition == "gpu" and launcher.timeout_min >= 60 and launcher.max_num_timeout >= 1


def test_submitit_local_puts_every_job_on_the_same_gpus(monkeypatch, tmp_path: Path) -> None:
    """Why local_gpus is not submitit_local: submitit's local executor hands every job the same
    CUDA_VISIBLE_DEVICES (the first gpus_per_node ids), so parallel jobs would share GPU 0."""
    import submitit
    from submitit.local import local

    seen = []

    class FakeProcess:
        pid = 12345

        def poll(self):
            return None

    def fake_controller(**kwargs):
        seen.append(kwargs["cuda_devices"])
        return FakeProcess()

    monkeypatch.setattr(local, "start_controller", fake_controller)
    executor = submitit.LocalExecutor(folder=tmp_path)
    executor.update_parameters(gpus_per_node=1, timeout_min=1)
    for _ in range(3):
        executor.submit(print, "job")
    assert seen == ["0", "0", "0"]


GPU_APP = '''
import json, os, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path=".", config_name="app", version_base="1.3")
def main(cfg):
    start = time.time()
    time.sleep(cfg.sleep)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "gpu.json").write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time(),
                                              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))

if __name__ == "__main__":
    main()
'''


def test_local_gpus_launcher_gives_each_running_job_its_own_gpu(tmp_path: Path) -> None:
    """hydra/launcher=local_gpus (joblib + gpu_slots callback) on a stand-in task: 6 jobs, 3 at a time,
    on GPUs "5,6,7". Each job records the CUDA_VISIBLE_DEVICES it ran with and when it ran."""
    (tmp_path / "app.py").write_text(GPU_APP)
    (tmp_path / "app.yaml").write_text(textwrap.dedent(f"""\
        job: 0
        sleep: 0.6
        hydra:
          searchpath: [file://{CONFIGS}]
          sweep:
            dir: {tmp_path / 'sweep'}
            subdir: job${{job}}
        """))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "5,6,7"}  # the callback comes from the installed package
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", "hydra/launcher=local_gpus",
                             "hydra.launcher.n_jobs=3", f"hydra.callbacks.gpu_slots.lock_dir={tmp_path / 'locks'}",
                             "job=range(6)"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [json.loads((tmp_path / "sweep" / f"job{i}" / "gpu.json").read_text()) for i in range(6)]
    assert {j["gpu"] for j in jobs} <= {"5", "6", "7"}
    assert len({j["pid"] for j in jobs}) <= 3  # never more processes than n_jobs
    for i, a in enumerate(jobs):
        for b in jobs[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and a["gpu"] == b["gpu"]), (a, b)
    # every worker process keeps its one GPU
    assert all(len({j["gpu"] for j in jobs if j["pid"] == pid}) == 1 for pid in {j["pid"] for j in jobs})
    assert len({j["gpu"] for j in jobs}) >= 2  # jobs really ran in parallel on different GPUs


def test_gpu_slots_rejects_more_jobs_than_gpus(tmp_path: Path) -> None:
    from common.errors import UserError
    from distiller.config.gpu_slots import GpuSlots

    with pytest.raises(UserError, match="n_jobs=4"):
        GpuSlots(num_slots=4, lock_dir=str(tmp_path), devices=[0, 1])


# ---- real sweeps through the entry points ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A resnet56 teacher, then `-m distill=kd,at seed=0,1` into resnet20 (tiny synthetic data)."""
    tmp = tmp_path_factory.mktemp("sweep")
    tiny = tiny_overrides(tmp)
    teacher = run_cli("train_teacher.py", "model=resnet56", *tiny,
                      f"hydra.run.dir={tmp / 'runs/teacher/resnet56/seed0'}")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    command = ["-m", "teacher=resnet56", "student=resnet20", "distill=kd,at", "seed=0,1", *tiny,
               f"hydra.sweep.dir={tmp / 'runs/student'}"]
    first = run_cli("train_student.py", *command)
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp, command


def run_dirs(tmp: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp / "runs" / "student").glob("synthetic/*/*/seed*/metrics.json"))


def test_multirun_makes_one_directory_per_cell_and_relaunch_reruns_nothing(sweep) -> None:
    tmp, command = sweep
    dirs = run_dirs(tmp)
    # the data set (not CIFAR-100) is the first folder below the sweep's
    expected = [tmp / "runs/student/synthetic/resnet56-resnet20" / m / f"seed{s}" for m in ("at", "kd") for s in (0, 1)]
    assert dirs == expected
    for d in dirs:
        assert json.loads((d / "metrics.json").read_text())["status"] == "finished"
    watched = [d / name for d in dirs for name in ("metrics.json", "last.pt", "config.yaml")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    again = run_cli("train_student.py", *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished: ") == 4
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def test_a_job_that_stops_on_a_user_error_is_reported_in_one_line_when_the_sweep_ends(tmp_path: Path) -> None:
    """``-m teacher=resnet8,resnet20`` with only resnet8's teacher trained: the resnet8 job finishes, the
    resnet20 one stops on its missing teacher, and the sweep ends with one line naming it, status 2 (not
    Hydra's 'Error executing job' report). Run first in this process (Hydra's basic launcher), then again
    by a launcher's worker processes (joblib, as ``local_gpus``), which skip the finished job. The jobs'
    records are gone from the sweep folder each time, and so are those a killed sweep left (not a running one's)."""
    train_tiny_teacher(tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left, running = (tmp_path / "sweep" / f".job_reports-{pid}-1" for pid in (ended.pid, os.getpid()))
    for folder in (left, running):
        folder.mkdir(parents=True)
        (folder / "0.json").write_text("{}")
    command = ["-m", "teacher=resnet8,resnet20", "student=resnet8", "distill=kd", *tiny_overrides(tmp_path),
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    for attempt, launcher in enumerate([[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]]):
        result = run_cli("train_student.py", *command, *launcher)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
        assert len(lines) == 1, result.stderr[-3000:]  # the rest are the jobs' log lines
        assert lines[0].startswith("error: 1 of 2 jobs of the sweep failed (#1 teacher=resnet20): teacher checkpoint "
                                   "not found: "), lines[0]
        assert "the same command again runs only the jobs that did not" in lines[0]
        assert "HYDRA_FULL_ERROR" not in result.stderr and "Error executing job" not in result.stderr
        (done,) = (tmp_path / "sweep").glob("synthetic/resnet8-resnet8/kd/seed0/metrics.json")
        assert json.loads(done.read_text())["status"] == "finished"
        if attempt == 0:
            finished_at = done.stat().st_mtime_ns
        assert done.stat().st_mtime_ns == finished_at  # the second time, the finished job is not run again
        assert list((tmp_path / "sweep").glob(".job_reports*")) == [running]
    # the refused job wrote nothing, and the folder Hydra made for it before it started is gone
    assert not [p for p in (tmp_path / "sweep").glob("synthetic/resnet20-resnet8/**/*") if p.is_file()]
    assert not (tmp_path / "sweep" / "synthetic" / "resnet20-resnet8").exists()  # nor the parents made for it
    assert (tmp_path / "sweep" / "synthetic" / "resnet8-resnet8").is_dir()  # those a finished job uses stay


def test_collector_on_the_sweep(sweep) -> None:
    from distiller.results import tables

    tmp, _ = sweep
    rows, runs = tables.collect([str(tmp / "runs")], tmp / "results" / "table")
    assert len(runs) == 5 and all(r.status == "finished" for r in runs)
    by_method = {r.method: r for r in rows}
    for method in ("kd", "at"):
        runs_of = tmp / "runs/student/synthetic/resnet56-resnet20" / method
        finals = [json.loads((runs_of / f"seed{s}/metrics.json").read_text())["final_top1"] for s in (0, 1)]
        row = by_method[method]
        assert row.last.n == 2
        assert row.last.mean == pytest.approx(statistics.mean(finals))
        assert row.last.std == pytest.approx(statistics.stdev(finals))
        # CRD Table 1's resnet56 -> resnet20 numbers (KD 70.66, AT 70.55) are CIFAR-100's: none beside synthetic runs
        assert row.dataset == "synthetic" and set(row.published.values()) == {None}
    assert by_method["teacher"].last.n == 1 and by_method["teacher"].published["crd"] is None
    markdown = (tmp / "results" / "table.md").read_text()
    assert "## resnet56 → resnet20 (synthetic)" in markdown and "| kd | 2 |" in markdown
    assert (tmp / "results" / "table.png").stat().st_size > 0


RECORDING_LAUNCH = '''
"""Run an entry point with hydra/launcher=slurm, but with submitit's debug executor underneath:
the real SLURM executor is built with the same parameters (validating them) and renders its sbatch
file; the jobs then run in this process."""
import json, os, runpy, sys
import submitit

record_path, script, *argv = sys.argv[1:]
AutoExecutor = submitit.AutoExecutor

class RecordingExecutor(AutoExecutor):
    def __init__(self, folder, cluster=None, **kwargs):
        self.record = {"cluster": cluster, "init": kwargs}
        self.slurm = AutoExecutor(folder=folder, cluster=cluster, **kwargs)
        super().__init__(folder=folder, cluster="debug")

    def update_parameters(self, **params):
        self.record["params"] = params
        self.slurm.update_parameters(**params)
        self.record["sbatch"] = self.slurm._executor._make_submission_file_text("echo job", "uid")
        super().update_parameters(**params)

    def map_array(self, fn, *iterable):
        self.record["jobs"] = len(list(zip(*iterable)))
        with open(record_path, "w") as f:
            json.dump(self.record, f)
        return super().map_array(fn, *iterable)

submitit.AutoExecutor = RecordingExecutor
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
'''


def test_slurm_launcher_hands_submitit_one_gpu_per_job(sweep, tmp_path: Path) -> None:
    """The sweep again through hydra/launcher=slurm: submitit receives 1 GPU per job, the partition and
    time limit, as an array of 4 jobs; run by submitit's debug executor, they skip their finished runs."""
    tmp, command = sweep
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that SLURM is installed
    (fake_bin / "srun").chmod(0o755)
    (tmp_path / "launch.py").write_text(RECORDING_LAUNCH)
    record = tmp_path / "record.json"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "launch.py"), str(record), str(REPO / "train_student.py"),
                             *command, "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                             "hydra.launcher.timeout_min=90"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sent = json.loads(record.read_text())
    assert sent["cluster"] == "slurm" and sent["jobs"] == 4
    assert sent["init"] == {"slurm_max_num_timeout": 3}
    params = sent["params"]
    assert (params["gpus_per_node"], params["tasks_per_node"], params["nodes"]) == (1, 1, 1)
    assert params["timeout_min"] == 90 and params["slurm_partition"] == "gpu"
    sbatch = sent["sbatch"]
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=90",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8"):
        assert line in sbatch, line
    assert result.stdout.count("already finished: ") == 4
