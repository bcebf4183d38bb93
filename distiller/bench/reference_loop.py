"""The loop of the older CIFAR distillation frameworks (RepDistiller, mdistiller), on our networks and loss:
what the step-speed benchmark compares our step against.

A Dataset returning PIL images (torchvision's ``CIFAR100.__getitem__``), a torchvision DataLoader
with RandomCrop(32, 4) / RandomHorizontalFlip / ToTensor / Normalize in worker processes, fp32,
contiguous memory, forward hooks on every declared feature (as ``is_feat=True`` returns them all),
the teacher under ``no_grad``, per-batch ``.item()`` of loss and accuracy, plain ``torch.optim.SGD``;
CRD draws its contrast indices in the Dataset with ``np.random.choice`` as RepDistiller's
``CIFAR100InstanceSample`` does. The loop never calls the trainer: it takes the networks and the
objective of a second, fp32 assembly of the same run (same seed, so the same initial weights).
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from datasets import load_dataset
from datasets.augment import padding_for
from datasets.batch import Batch
from datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD
from distiller.bench.timed_step import EngineStep
from distiller.features import EMBEDDING, STAGES, STAGES_PREACT, STEM, FeatureHooks, Features
from distiller.methods.crd import CONTRAST_IDX_KEY, CRD


class ReferenceContrast:
    """RepDistiller's per-sample CRD sampling: ``np.random.choice`` over the other classes' samples."""

    def __init__(self, labels: torch.Tensor, k: int, mode: str) -> None:
        labels = labels.numpy()
        self.k, self.mode, self.n = k, mode, len(labels)
        classes = range(int(labels.max()) + 1)
        self.positive = [np.where(labels == c)[0] for c in classes]
        self.negative = [np.where(labels != c)[0] for c in classes]

    def sample(self, index: int, target: int) -> np.ndarray:
        if self.mode == "uniform":
            neg = np.random.randint(0, self.n, self.k)
        else:
            pool = self.negative[target]
            neg = np.random.choice(pool, self.k, replace=self.k > len(pool))
        pos = np.random.choice(self.positive[target], 1)[0] if self.mode == "relax" else index
        return np.hstack((np.asarray([pos]), neg)).astype(np.int64)


class ReferenceCIFAR(torch.utils.data.Dataset):
    """CIFAR stored as torchvision stores it (uint8 HWC numpy), read back as PIL images and transformed.

    With ``contrast`` the item also carries CRD's ``[1 + K]`` contrast indices drawn here, per
    sample, like RepDistiller's ``CIFAR100InstanceSample``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, contrast: ReferenceContrast | None,
                 mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD) -> None:
        import torchvision.transforms as T

        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.contrast = contrast
        h, w = images.shape[2:]  # RandomCrop(32, padding=4) at CIFAR's size, scaled like the engine's crop
        self.transform = T.Compose([T.RandomCrop((h, w), padding=padding_for(h, w)), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):  # the DataLoader's tuple
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = self.transform(Image.fromarray(img))
        if self.contrast is None:
            return img, target, index
        return img, target, index, self.contrast.sample(index, target)


def reference_loop(built: EngineStep, device: torch.device, workers: int) -> Callable[[], float]:
    """One step of the older frameworks' loop on the networks and loss of ``built`` (an fp32 assembly of the
    run), on a fresh load of its data set, ready to time."""
    trainer, job = built.trainer, built.job
    student, teacher, objective = trainer.student, trainer.teacher, trainer.objective
    every_feature = (STEM, STAGES, STAGES_PREACT, EMBEDDING)  # as `is_feat=True` returns them all
    s_hooks = FeatureHooks(student, every_feature)
    t_hooks = FeatureHooks(teacher, every_feature) if teacher is not None else None
    student.train()
    objective.train()
    if teacher is not None:
        teacher.eval()
        if objective.teacher_bn_train():
            for m in teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
    optimizer = torch.optim.SGD(list(student.parameters()) + objective.main_parameters(), lr=built.phase.lr,
                                momentum=job.optim.momentum, weight_decay=job.optim.weight_decay)

    data = load_dataset(job.dataset)
    crd = next((e.method for e in objective.active() if isinstance(e.method, CRD)), None)
    contrast = ReferenceContrast(data.train_labels, crd.nce_k, crd.mode) if crd is not None else None
    loader = torch.utils.data.DataLoader(ReferenceCIFAR(data.train_images, data.train_labels, contrast,
                                                        data.mean, data.std),
                                         batch_size=built.batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0)
    items = (item for _ in itertools.count() for item in loader)
    meters = {"loss": 0.0, "top1": 0.0, "count": 0}

    def step() -> float:
        item = next(items)
        images, labels, index = (t.to(device, non_blocking=True) for t in item[:3])
        extras = {CONTRAST_IDX_KEY: item[3].to(device, non_blocking=True)} if len(item) > 3 else {}
        batch = Batch(images.float(), labels, index, extras)
        t_logits, t_store = None, {}
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(batch.images)
            t_store = t_hooks.pop()
        s_logits = student(batch.images)
        s_store = s_hooks.pop()
        per_method = {
            e.label: (s_hooks.select(s_store, s_logits, e.method.student_features),
                      t_hooks.select(t_store, t_logits, e.method.teacher_features) if t_hooks else Features())
            for e in objective.entries}
        loss = objective(Features(logits=s_logits), Features(logits=t_logits) if t_logits is not None else None,
                         batch, 1, per_method).total
        top1 = (s_logits.topk(5, 1).indices[:, 0] == labels).float().mean() * 100.0
        n = labels.shape[0]
        meters["loss"] += loss.item() * n  # the older loops' per-batch host reads
        meters["top1"] += top1.item() * n
        meters["count"] += n
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step
