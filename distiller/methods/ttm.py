"""Knowledge Distillation Based on Transformed Teacher Matching (Zheng and Yang, ICLR 2024): TTM."""
from __future__ import annotations

from typing import ClassVar

from distiller.methods.base import METHODS
from distiller.methods.wttm import WTTM


@METHODS.register("ttm")
class TTM(WTTM):
    """Knowledge Distillation Based on Transformed Teacher Matching (Zheng and Yang, ICLR 2024).

    WTTM without the per-sample weight: the mean KL between the power-transformed teacher
    and the student at temperature 1 (:func:`distiller.functional.wttm` with ``weighted=False``).
    Its term is logged as ``ttm``.
    """

    weighted: ClassVar[bool] = False
