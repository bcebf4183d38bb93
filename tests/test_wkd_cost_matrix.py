"""WKD-L's class cost matrix: the teacher pass before training (the engine's calibration seam), under DDP,
kept in the checkpoint, and a WKD run resumed mid-epoch bit for bit.

The reference matrix is computed here naively in float64 from the definition (METHODS_2025_LOGIT.md section 7
and the authors' tools/generate_cost_matrix.py): per class, the rows (k-th image, pixel) of the teacher's
last-stage maps of its first n images (n: the smallest class), centred; linear CKA between every two
classes; ``cost = 1 - exp(-s (1 - CKA))``.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import distill_node, generator, objective_of, run_ranks, seed, tiny_trainer

from datasets import DataSplits
from datasets.batch import Batch
from distiller.features import Features, forward_features
from distiller.methods import METHODS, BuildContext

CLASSES = 3
LABELS = [0, 1, 2, 2, 0, 1, 2, 0, 2]  # counts 3, 2, 4: the smallest class has n = 2 images


def naive_cost(maps: list[torch.Tensor], labels: list[int], classes: int, sharpen: float = 1.0) -> torch.Tensor:
    """``maps``: one [D, H, W] map per training image, in data-set order."""
    by_class = [[m.double() for m, y in zip(maps, labels) if y == a] for a in range(classes)]
    n = min(len(images) for images in by_class)
    x = []
    for images in by_class:
        d, h, w = images[0].shape
        rows = torch.stack([images[k][:, i, j] for k in range(n) for i in range(h) for j in range(w)])
        x.append(rows - rows.mean(dim=0))
    cost = torch.zeros(classes, classes, dtype=torch.float64)
    for a in range(classes):
        for b in range(classes):
            hsic = (x[b].t() @ x[a]).pow(2).sum()
            norm_a, norm_b = (x[a].t() @ x[a]).pow(2).sum().sqrt(), (x[b].t() @ x[b]).pow(2).sum().sqrt()
            cost[a, b] = 1.0 - math.exp(-sharpen * (1.0 - float(hsic / (norm_a * norm_b))))
    return cost


def unbalanced_data() -> DataSplits:
    g = generator(20)
    n = len(LABELS)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor(LABELS)
    return DataSplits(images, labels, images[:4].clone(), labels[:4].clone(), CLASSES, [str(i) for i in range(CLASSES)])


def test_the_teacher_pass_gives_the_cost_matrix_of_the_definition(tmp_path: Path) -> None:
    """One fit: the loop runs the calibration pass (3 batches of the training set in eval order) before the main
    phase, the buffer holds the naive matrix, and the checkpoint carries it with ``calibrated``."""
    trainer = tiny_trainer(tmp_path, distill_node("wkd_l", cost_sharpen=1.5), 1, "dataset.eval_batch_size=4",
                           data=unbalanced_data(), num_classes=CLASSES)
    assert len(list(trainer.calibration_loader.epoch(0))) == 3
    maps = []
    with torch.no_grad():
        for batch in trainer.calibration_loader.epoch(0):  # the same images the pass sees: eval mode, no augmentation
            feats, _ = forward_features(trainer.teacher.eval(), batch.images)
            maps += list(feats[-2])  # the last stage
    want = naive_cost(maps, LABELS, CLASSES, sharpen=1.5)
    state = trainer.fit()
    cost = trainer.objective.methods["wkd_l"].cost
    assert state.calibrated
    torch.testing.assert_close(cost.double(), want, rtol=0, atol=1e-6)  # float32 buffer of a float64 computation
    assert want[~torch.eye(CLASSES, dtype=torch.bool)].min() > 0.01  # a non-trivial matrix
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["run"]["calibrated"] and torch.equal(saved["objective"]["methods.wkd_l.cost"], cost)


def test_a_cost_matrix_file_replaces_the_teacher_pass(tmp_path: Path) -> None:
    g = generator(21)
    dist_matrix = torch.rand(CLASSES, CLASSES, generator=g)
    torch.save(dist_matrix, tmp_path / "linear_cka.pth")
    node = distill_node("wkd_l", cost_matrix=str(tmp_path / "linear_cka.pth"))
    trainer = tiny_trainer(tmp_path, node, 1, data=unbalanced_data(), num_classes=CLASSES)
    method = trainer.objective.methods["wkd_l"]
    assert method.calibration_features is None and trainer.calibration_loader is None
    torch.testing.assert_close(method.cost, 1.0 - torch.exp(-dist_matrix), rtol=0, atol=1e-7)
    trainer.step.remove_hooks()


# ---- DDP: every rank computes the same matrix, the one of a single process -----------------------------------

N, DIM, SIDE = len(LABELS), 5, 3
SHARDS = {0: [(0, 3), (3, 5)], 1: [(5, 9)]}  # contiguous shards, rank 0 with one batch more (no per-batch collective)


def maps_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = generator(22)
    return torch.randn(N, DIM, SIDE, SIDE, generator=g).relu(), torch.tensor(LABELS)


def calibrated(spans: list[tuple[int, int]]) -> torch.Tensor:
    method = METHODS.get("wkd_l")()
    method.build(Features(), Features(), BuildContext(CLASSES, N, torch.tensor(LABELS), torch.device("cpu"),
                                                      torch.nn.Module(), torch.nn.Module()))
    maps, labels = maps_and_labels()
    batches = [(Features(stages=[maps[lo:hi]]), Batch(images=maps[lo:hi], labels=labels[lo:hi],
                                                       indices=torch.arange(lo, hi))) for lo, hi in spans]
    method.calibrate(iter(batches))
    return method.cost


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(calibrated(SHARDS[rank]), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_calibrate_to_the_single_process_matrix(tmp_path: Path) -> None:
    run_ranks(_rank, 2, str(tmp_path / "pg"), str(tmp_path))
    single = calibrated([(0, N)])
    maps, labels = maps_and_labels()
    torch.testing.assert_close(single.double(), naive_cost(list(maps), LABELS, CLASSES), rtol=0, atol=1e-6)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), single, rtol=0, atol=0)
    # a rank's own shard alone gives another matrix: the gather is what makes them agree
    assert not torch.allclose(calibrated(SHARDS[0]), single)


# ---- resume: killed mid-epoch, resumed to the same bits ------------------------------------------------------

class Interrupted(Exception):
    """Stands in for a kill: raised between two steps, after the checkpoint of the step before."""


def wkd_objective():
    """WKD-L + WKD-F, both decaying from the first epoch on (factors 0.5, then 0 over 2 epochs)."""
    return objective_of(distill_node("wkd_l", cosine_decay_epoch=0),
                        {"wkd_f": distill_node("wkd_f", cosine_decay_epoch=0)})


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in history]


def test_wkd_resumed_mid_epoch_equals_the_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    """Interrupted after 2 of the 3 steps of epoch 2 (where the per-epoch weights have moved), then resumed by a
    fresh trainer from ``last.pt``: the cost matrix comes from the checkpoint (the pass does not run again),
    and weights, helpers, buffers and the epoch records equal the uninterrupted run's exactly."""
    every_step = "trainer.checkpoint_every_steps=1"
    reference = tiny_trainer(tmp_path / "ref", wkd_objective(), 2, every_step)
    reference.fit()

    victim = tiny_trainer(tmp_path / "run", wkd_objective(), 2, every_step)
    step = victim.train_step

    def interrupted(batch, phase, epoch, optimizer):
        if epoch == 2 and victim.state.step == 2:
            raise Interrupted
        return step(batch, phase, epoch, optimizer)

    victim.train_step = interrupted
    with pytest.raises(Interrupted):
        victim.fit()
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert (checkpoint["run"]["epoch"], checkpoint["run"]["step"], checkpoint["run"]["calibrated"]) == (1, 2, True)

    torch.manual_seed(seed(99))  # the resumed trainer starts from other weights: everything must come from last.pt
    resumed = tiny_trainer(tmp_path / "run", wkd_objective(), 2, every_step)

    def no_second_pass(batches):
        raise AssertionError("the cost matrix must come from the checkpoint")

    resumed.objective.methods["wkd_l"].calibrate = no_second_pass
    resumed.fit(resume_from=checkpoint)

    want = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    got = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for part in ("model", "objective"):
        assert want[part].keys() == got[part].keys()
        for key in want[part]:
            assert torch.equal(want[part][key], got[part][key]), (part, key)
    assert want["objective"]["methods.wkd_l.cost"].abs().sum() > 0
    assert comparable(reference.state.history) == comparable(resumed.state.history)
    assert [r["wkd_l/wd_weight"] for r in resumed.state.history] == pytest.approx([300.0, 0.0], abs=1e-12)
