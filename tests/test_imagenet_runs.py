"""ImageNet from the command line, streamed: R34 -> R18 DKD and R50 -> MV1 KD, exact mid-epoch resume, bad input.

The data is a generated ImageNet-layout folder of 3 wnids holding the awkward files real ImageNet
has (a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG, and 16-bit and palette PNGs), cropped to
16 px. The teachers are torchvision networks built without weights and saved as torchvision ships
its weights: a plain state dict named ``<name>-<first 8 hex digits of its sha256>.pth``. Every run
goes through ``train_student.py`` in this process (``run_cli``), with ``dataset.stream=true``.
What a run decoded is counted by wrapping the stream loader's decoder, and compared with the
epoch's permutation drawn independently (``draw_epoch_plan``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import comparable_metrics, run_cli, seed
from image_files import imagenet_folder

import datasets.stream_loader as stream_loader
from datasets.sharding import draw_epoch_plan
from datasets.stream_loader import StreamLoader
from distiller.jobs.teachers import add_teacher
from models import build_model

WNIDS = ("n01440764", "n01443537", "n01484850")
SIZE, RESIZE = 16, 18  # RandomResizedCrop(16); Resize(18) + CenterCrop(16)
BATCH = 4
PAIRS = {  # the two ImageNet pairs, as the command line names them
    "r34_r18_dkd": ("resnet34", ["teacher=torchvision", "teacher.name=resnet34", "student=torchvision",
                                 "student.name=resnet18", "distill=dkd"]),
    "r50_mv1_kd": ("resnet50", ["teacher=torchvision", "teacher.name=resnet50", "student=MobileNetV1", "distill=kd"]),
}


def save_as_torchvision(folder: Path, name: str, state: dict) -> Path:
    """``state`` saved as torchvision publishes weights: a plain state dict, named after its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f"{name}.partial"
    torch.save(state, scratch)
    path = folder / f"{name}-{hashlib.sha256(scratch.read_bytes()).hexdigest()[:8]}.pth"
    scratch.rename(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("imagenet_runs")
    imagenet_folder(tmp / "net", np.random.default_rng(seed(20)), WNIDS, train=2, val=1)
    weights = {}
    for name in ("resnet34", "resnet50"):
        torch.manual_seed(seed(21))
        weights[name] = save_as_torchvision(tmp / "weights", name,
                                            torchvision.models.get_model(name, num_classes=len(WNIDS)).state_dict())
    train = sorted(str(p) for p in (tmp / "net" / "train").rglob("*") if p.is_file())
    val = sorted(str(p) for p in (tmp / "net" / "val").rglob("*") if p.is_file())
    return {"tmp": tmp, "root": tmp / "net", "weights": weights, "train": train, "val": val}


def overrides(world: dict, pair: str, run_dir: Path, *extra: str) -> list[str]:
    teacher, choice = PAIRS[pair]
    return [*choice, f"teacher.ckpt={world['weights'][teacher]}", "dataset=imagenet", f"dataset.root={world['root']}",
            f"dataset.image_size={SIZE}", f"dataset.eval_resize={RESIZE}", "dataset.stream=true", "dataset.workers=0",
            f"dataset.batch_size={BATCH}", "dataset.eval_batch_size=8", "trainer.epochs=1", "trainer.device=cpu",
            "trainer.precision=fp32", "trainer.eval_precision=fp32", "trainer.progress=false", "logger=none",
            f"teacher_dir={world['tmp'] / 'teachers'}", f"hydra.run.dir={run_dir}", *extra]


def counting_decoder(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count the files the stream loader decodes (workers=0: in this process)."""
    decoded: Counter = Counter()
    real = stream_loader.decode_rgb
    monkeypatch.setattr(stream_loader, "decode_rgb", lambda path: decoded.update([str(path)]) or real(path))
    return decoded


def train_order(world: dict, epoch: int) -> list[str]:
    """The training files of ``epoch`` in the order the run must read them: the permutation of (seed 0, epoch)."""
    order = draw_epoch_plan(0, epoch, len(world["train"]), 0)[0].tolist()
    return [world["train"][i] for i in order]


@pytest.fixture(scope="module")
def runs(world: dict) -> dict:
    """One epoch of each pair from the command line, streamed, with what each decoded."""
    done = {}
    for pair in PAIRS:
        with pytest.MonkeyPatch.context() as patch:
            decoded = counting_decoder(patch)
            result = run_cli("train_student.py", *overrides(world, pair, world["tmp"] / pair))
        done[pair] = (result, decoded)
    return done


# ---------------------------------------------------------------------------------------------- one epoch


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_a_pair_trains_one_streamed_epoch_from_the_command_line(world: dict, runs: dict, pair: str) -> None:
    result, decoded = runs[pair]
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = world["tmp"] / pair
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and len(metrics["epochs"]) == 1
    assert np.isfinite(metrics["epochs"][0]["train_loss"])
    # 10 training files, batches 4 + 4 + 2 (a last batch of 2 is kept): every training file read once, in the
    # epoch's permutation; the 4 validation files read twice (the teacher's evaluation, then the student's)
    assert len(world["train"]) == 10 and len(world["val"]) == 4
    assert {f: decoded[f] for f in world["train"]} == {f: 1 for f in world["train"]}
    assert {f: decoded[f] for f in world["val"]} == {f: 2 for f in world["val"]}
    assert any(f.endswith(("cmyk.JPEG", "disguised.JPEG", "gray.JPEG")) for f in decoded)
    # the teacher was measured on the 4 validation images: a multiple of 25 %
    teacher = PAIRS[pair][0]
    line = next(x for x in result.stdout.splitlines() if x.startswith(f"teacher torchvision-{teacher}: test top-1"))
    assert float(line.rsplit(" ", 1)[1]) in (0.0, 25.0, 50.0, 75.0, 100.0)
    # the student is the named architecture (its weights load strictly into one built here) and took 3 training
    # steps: every BatchNorm counted 3 batches
    fresh = (torchvision.models.resnet18(num_classes=3) if pair == "r34_r18_dkd"
             else build_model("MobileNetV1", num_classes=3))
    trained = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    fresh.load_state_dict(trained, strict=True)
    counts = {int(v) for k, v in trained.items() if k.endswith("num_batches_tracked")}
    assert counts == {3}
    terms = {"r34_r18_dkd": {"loss_ce", "loss_tckd", "loss_nckd"}, "r50_mv1_kd": {"loss_ce", "loss_kd"}}[pair]
    assert terms <= set(metrics["epochs"][0])
    config = (run_dir / "config.yaml").read_text()
    assert "stream: true" in config


# ---------------------------------------------------------------------------------------------- resume


def test_a_run_interrupted_mid_epoch_resumes_to_the_same_weights(world: dict, runs: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped before the third step (last.pt of step 2, as a kill would leave it), rerun: the run reads only the
    third step's files and ends bit for bit where the uninterrupted run ended."""
    reference = world["tmp"] / "r34_r18_dkd"
    assert runs["r34_r18_dkd"][0].returncode == 0
    run_dir = tmp_path / "interrupted"
    every_step = "trainer.checkpoint_every_steps=1"  # last.pt after each step (the reference wrote it per epoch)
    real_epoch = StreamLoader.epoch

    def stops_before_step_3(self: StreamLoader, epoch: int, start_step: int = 0):
        for k, batch in enumerate(real_epoch(self, epoch, start_step), start=start_step):
            if self.train and k == 2:
                raise KeyboardInterrupt  # what Ctrl-C does mid-epoch
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(StreamLoader, "epoch", stops_before_step_3)
        stopped = run_cli("train_student.py", *overrides(world, "r34_r18_dkd", run_dir, every_step))
    assert stopped.returncode == 2 and "interrupted" in stopped.stderr
    state = torch.load(run_dir / "last.pt", weights_only=True)["run"]
    assert (state["epoch"], state["step"], state["finished"]) == (0, 2, False)

    decoded = counting_decoder(monkeypatch)
    resumed = run_cli("train_student.py", *overrides(world, "r34_r18_dkd", run_dir, every_step))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    third_step = train_order(world, 1)[2 * BATCH:]
    assert sorted(f for f in decoded if f in world["train"]) == sorted(third_step) and len(third_step) == 2
    for name in ("final.pt", "last.pt"):
        ours = torch.load(run_dir / name, weights_only=True)["model"]
        theirs = torch.load(reference / name, weights_only=True)["model"]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert comparable_metrics(run_dir) == comparable_metrics(reference)


# ---------------------------------------------------------------------------------------------- bad input


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def bad_case(world: dict, tmp: Path, case: str) -> tuple[list[str], str]:
    """Overrides with one defect of the issue's list, and what the one line must name."""
    root = tmp / "net"
    shutil.copytree(world["root"], root, ignore=shutil.ignore_patterns(".kd-check-*"))
    r34 = world["weights"]["resnet34"]
    if case.startswith("tampered"):  # a copy of the teacher file to damage
        (tmp / "weights").mkdir()
        r34 = Path(shutil.copy2(r34, tmp / "weights" / r34.name))
    extra = [f"dataset.root={root}", f"teacher.ckpt={r34}"]
    if case == "root without train/ and val/":
        for split in ("train", "val"):
            shutil.rmtree(root / split)
        return extra, str(root / "train")
    if case == "class folders differ":
        shutil.rmtree(root / "val" / WNIDS[2])
        return extra, WNIDS[2]
    if case == "empty class":
        (root / "train" / "n09999999").mkdir()
        return extra, str(root / "train" / "n09999999")
    if case == "zero-byte JPEG":
        (root / "train" / WNIDS[0] / "empty.JPEG").write_bytes(b"")
        return extra, str(root / "train" / WNIDS[0] / "empty.JPEG")
    if case == "truncated JPEG":
        victim = root / "val" / WNIDS[1] / f"{WNIDS[1]}_val_0.JPEG"
        victim.write_bytes(victim.read_bytes()[:300])
        return extra, str(victim)
    if case == "weights of another architecture":
        return [f"dataset.root={root}", f"teacher.ckpt={world['weights']['resnet50']}"], "not torchvision-resnet34"
    if case == "tampered download":
        flip_a_byte(r34)
        return extra, "is not the file its name promises"
    if case == "tampered after indexing":
        add_teacher(r34, "torchvision-resnet34", "imagenet")  # as `scripts/teachers.py add` records it
        flip_a_byte(r34)
        return extra, "changed since it was indexed"
    raise ValueError(case)


BAD = ["root without train/ and val/", "class folders differ", "empty class", "zero-byte JPEG", "truncated JPEG",
       "weights of another architecture", "tampered download", "tampered after indexing"]


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folders`` with its size and modification time (a file written over changes them)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_with_status_2_and_nothing_written_over(world: dict, tmp_path: Path,
                                                                      case: str) -> None:
    extra, named = bad_case(world, tmp_path, case)
    # the data, the teacher files and index, and an earlier run's results (beside it) stay as they were
    watched = (tmp_path, world["weights"]["resnet34"].parent, world["tmp"] / "r50_mv1_kd")
    before = snapshot(*watched)
    run_dir = tmp_path / "run"
    result = run_cli("train_student.py", *overrides(world, "r34_r18_dkd", run_dir), *extra)
    assert result.returncode == 2
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    after = snapshot(*watched)
    assert {k: after.get(k) for k in before} == before
    assert not run_dir.exists()  # refused before it started: not even the folder Hydra made for it stays
