"""A teacher's measured accuracy beside its published one: stored teachers (train_teacher.py), evaluated files
(scripts/evaluate.py) and the teacher a student checks before it learns (:func:`published_check`)."""
from __future__ import annotations

from typing import Any

# a stored or downloaded teacher measured this many points below its published accuracy is flagged:
# the published numbers are single runs, and retrained teachers spread by about +-0.5 points over
# seeds, so one point below is beyond seed noise (a wrong file, wrong preprocessing or a short recipe)
PUBLISHED_TOLERANCE = 1.0
# the published teacher accuracies hold for a data set's full test split only: CIFAR-100's test split and
# ImageNet's 50,000-image val split (split sizes here; the numbers in distiller.config.schema)
PUBLISHED_TEST_SIZES = {"cifar100": 10000, "imagenet": 50000}


def published_check(arch: str, dataset: str, num_test: int, measured_top1: float,
                    published: float | None = None) -> dict[str, Any] | None:
    """Compare a measured teacher accuracy with the published one (None where no comparison applies).

    The published numbers hold for a data set's full test split only (:data:`PUBLISHED_TEST_SIZES`):
    CIFAR-100's (``distiller.config.schema.PUBLISHED_TEACHER_TOP1``, or ``published``: the teacher
    node's ``published_top1``, which carries them) and ImageNet's val split (``PUBLISHED_IMAGENET_TOP1``:
    torchvision's weights; a node's CIFAR-100 number never applies there). ``ok`` is false when the
    measurement is more than :data:`PUBLISHED_TOLERANCE` points below.
    """
    from distiller.config.schema import PUBLISHED_IMAGENET_TOP1, PUBLISHED_TEACHER_TOP1

    if PUBLISHED_TEST_SIZES.get(dataset) != num_test:
        return None
    tables = {"cifar100": PUBLISHED_TEACHER_TOP1, "imagenet": PUBLISHED_IMAGENET_TOP1}
    if published is None or dataset != "cifar100":
        published = tables[dataset].get(arch)
    if published is None:
        return None
    difference = measured_top1 - published
    return {"published_top1": published, "measured_top1": measured_top1, "difference": difference,
            "tolerance": PUBLISHED_TOLERANCE, "ok": difference >= -PUBLISHED_TOLERANCE}
