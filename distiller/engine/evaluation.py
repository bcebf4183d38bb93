"""Test-split evaluation: top-1, top-5 and loss with large batches, reduced over ranks."""
from __future__ import annotations

import torch
from torch import nn

from datasets.device_loader import DeviceLoader
from distiller.engine.runtime import Runtime, all_reduce_sum
from distiller.features import FeatureHooks


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, runtime: Runtime,
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
