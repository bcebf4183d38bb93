"""DDP on CPU with 2 gloo processes: same result as one process with the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_ranks_match_one_process, compose_config, run_cli, run_ranks, tiny_overrides

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
              pytest.mark.numeric]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_with_engine(rank: int, world_size: int, port: int, out: Path, overrides: list[str], steps: int) -> None:
    """Build the real trainer, run ``steps`` main-phase steps, save student and method state."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if world_size == 1:
        os.environ["WORLD_SIZE"] = "1"
    torch.set_num_threads(1)
    from distiller.engine.runtime import make_runtime
    from distiller.jobs.train import assemble_distillation, compose_job

    job, record, _ = compose_job(compose_config("train_student", overrides), "train_student")
    runtime = make_runtime(job.trainer)
    trainer, _ = assemble_distillation(job, out / f"run{world_size}", record, runtime, load_teacher=False)
    phase = trainer.plan[-1]
    optimizer = trainer.prepare_phase(phase)
    # BatchNorm in eval mode: each sample's output then depends on that sample only, so a
    # global batch split over ranks must give exactly the gradient of the whole batch.
    trainer.student.eval()
    for _, batch in zip(range(steps), trainer.train_loader.epoch(1)):
        trainer.train_step(batch, phase, 1, optimizer)
    evaluation = trainer.measure(trainer.student)
    torch.save({"model": trainer.student.state_dict(), "objective": trainer.objective.state_dict(),
                "evaluation": evaluation}, out / f"world{world_size}_rank{rank}.pt")
    if world_size > 1:
        torch.distributed.destroy_process_group()


def run_engine_ranks(world_size: int, out: Path, overrides: list[str], steps: int = 3) -> None:
    """``steps_with_engine`` in ``world_size`` forked processes (a world of 1: one process, no process group)."""
    run_ranks(steps_with_engine, world_size, free_port(), out, overrides, steps)


def base_overrides(tmp: Path, method: str, batch: int, *extra: str) -> list[str]:
    # fp32 whatever trainer.precision=auto would pick: the comparison's tolerance is fp32 rounding
    return ["teacher=resnet8", "student=resnet8", f"distill={method}", *tiny_overrides(tmp, train_size=256),
            f"dataset.batch_size={batch}", "trainer.precision=fp32", *extra]


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x 16 images == 1 process x 32 images, step for step (tolerance: float summation order)."""
    run_engine_ranks(1, tmp_path, base_overrides(tmp_path, "kd", 32))
    run_engine_ranks(2, tmp_path, base_overrides(tmp_path, "kd", 16))
    single = torch.load(tmp_path / "world1_rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_ranks_match_one_process(ranks, single)


def test_crd_memory_banks_stay_identical_on_all_ranks(tmp_path):
    run_engine_ranks(2, tmp_path, base_overrides(tmp_path, "crd", 16, "distill.nce_k=32"), steps=4)
    ranks = [torch.load(tmp_path / f"world2_rank{r}.pt", weights_only=True)["objective"] for r in (0, 1)]
    banks = [k for k in ranks[0] if "memory" in k or "norm" in k]
    assert banks
    for key in banks:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0][banks[0]].shape[0] == 256  # one row per training sample


def torchrun(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
            str(REPO / "train_student.py"), *overrides]


@pytest.mark.slow  # three torchrun launches of two ranks (~35 s): CI runs it with the other numeric tests
def test_torchrun_end_to_end_only_rank0_writes_and_resumes(tmp_path):
    """A 3-epoch torchrun run killed after epoch 1 resumes to the uninterrupted run's result."""
    teacher = run_cli("train_teacher.py", "model=resnet8", f"hydra.run.dir={tmp_path / 't'}", *tiny_overrides(tmp_path))
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["teacher=resnet8", "student=resnet8", "distill=crd", "distill.nce_k=32",
              *tiny_overrides(tmp_path, train_size=256), "dataset.batch_size=16", "trainer.epochs=3"]
    reference = subprocess.run(torchrun(*common, f"hydra.run.dir={tmp_path / 'ref'}"), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref = tmp_path / "ref"
    assert len(list((ref / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert not [p for p in ref.iterdir() if p.name.endswith(".tmp")]
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 3
    # each rank saw its own half of every epoch: 256 samples / (2 x 16) = 8 steps, all 256 counted
    assert reference.stdout.count("final test top-1") == 1
    # the numbers recorded are those of the saved model: each rank evaluated its half of the test split with
    # its own BatchNorm statistics, while only rank 0's model was saved
    from distiller.jobs.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(ref / "final.pt", ["trainer.device=cpu", f"dataset.root={tmp_path / 'data'}"])
    assert again["test_top1"] == metrics["final_top1"]
    assert again["test_loss"] == pytest.approx(metrics["epochs"][-1]["test_loss"], rel=1e-5)

    victim_dir = tmp_path / "killed"
    victim = subprocess.Popen(torchrun(*common, f"hydra.run.dir={victim_dir}"), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics_file = victim_dir / "metrics.json"
        if metrics_file.exists() and json.loads(metrics_file.read_text())["completed_epochs"] >= 1:
            os.killpg(victim.pid, signal.SIGKILL)
            break
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.wait()
    assert json.loads((victim_dir / "metrics.json").read_text())["status"] == "running"
    resumed = subprocess.run(torchrun(*common, f"hydra.run.dir={victim_dir}"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(ref / "final.pt", weights_only=True)["model"]
    b = torch.load(victim_dir / "final.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def test_a_mid_epoch_checkpoint_pools_the_training_sums_of_every_rank() -> None:
    """Only rank 0 writes last.pt: it kept rank 0's own sums, every rank reloaded them, and a torchrun run killed
    mid-epoch recorded another train_loss for that epoch. The sums are pooled (every float sum reduced over the
    ranks, here a stand-in that doubles it, as two equal ranks would), the step flags are rank 0's."""
    from distiller.engine.meter import Meter

    meter = Meter(torch.device("cpu"))
    meter.add(0, torch.tensor(2.0), {"kd": torch.tensor(0.5)}, 4, torch.eye(4), torch.tensor([0, 1, 0, 3]))
    alone, pooled = meter.state(), meter.state(lambda t: t * 2)
    assert (float(alone["loss"]), float(alone["count"]), float(alone["correct"]), float(alone["term/kd"])) == \
        (8.0, 4.0, 3.0, 2.0)
    for key in ("loss", "count", "correct", "term/kd"):
        assert float(pooled[key]) == 2 * float(alone[key]), key
    assert torch.equal(pooled["nonfinite_step"], alone["nonfinite_step"])
    assert torch.equal(pooled["nonfinite_terms"], alone["nonfinite_terms"])
