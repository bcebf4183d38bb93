"""Wasserstein Distance Rivals Kullback-Leibler Divergence for KD (Lv et al., NeurIPS 2024): the logit part, WKD-L."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from common.errors import UserError
from common.files import file_sha256
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.gather import gather_batch
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext
from distiller.methods.key_types import Epochs, NonNegative, Positive

log = logging.getLogger("distiller")

# float64 working sets while the cost matrix is computed: one block of classes' maps, and one block product
CKA_BLOCK_BYTES, CKA_PRODUCT_BYTES = 256 * 2 ** 20, 32 * 2 ** 20


def cosine_decay(epoch: int, start: int, epochs: int) -> float:
    """WKD's per-epoch factor on a loss weight: 1 up to epoch ``start``, then a cosine to 0 at epoch ``epochs``
    (``0.5 (1 + cos(pi (e - start) / (epochs - start)))``; epochs count from 1). A pure function of the epoch."""
    if epoch <= start or epochs <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / (epochs - start)))


def class_cka_distance(maps: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``1 - linear CKA`` between the classes' feature maps, [C, C] in float64, as the WKD authors' tools compute it.

    ``maps`` [N, R, D]: each image's map as R rows (pixels) of D channels, in data-set order; ``labels`` [N].
    Class a is the matrix ``X_a`` [n R, D] of its first n images (n: the smallest class's count; every
    class has n on CIFAR), centred by its own mean row; ``CKA(a, b) = |X_b^T X_a|_F^2 / (|X_a^T X_a|_F
    |X_b^T X_b|_F)``. Rows of two classes pair up by position (the k-th image's pixel p of each), as in
    the authors' ``generate_cost_matrix.py``. Blocks of classes are computed in float64, one matmul each.
    """
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    if bool((counts == 0).any()):
        missing = int(torch.nonzero(counts == 0)[0])
        raise UserError(f"wkd_l: class {missing} has no training image, so its row of the cost matrix is undefined; "
                        f"pass a cost matrix file (distill.cost_matrix=PATH) or train on a set with every class")
    n, (_, r, d) = int(counts.min()), maps.shape
    order = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rows = order[starts.unsqueeze(1) + torch.arange(n, device=labels.device)]  # [C, n]: each class's first n images
    k = max(1, min(num_classes, int(math.sqrt(CKA_PRODUCT_BYTES / 8) // d), int(CKA_BLOCK_BYTES // (8 * n * r * d))))

    def centred(lo: int, hi: int) -> torch.Tensor:
        x = maps[rows[lo:hi]].reshape(hi - lo, n * r, d).double()
        return x - x.mean(dim=1, keepdim=True)

    cross = torch.empty(num_classes, num_classes, dtype=torch.float64, device=maps.device)
    for a0 in range(0, num_classes, k):
        a1 = min(a0 + k, num_classes)
        xa = centred(a0, a1)
        left = xa.permute(0, 2, 1).reshape((a1 - a0) * d, n * r)
        for b0 in range(a0, num_classes, k):
            b1 = min(b0 + k, num_classes)
            xb = xa if b0 == a0 else centred(b0, b1)
            block = (left @ xb.permute(1, 0, 2).reshape(n * r, (b1 - b0) * d)).reshape(a1 - a0, d, b1 - b0, d)
            value = block.pow(2).sum(dim=(1, 3))  # |X_a^T X_b|_F^2
            cross[a0:a1, b0:b1], cross[b0:b1, a0:a1] = value, value.t()
    norms = cross.diagonal().sqrt()  # |X_a^T X_a|_F
    dist = 1.0 - cross / (norms.unsqueeze(1) * norms.unsqueeze(0))
    if not bool(torch.isfinite(dist).all()):
        flat = int(torch.nonzero(norms == 0)[0]) if bool((norms == 0).any()) else -1
        raise UserError(f"wkd_l: the teacher's features of class {flat} do not vary, so linear CKA is undefined; "
                        f"check the teacher checkpoint, or pass a cost matrix file (distill.cost_matrix=PATH)")
    return dist


@METHODS.register("wkd_l")
class WKDLogit(DistillMethod):
    """WKD-L (Lv et al., NeurIPS 2024): a target term plus the Sinkhorn-Wasserstein distance between the
    non-target softmaxes, under a class cost matrix derived from the teacher.

    One term, ``wkd_l``: :func:`distiller.functional.wkd_logit` with ``gamma = wkd_weight * cosine_decay(epoch)``
    (constant up to ``cosine_decay_epoch``, then a cosine to 0 at the last epoch), so only the Wasserstein
    part decays and the target term keeps weight 1, as in the authors' code; the config's ``beta`` is 1.

    The cost matrix is ``1 - exp(-cost_sharpen * dist)``, ``dist = 1 - linear CKA`` between the teacher's
    last-stage maps of each pair of classes (:func:`class_cka_distance`), computed once in a pass of the
    teacher over the training set before training (:meth:`calibrate`; under DDP the ranks' shards are
    gathered, so every rank holds the same matrix) and kept in a buffer, so checkpoints carry it and a
    resumed run does not recompute it. ``cost_matrix``: a file holding the authors' ``dist`` matrix
    ([C, C], e.g. their ``linear_cka.pth``) to use instead of the pass; its sha256 is logged.
    """

    weights_own_terms = True
    calibration_features = frozenset({STAGES})

    def __init__(self, wkd_weight: NonNegative = 600.0, wkd_temperature: float = 8.0, sinkhorn_lambda: float = 0.05,
                 sinkhorn_iter: int = 10, cost_matrix: str | None = None, cost_sharpen: Positive = 1.0,
                 cosine_decay_epoch: Epochs = 150) -> None:
        super().__init__()
        if not wkd_temperature > 0 or not sinkhorn_lambda > 0 or int(sinkhorn_iter) != sinkhorn_iter \
                or sinkhorn_iter < 1:
            raise ValueError(f"wkd_temperature={wkd_temperature} and sinkhorn_lambda={sinkhorn_lambda} must be > 0 "
                             f"and sinkhorn_iter={sinkhorn_iter} a positive integer")
        self.wkd_weight, self.wkd_temperature = float(wkd_weight), float(wkd_temperature)
        self.sinkhorn_lambda, self.sinkhorn_iter = float(sinkhorn_lambda), int(sinkhorn_iter)
        self.cost_sharpen, self.cosine_decay_epoch = float(cost_sharpen), int(cosine_decay_epoch)
        self.epochs, self.epoch = 240, 1
        self.given: torch.Tensor | None = None
        if cost_matrix is not None:
            path = Path(str(cost_matrix)).expanduser()
            if not path.is_file():
                raise ValueError(f"cost_matrix={cost_matrix}: no such file (a [C, C] tensor saved with torch.save, "
                                 f"e.g. the WKD authors' linear_cka.pth); null computes it from the teacher")
            try:
                self.given = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True)).double()
            except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
                raise ValueError(f"cost_matrix={cost_matrix} is not a tensor saved with torch.save ({err})") from None
            self.calibration_features = None  # the matrix is given: no pass over the training set
            log.info("wkd_l: cost matrix from %s (sha256 %s)", path, file_sha256(path))

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        c = ctx.num_classes
        self.epochs = ctx.epochs
        self.register_buffer("cost", torch.zeros(c, c))
        if self.given is not None:
            if tuple(self.given.shape) != (c, c):
                raise UserError(f"distill.cost_matrix has shape {tuple(self.given.shape)}, expected ({c}, {c}) for "
                                f"this data set's {c} classes")
            self.cost.copy_(self.sharpened(self.given))

    def sharpened(self, dist: torch.Tensor) -> torch.Tensor:
        """The cost the loss uses: ``1 - exp(-cost_sharpen * dist)`` (the authors' constructor)."""
        return 1.0 - torch.exp(-self.cost_sharpen * dist)

    def calibrate(self, batches: Iterable[tuple[Features[torch.Tensor], Batch]]) -> None:
        maps, labels = [], []
        for feats, batch in batches:
            last = feats.stages[-1].float()  # [B, D, H, W]: mdistiller's feats[-1]
            maps.append(last.flatten(2).transpose(1, 2))
            labels.append(batch.labels)
        # this rank's contiguous shard in data-set order; the gather restores the whole set, in order
        x, y = gather_batch(torch.cat(maps)), gather_batch(torch.cat(labels))
        self.cost.copy_(self.sharpened(class_cka_distance(x, y.long(), self.cost.shape[0])))

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch  # for scalars(); the loss reads ctx.epoch

    def wd_weight(self, epoch: int) -> float:
        """The Wasserstein term's weight in ``epoch``: ``wkd_weight`` times the cosine decay."""
        return self.wkd_weight * cosine_decay(epoch, self.cosine_decay_epoch, self.epochs)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        return {"wkd_l": F.wkd_logit(student.logits, teacher.logits, batch.labels, self.cost,
                                     temperature=self.wkd_temperature, gamma=self.wd_weight(ctx.epoch),
                                     sinkhorn_lambda=self.sinkhorn_lambda, sinkhorn_iter=self.sinkhorn_iter)}

    def scalars(self) -> dict[str, float]:
        return {"wd_weight": self.wd_weight(self.epoch)}

    def extra_repr(self) -> str:
        return (f"weight={self.wkd_weight}, T={self.wkd_temperature}, lambda={self.sinkhorn_lambda}, "
                f"iters={self.sinkhorn_iter}, decay after epoch {self.cosine_decay_epoch}")
