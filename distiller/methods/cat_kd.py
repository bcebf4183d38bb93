"""Class Attention Transfer Based Knowledge Distillation (CAT-KD; Guo et al., CVPR 2023)."""
from __future__ import annotations

import logging

import torch

from datasets.batch import Batch
from distiller import functional as F
from distiller.features import CLASSIFIER, POOL_INPUT, Features, classifier_of
from distiller.methods.base import METHODS, BuildContext, DistillMethod, TermContext, check_classifier_on_map
from distiller.methods.key_types import Count

log = logging.getLogger("distiller")


@METHODS.register("cat_kd")
class CATKD(DistillMethod):
    """Class Attention Transfer Based Knowledge Distillation (Guo et al., CVPR 2023).

    One term, ``cat_kd``: :func:`distiller.functional.cat_kd` of the two networks' class activation
    maps (:func:`distiller.functional.class_activation_maps`: each network's classifier weight applied
    to its pre-pool map, no bias), pooled to ``cam_resolution`` x ``cam_resolution`` and, with
    ``cam_normalize``, L2-normalised per (sample, class). Unweighted: the config's ``beta`` is the
    authors' ``CAT_loss_weight`` (per pair); CE 1, no KD term, no warm-up. The student's classifier
    receives gradient through its CAMs.

    ``cam_student_no_bias``: the authors' students have a classifier without bias (a 1x1 conv before the
    pool). Ours keep their Linear with bias by default (the CAM uses the weight only, so the term is the
    same; only the student's logits differ by the bias). With ``true`` the student's classifier bias
    is set to zero and frozen (left out of the optimizer), which is the authors' bias-free classifier
    while the checkpoint keeps the model's usual layout.
    """

    student_features = frozenset({POOL_INPUT, CLASSIFIER})
    teacher_features = frozenset({POOL_INPUT, CLASSIFIER})

    def __init__(self, cam_resolution: Count = 2, cam_normalize: bool = False,
                 cam_student_no_bias: bool = False) -> None:
        super().__init__()
        self.cam_resolution, self.cam_normalize = int(cam_resolution), bool(cam_normalize)
        self.cam_student_no_bias = bool(cam_student_no_bias)

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        for role, f in (("student", student), ("teacher", teacher)):
            check_classifier_on_map("cat_kd", role, f)
        if self.cam_student_no_bias:
            bias = classifier_of(ctx.student).bias
            if bias is not None:
                with torch.no_grad():
                    bias.zero_()
                bias.requires_grad_(False)  # the main phase trains only what requires gradient
                log.info("cat_kd: the student's classifier bias is zero and frozen (cam_student_no_bias=true)")

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor], batch: Batch,
                ctx: TermContext) -> dict[str, torch.Tensor]:
        cam_s = F.class_activation_maps(student.pool_input, student.classifier[0])
        cam_t = F.class_activation_maps(teacher.pool_input, teacher.classifier[0])
        return {"cat_kd": F.cat_kd(cam_s, cam_t, resolution=self.cam_resolution, normalize=self.cam_normalize)}

    def extra_repr(self) -> str:
        return (f"resolution={self.cam_resolution}, normalize={self.cam_normalize}, "
                f"student_no_bias={self.cam_student_no_bias}")
