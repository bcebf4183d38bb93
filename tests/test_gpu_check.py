"""scripts/gpu_check.py without a GPU: the CPU dry run, the no-CUDA exit, the CIFAR-100 subset writer;
and trainer.precision=auto's choice on CPUs with and without native bf16.

Speed is never asserted; the dry run's figures only show that every step runs and reports.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, SHARED, run_cli
from omegaconf import OmegaConf

from common.errors import UserError
from distiller.bench.gpu_check.check_settings import STEPS
from distiller.bench.gpu_check.cifar_subset import SUBSET_PER_CLASS, write_cifar_subset
from distiller.engine import runtime as rt

COLUMNS = ("step", "config", "images/s", "ms/step", "MFU", "peak memory", "speedup", "accuracy", "status")


def table_rows(markdown: str) -> list[list[str]]:
    """Body rows of the one Markdown table in ``markdown`` (cells stripped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert all(any(col in h for h in header) for col in COLUMNS), header
    assert set(lines[1].replace("|", "").strip()) <= {"-"}
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def outputs(folder: Path) -> tuple[str, dict]:
    (md,) = folder.glob("gpu_check-*.md")
    (js,) = folder.glob("gpu_check-*.json")
    return md.read_text(), json.loads(js.read_text())


# ---- no GPU, no dry run --------------------------------------------------------------------------------------
def test_without_cuda_the_check_exits_2_with_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli("scripts/gpu_check.py", "--out", str(tmp_path))
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not list(tmp_path.iterdir())  # failed fast: nothing measured, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_the_command_exits_2(tmp_path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_unknown_step_is_a_user_error() -> None:
    result = run_cli("scripts/gpu_check.py", "--dry-run", "--only", "benchmark,speedtest")
    assert result.returncode == 2
    assert "speedtest" in result.stderr


# ---- the dry run ------------------------------------------------------------------------------------------
def test_dry_run_of_benchmark_and_compile_writes_table_and_json(tmp_path) -> None:
    """In process: two steps, rows consistent between the table and the JSON file."""
    result = run_cli("scripts/gpu_check.py", "--dry-run", "--only", "benchmark,compile", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    md, data = outputs(tmp_path)
    rows = table_rows(md)
    assert "DRY RUN" in md and "Command: `python scripts/gpu_check.py --dry-run --only benchmark,compile" in md
    assert len(rows) == len(data["rows"])
    bench = [r for r in data["rows"] if r["step"] == "benchmark"]
    assert len(bench) == 2 and all(r["status"] == "ok" for r in bench)  # fp32 and the "fast" path
    for r in bench:
        e = r["extra"]
        assert r["images_per_sec"] > 0 and e["reference_images_per_sec"] > 0
        assert r["ms_per_step"] == pytest.approx(1e3 * e["batch_size"] / r["images_per_sec"], rel=1e-9)
        assert r["speedup"] == pytest.approx(r["images_per_sec"] / e["reference_images_per_sec"], rel=1e-9)
    assert {r["extra"]["channels_last"] for r in bench} == {False, True}
    comp = [r for r in data["rows"] if r["step"] == "compile"]
    assert [r["status"] for r in comp] == ["ok", "skipped"]  # CUDA graphs need CUDA
    # aot_eager runs the traced graph with the same kernels: fp32 differences are rounding only
    assert comp[0]["extra"]["loss_gap"] < 1e-4 and comp[0]["extra"]["weight_gap"] < 1e-4
    assert len(comp[0]["extra"]["losses"]) == 2
    out = result.stdout
    assert f"table: {tmp_path}" in out and f"json:  {tmp_path}" in out


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path) -> None:
    """The whole rehearsal as a user types it: every step, a table and a JSON file, exit 0."""
    result = run_cli("scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    md, data = outputs(tmp_path)
    rows = table_rows(md)
    assert {r[0] for r in rows} == set(STEPS)
    assert {r["step"] for r in data["rows"]} == set(STEPS)
    assert not [r for r in data["rows"] if r["status"] == "failed"]
    acc = [r for r in data["rows"] if r["step"] == "accuracy"]
    # fp32 and the fast path on seed 0, then bf16 alone against fp32 on seeds 0 and 1, then their comparison
    assert [r["config"].split(",")[0].split()[-1] for r in acc[:5]] == ["fp32", "fast", "bf16", "fp32", "bf16"]
    assert [r["extra"]["seed"] for r in acc[:5]] == [0, 0, 0, 1, 1]
    assert all("fp32 " in r["accuracy"] and "fast " in r["accuracy"] for r in acc[:2])
    assert all("fp32 " in r["accuracy"] and "bf16 " in r["accuracy"] for r in acc[2:5])
    check_precision_comparison(acc[-1], acc[:5])
    conc = [r for r in data["rows"] if r["step"] == "concurrency"]
    assert [len(r["extra"]["runs"]) for r in conc] == [1, 2]
    for r in conc:  # aggregate = all images over the span from the first start to the last end
        runs = r["extra"]["runs"]
        span = max(x["end"] for x in runs) - min(x["start"] for x in runs)
        assert r["images_per_sec"] == pytest.approx(sum(x["images"] for x in runs) / span, rel=1e-9)
    ddp = [r for r in data["rows"] if r["step"] == "ddp"]
    assert ddp[0]["status"] == "ok" and "gloo" in ddp[0]["config"]
    assert data["dry_run"] is True and not (tmp_path / "gpu_check.json").exists()  # never read as a GPU figure


def check_precision_comparison(row: dict, runs: list[dict]) -> None:
    """The fp32-vs-bf16 row agrees with the runs' own rows: per seed, bf16's top-1 minus fp32's of that seed
    (last and best epoch), and their means, worked out here from the runs' rows."""
    top1 = {(r["extra"]["label"], r["extra"]["seed"]): r["extra"] for r in runs}
    seeds = sorted(seed for label, seed in top1 if label == "bf16")
    assert row["status"] == "ok" and "fp32 vs bf16" in row["config"] and row["extra"]["seeds"] == seeds
    for kind in ("final", "best"):
        diff = [top1[("bf16", seed)][f"{kind}_top1"] - top1[("fp32", seed)][f"{kind}_top1"] for seed in seeds]
        assert row["extra"][f"{kind}_diff"] == pytest.approx(diff, abs=1e-12)
        assert row["extra"][f"mean_{kind}_diff"] == pytest.approx(sum(diff) / len(diff), abs=1e-12)
        assert row["extra"][f"{kind}_top1"]["fp32"] == [top1[("fp32", seed)][f"{kind}_top1"] for seed in seeds]


def test_the_fp32_against_bf16_row_compares_the_same_seeds() -> None:
    """By hand: seeds 0 and 2 finished in both precisions (1 only in fp32, 3 failed in bf16); bf16 - fp32 is
    +0.5 and -1.25 at the last epoch (mean -0.375), -0.25 and 0.0 at the best (mean -0.125)."""
    from distiller.bench.gpu_check.precision_compare import precision_comparison
    from distiller.bench.gpu_check.rows import FAILED, Row

    def run(label: str, seed: int, final: float, best: float) -> Row:
        return Row("accuracy", f"resnet8x4->resnet8 KD {label}, 6 epochs, seed {seed}, synthetic data",
                   extra={"label": label, "seed": seed, "final_top1": final, "best_top1": best, "epochs": 6,
                          "case": "resnet8x4->resnet8 KD", "data": "synthetic data"})

    rows = [run("fp32", 0, 40.0, 41.0), run("bf16", 0, 40.5, 40.75), run("fp32", 1, 39.0, 39.5),
            run("fp32", 2, 42.0, 42.5), run("bf16", 2, 40.75, 42.5), run("fast", 0, 10.0, 10.0),
            Row("accuracy", "bf16", FAILED, detail="RuntimeError: boom")]
    row = precision_comparison(rows)
    assert row.config == "resnet8x4->resnet8 KD fp32 vs bf16, 6 epochs, seeds 0,2, synthetic data"
    assert row.extra["seeds"] == [0, 2]
    assert row.extra["final_diff"] == [0.5, -1.25] and row.extra["mean_final_diff"] == -0.375
    assert row.extra["best_diff"] == [-0.25, 0.0] and row.extra["mean_best_diff"] == -0.125
    assert row.accuracy == "fp32 41.00 / bf16 40.62 (mean)"  # (40 + 42) / 2 and (40.5 + 40.75) / 2 = 40.625
    assert row.detail == "bf16 - fp32 per seed: +0.50, -1.25 (mean -0.38); best epoch -0.25, +0.00 (mean -0.12)"
    check_precision_comparison(dataclasses.asdict(row), [dataclasses.asdict(r) for r in rows[:5]])
    assert precision_comparison(rows[:1] + rows[2:4]).status == "skipped"  # no seed with both


# ---- the CIFAR-100 subset ------------------------------------------------------------------------------------
def fake_cifar(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A small official-format cifar-100-python folder: random pixels, shuffled labels, unique filenames."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), n))
        entry = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "fine_labels": labels.tolist(),
                 "coarse_labels": (labels // 5).tolist(), "batch_label": split,
                 "filenames": [f"{split}_{i:05d}.png" for i in range(len(labels))]}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def check_subset(source: Path, written: Path, per_class: tuple[int, int]) -> None:
    """Every written image is the source's image of the same file name and label; classes balanced."""
    from datasets.cifar100 import read_cifar_folder

    splits = read_cifar_folder(written)  # the loader the runs use (restricted unpickler, shape checks)
    for split, n, images, labels in (("train", per_class[0], splits.train_images, splits.train_labels),
                                     ("test", per_class[1], splits.test_images, splits.test_labels)):
        src = pickle.loads((source / split).read_bytes(), encoding="latin1")
        out = pickle.loads((written / split).read_bytes(), encoding="latin1")
        by_name = {name: i for i, name in enumerate(src["filenames"])}
        assert np.bincount(labels.numpy(), minlength=100).tolist() == [n] * 100
        assert len(set(out["filenames"])) == 100 * n
        for j, name in enumerate(out["filenames"]):
            i = by_name[name]
            assert src["fine_labels"][i] == out["fine_labels"][j] == int(labels[j])
            assert src["coarse_labels"][i] == out["coarse_labels"][j]
            assert np.array_equal(src["data"][i].reshape(3, 32, 32), images[j].numpy())
    assert pickle.loads((written / "meta").read_bytes()) == pickle.loads((source / "meta").read_bytes(),
                                                                         encoding="latin1")


def test_subset_writer_writes_a_loadable_official_format(tmp_path) -> None:
    source = fake_cifar(tmp_path / "src", 4, 3)
    written = write_cifar_subset(tmp_path / "src", tmp_path / "subset", per_class=(2, 1))
    assert written == tmp_path / "subset" / "cifar-100-python"
    check_subset(source, written, (2, 1))
    stamp = (written / "train").stat().st_mtime_ns
    write_cifar_subset(tmp_path / "src", tmp_path / "subset", per_class=(3, 2))  # written once
    assert (written / "train").stat().st_mtime_ns == stamp
    write_cifar_subset(tmp_path / "src", tmp_path / "subset", per_class=(3, 2), force=True)
    check_subset(source, written, (3, 2))
    with pytest.raises(UserError, match="fewer than 5 per class"):
        write_cifar_subset(tmp_path / "src", tmp_path / "other", per_class=(5, 1))
    with pytest.raises(UserError, match="no CIFAR-100"):
        write_cifar_subset(tmp_path / "nothing", tmp_path / "other")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "cifar-100-python" / "train").is_file(), reason="no real CIFAR-100")
def test_subset_writer_on_the_real_data(tmp_path) -> None:
    written = write_cifar_subset(SHARED / "data", tmp_path / "subset", per_class=(3, 2))
    check_subset(SHARED / "data" / "cifar-100-python", written, (3, 2))
    # the default size fits the GPU machine's data allowance: 19,000 images of 3,072 bytes < 60 MB
    assert 100 * sum(SUBSET_PER_CLASS) * 3072 < 60e6


# ---- trainer.precision=auto ------------------------------------------------------------------------------------
@pytest.fixture
def machine_decides(monkeypatch):
    """The resolution of ``auto`` as on a machine where no ``KD_AUTO_PRECISION`` forces it."""
    monkeypatch.delenv(rt.AUTO_PRECISION_ENV, raising=False)


@pytest.mark.parametrize("probe, flags, native", [
    (False, {"avx512_bf16", "amx_bf16"}, False),  # oneDNN cannot run bf16 fast: nothing to gain
    (True, {"avx2", "fma"}, False),               # AVX2 only (this project's machine)
    (True, {"avx512f", "avx512bw"}, False),       # plain AVX-512: oneDNN emulates bf16 with fp32 FMAs
    (True, {"avx512f", "avx512_bf16"}, True),     # Cooper Lake, Zen 4
    (True, {"amx_bf16", "amx_tile"}, True),       # Sapphire Rapids
    (True, {"fp", "asimd", "bf16"}, True),        # Arm with BF16 (Graviton 3)
    (True, None, True),                           # flags unreadable: the probe decides
])
def test_native_bf16_needs_the_probe_and_the_flags(monkeypatch, probe, flags, native) -> None:
    monkeypatch.setattr(rt, "_onednn_bf16_probe", lambda: probe)
    monkeypatch.setattr(rt, "_cpu_flags", lambda: flags)
    assert rt.cpu_has_native_bf16() is native


@pytest.mark.parametrize("native, requested, expected", [
    (True, "auto", "bf16"), (False, "auto", "fp32"), (True, "fp32", "fp32"), (False, "bf16", "bf16"),
])
def test_precision_auto_on_the_cpu(monkeypatch, machine_decides, native, requested, expected) -> None:
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    cfg = OmegaConf.create({"device": "cpu", "precision": requested, "channels_last": "auto", "compile": "auto",
                            "num_threads": None})
    assert rt.make_runtime(cfg).precision == expected


def test_precision_auto_on_cuda_is_bf16_whatever_the_cpu(monkeypatch, machine_decides) -> None:
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    assert rt.auto_precision(torch.device("cuda")) == "bf16"
    assert rt.auto_precision(torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_the_switch_forces_what_auto_resolves_to_on_the_cpu(monkeypatch, native, forced) -> None:
    """``KD_AUTO_PRECISION`` wins over the CPU's answer for ``auto`` (and only for auto, and only on the CPU)."""
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setenv(rt.AUTO_PRECISION_ENV, forced)
    node = lambda precision: OmegaConf.create({"device": "cpu", "precision": precision, "channels_last": "auto",
                                               "compile": "auto", "num_threads": None})
    assert rt.make_runtime(node("auto")).precision == forced
    assert rt.make_runtime(node("fp32")).precision == "fp32"  # an explicit choice is never overridden
    assert rt.make_runtime(node("bf16")).precision == "bf16"
    assert rt.auto_precision(torch.device("cuda")) == "bf16"


def test_a_bad_switch_value_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv(rt.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(UserError, match="KD_AUTO_PRECISION=fp16 is not valid; use fp32 or bf16"):
        rt.auto_precision(torch.device("cpu"))


def test_this_machine_cpu_flags_are_read() -> None:
    flags = rt._cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    if "avx512_bf16" not in flags and "amx_bf16" not in flags and "bf16" not in flags:
        assert rt.cpu_has_native_bf16() is False
