"""Test-split metrics of a network: top-1, top-5 and loss (reduced over ranks), and the same per class."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.errors import UserError
from datasets.loaders import BatchLoader, make_loader
from distiller.engine.runtime import Runtime, all_reduce_sum
from distiller.features import FeatureHooks


@torch.no_grad()
def measure(model: nn.Module, loader: BatchLoader, runtime: Runtime,
             hooks: FeatureHooks | None = None) -> dict[str, float]:
    """``test_loss``, ``test_top1``, ``test_top5`` of ``model`` in eval mode (its mode restored after).

    The forward passes run in ``runtime.eval_precision`` (``trainer.eval_precision``: fp32 by
    default, even when training autocasts to bf16/fp16), so accuracies are not rounded by training's
    precision and the best epoch is picked on the network, not on its rounding.

    ``hooks``: the feature hooks registered on ``model``, emptied after every batch so nothing
    of an evaluation batch outlives it.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, device=runtime.device, dtype=torch.float64)
    for batch in loader.epoch(0):
        with runtime.eval_autocast():  # fp32 unless trainer.eval_precision says otherwise
            logits = model(batch.images)
        if hooks is not None:
            hooks.pop()
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == batch.labels[:, None]
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(1).sum().double(),
            torch.tensor(float(len(batch)), device=runtime.device, dtype=torch.float64)])
    all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"test_loss": loss / count, "test_top1": 100.0 * top1 / count, "test_top5": 100.0 * top5 / count}


@torch.no_grad()
def measure_per_class(model: nn.Module, data: Any, runtime: Runtime, batch_size: int = 1024) -> dict[str, Any]:
    """Top-1, top-5 and mean cross-entropy on ``data``'s test split, overall and per class (in %).

    ``per_class_top1[c]`` / ``per_class_top5[c]``: accuracy on the test images of class ``c``
    (None for a class without test images); ``per_class_count[c]``: how many there are.
    """
    loader = make_loader(data, "test", batch_size, runtime.device, train=False)
    n = data.num_classes
    was_training = model.training
    model.eval().to(runtime.device)
    count = torch.zeros(n, dtype=torch.float64, device=runtime.device)
    hit1, hit5 = torch.zeros_like(count), torch.zeros_like(count)
    loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    for batch in loader.epoch(0):
        with runtime.eval_autocast():  # fp32 unless trainer.eval_precision says otherwise
            logits = model(batch.images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == batch.labels[:, None]
        loss += nn.functional.cross_entropy(logits, batch.labels, reduction="sum").double()
        count += torch.bincount(batch.labels, minlength=n).double()
        hit1 += torch.bincount(batch.labels[hits[:, 0]], minlength=n).double()
        hit5 += torch.bincount(batch.labels[hits.any(1)], minlength=n).double()
    model.train(was_training)
    total = float(count.sum())
    if total == 0:
        raise UserError("the data set's test split is empty; choose another dataset or dataset.test_size")
    per1 = [None if c == 0 else 100.0 * h / c for h, c in zip(hit1.tolist(), count.tolist())]
    per5 = [None if c == 0 else 100.0 * h / c for h, c in zip(hit5.tolist(), count.tolist())]
    return {"test_top1": 100.0 * float(hit1.sum()) / total, "test_top5": 100.0 * float(hit5.sum()) / total,
            "test_loss": float(loss) / total, "num_images": int(total), "per_class_top1": per1,
            "per_class_top5": per5, "per_class_count": [int(c) for c in count.tolist()]}
