"""hydra/launcher=local_gpus packing: GPUs x jobs_per_gpu slots, one lock per slot, on fake GPU ids.

No GPU is needed: the slots are lock files and CUDA_VISIBLE_DEVICES is only recorded, never used.
Real processes take the locks (flock locks belong to open files, so a process per job is the
faithful model of joblib's workers); what is checked comes from the intervals each job records.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import CONFIGS
from omegaconf import OmegaConf

from common.errors import UserError
from distiller.config import gpu_slots as launcher
from distiller.config.gpu_slots import GpuSlots, SlotPlan, choose_jobs_per_gpu, plan_slots


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (explicit sweep over the start and end events)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    open_, most = 0, 0
    for _, delta in events:  # ends sort before starts at equal times: touching intervals do not overlap
        open_ += delta
        most = max(most, open_)
    return most


def check_packing(jobs: list[dict], gpus: set[str], per_gpu: int) -> None:
    assert {j["gpu"] for j in jobs} <= gpus
    for gpu in gpus:
        on_gpu = [(j["start"], j["end"]) for j in jobs if j["gpu"] == gpu]
        assert max_overlap(on_gpu) <= per_gpu, gpu
    for i, a in enumerate(jobs):  # two jobs that ran at the same time never held the same slot
        for b in jobs[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and (a["gpu"], a["slot"]) == (b["gpu"], b["slot"])), (a, b)


# ---- the plan ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory, footprint, expected", [
    (81559, 3072, 8),   # H100 80GB: floor(0.9 * 81559 / 3072) = 23, capped at 8
    (16384, 3072, 4),   # floor(14745.6) = 14745; 14745 // 3072 = 4
    (16384, 4000, 3),   # 14745 // 4000 = 3
    (2048, 3072, 1),    # nothing fits: still one job
    (None, 3072, 1),    # memory unknown: one job per GPU
])
def test_jobs_per_gpu_from_memory(memory, footprint, expected) -> None:
    assert choose_jobs_per_gpu(memory, footprint) == expected


def test_plan_uses_the_tightest_gpu_and_the_measured_footprint(tmp_path: Path) -> None:
    measured = tmp_path / "gpu_check.json"
    measured.write_text(json.dumps({"footprint_mib": 1800}))
    memory = {"0": 81559, "1": 16384}
    plan = plan_slots(devices=[0, 1], footprint_from=measured, memory_mib=memory)
    assert plan == SlotPlan(("0", "1"), 14745 // 1800)  # = 8, set by the 16 GiB GPU
    assert plan_slots(devices=[0, 1], memory_mib=memory).jobs_per_gpu == 14745 // 3072  # no measurement: estimate
    assert plan_slots(devices="0,1", jobs_per_gpu=3, memory_mib=memory) == SlotPlan(("0", "1"), 3)  # overridden
    assert plan_slots(devices=[5], jobs_per_gpu=2).slots() == [("5", 0), ("5", 1)]
    # round-robin: fewer jobs than slots spread over every GPU first
    assert SlotPlan(("0", "1"), 2).slots() == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]


def test_visible_gpus_and_bad_settings(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert plan_slots(jobs_per_gpu=2).devices == ("4", "5", "6")
    assert plan_slots(gpus=2, jobs_per_gpu=2).devices == ("4", "5")
    with pytest.raises(UserError, match="gpus=4"):
        plan_slots(gpus=4)
    with pytest.raises(UserError, match="jobs_per_gpu=0"):
        plan_slots(jobs_per_gpu=0)
    with pytest.raises(UserError, match="n_jobs=7.*3 GPU.*x 2 job"):
        GpuSlots(num_slots=7, lock_dir="/nonexistent", jobs_per_gpu=2)
    assert GpuSlots(num_slots=6, lock_dir="/nonexistent", jobs_per_gpu=2).plan.num_slots == 6


def test_launcher_config_defaults_n_jobs_to_every_slot(compose) -> None:
    cfg = compose("train_student", ["hydra/launcher=local_gpus", "hydra.callbacks.gpu_slots.devices=[0,1]",
                                    "hydra.callbacks.gpu_slots.jobs_per_gpu=3"], return_hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 6
    slots = GpuSlots(**{k: v for k, v in cfg.hydra.callbacks.gpu_slots.items() if k != "_target_"})
    with pytest.raises(UserError, match="n_jobs=7"):
        slots.on_multirun_start(OmegaConf.merge(cfg, {"hydra": {"launcher": {"n_jobs": 7}}}))


def test_a_sweep_on_a_machine_without_a_gpu_says_so(monkeypatch, caplog) -> None:
    """No GPU listed (no CUDA_VISIBLE_DEVICES, nvidia-smi lists none): the plan assumes GPU 0, and the sweep
    says so once instead of reporting GPU slots as if there were a GPU; a listed GPU gives no such line."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(launcher.PLAN_DEVICES_ENV, "")  # (not delenv: the callback sets it, and it must not leak)
    monkeypatch.setattr(launcher, "gpu_memory_mib", lambda: {})
    config = OmegaConf.create({"hydra": {"launcher": {"n_jobs": 2}}})
    plan = plan_slots(jobs_per_gpu=2)
    assert plan.devices == ("0",) and not plan.found
    with caplog.at_level("INFO", logger=launcher.__name__):
        GpuSlots(lock_dir="/nonexistent", jobs_per_gpu=2).on_multirun_start(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("no GPU found") and "2 at once" in warnings[0]
    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv(launcher.PLAN_DEVICES_ENV, "")
    assert plan_slots(jobs_per_gpu=2).found and plan_slots(devices=[0], jobs_per_gpu=1).found
    with caplog.at_level("INFO", logger=launcher.__name__):
        GpuSlots(lock_dir="/nonexistent", jobs_per_gpu=2).on_multirun_start(config)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---- real processes on the lock files -------------------------------------------------------------------
def _job(slots: list[tuple[str, int]], lock_dir: str, hold_s: float, out: str) -> None:
    device, k = launcher.acquire_slot(slots, Path(lock_dir), poll_s=0.02)
    start = time.time()
    time.sleep(hold_s)
    Path(out).write_text(json.dumps({"gpu": device, "slot": k, "start": start, "end": time.time(),
                                     "pid": os.getpid()}))


def test_slot_locks_bound_each_gpu_with_real_processes(tmp_path: Path) -> None:
    """10 processes on 2 fake GPUs x 3 slots: at most 3 at once per GPU, no slot shared, all finish
    (the 4 beyond the 6 slots wait for a holder to exit, when the system releases its lock)."""
    plan = SlotPlan(("0", "1"), 3)
    ctx = mp.get_context("fork")  # each child opens and locks the files itself, as a separate job would
    procs = [ctx.Process(target=_job, args=(plan.slots(), str(tmp_path / "locks"), 0.5, str(tmp_path / f"{i}.json")))
             for i in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    jobs = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(10)]
    check_packing(jobs, {"0", "1"}, 3)
    assert len({(j["gpu"], j["slot"]) for j in jobs}) == 6  # every slot was used


APP = '''
import json, os, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path=".", config_name="app", version_base="1.3")
def main(cfg):
    from distiller.config import gpu_slots as launcher
    start = time.time()
    time.sleep(cfg.sleep)
    out = Path(HydraConfig.get().runtime.output_dir)
    gpu, slot = launcher._HELD["slot"]
    (out / "slot.json").write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time(),
                                               "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "slot": slot,
                                               "n_jobs": HydraConfig.get().launcher.n_jobs}))

if __name__ == "__main__":
    main()
'''


def test_local_gpus_packs_jobs_per_gpu_through_hydra(tmp_path: Path) -> None:
    """The launcher as a sweep uses it: 12 jobs, fake GPUs 0,1 x jobs_per_gpu=3, n_jobs left to its default."""
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(textwrap.dedent(f"""\
        job: 0
        sleep: 0.8
        hydra:
          searchpath: [file://{CONFIGS}]
          sweep:
            dir: {tmp_path / 'sweep'}
            subdir: job${{job}}
        """))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", "hydra/launcher=local_gpus",
                             "hydra.callbacks.gpu_slots.jobs_per_gpu=3",
                             f"hydra.callbacks.gpu_slots.lock_dir={tmp_path / 'locks'}", "job=range(12)"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = [json.loads((tmp_path / "sweep" / f"job{i}" / "slot.json").read_text()) for i in range(12)]
    assert {j["n_jobs"] for j in jobs} == {6}
    assert len({j["pid"] for j in jobs}) <= 6  # never more processes than slots
    check_packing(jobs, {"0", "1"}, 3)
    # every worker keeps its one slot
    assert all(len({(j["gpu"], j["slot"]) for j in jobs if j["pid"] == pid}) == 1 for pid in {j["pid"] for j in jobs})
