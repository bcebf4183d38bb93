"""Factor Transfer (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018).

A paraphraser, an autoencoder on the teacher's last stage, is first trained alone to
reconstruct that map (initialisation phase, default 30 epochs, MSE). Its encoder then
stays frozen and gives the teacher's "factor"; a translator on the student's last stage
learns to produce the same factor, compared with ``F.factor_transfer``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

from common.errors import UserError
from datasets.batch import Batch
from distiller import functional as F
from distiller.features import STAGES, Features
from distiller.methods.base import METHODS, BuildContext, DistillMethod, InitPhase, TermContext, init_phase
from distiller.methods.key_types import Epochs, Positive


def _conv_block(c_in: int, c_out: int, use_bn: bool, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = [conv(c_in, c_out, kernel_size=3, stride=1, padding=1)]
    if use_bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(0.1))
    return layers


class Paraphraser(nn.Module):
    """Autoencoder on the teacher map: three 3x3 convs down to ``k * C`` channels, three transposed convs back.

    RepDistiller's paraphraser has no BatchNorm (``use_bn=False``), its translator has.
    """

    def __init__(self, channels: int, k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        factor = max(1, int(channels * k))
        self.encoder = nn.Sequential(*_conv_block(channels, channels, use_bn),
                                     *_conv_block(channels, factor, use_bn),
                                     *_conv_block(factor, factor, use_bn))
        self.decoder = nn.Sequential(*_conv_block(factor, factor, use_bn, transposed=True),
                                     *_conv_block(factor, channels, use_bn, transposed=True),
                                     *_conv_block(channels, channels, use_bn, transposed=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` (what the initialisation phase trains)."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """Student-side encoder to the paraphraser's factor width (three 3x3 conv-BN-LeakyReLU)."""

    def __init__(self, s_channels: int, t_channels: int, k: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        factor = max(1, int(t_channels * k))
        self.encoder = nn.Sequential(*_conv_block(s_channels, s_channels, use_bn),
                                     *_conv_block(s_channels, factor, use_bn),
                                     *_conv_block(factor, factor, use_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@METHODS.register("ft", aliases=("factor",))
class FactorTransfer(DistillMethod):
    """Factor Transfer (Kim et al., NeurIPS 2018): match the student's translated factor to the teacher's.

    ``init_lr`` is the learning rate of the paraphraser phase. RepDistiller used 0.01 for
    ResNet/WRN students and the main learning rate otherwise (0.05 for VGG students,
    0.01 for MobileNetV2/ShuffleNets), so 0.01 is the published value for every table pair
    but the VGG-student ones; ``null`` means ``optim.lr``.
    Outside its initialisation phase the paraphraser is frozen (no gradient, eval mode).
    """

    student_features = frozenset({STAGES})
    teacher_features = frozenset({STAGES})

    def __init__(self, k: Positive = 0.5, p1: Positive = 2, p2: Positive = 1, init_epochs: Epochs = 30,
                 init_lr: Positive | None = 0.01, paraphraser_bn: bool = False) -> None:
        super().__init__()
        self.k = float(k)
        self.p1, self.p2 = p1, p2
        self.init_epochs = int(init_epochs)
        self.init_lr = init_lr
        self.paraphraser_bn = bool(paraphraser_bn)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def build(self, student: Features[torch.Size], teacher: Features[torch.Size], ctx: BuildContext) -> None:
        if not student.stages or not teacher.stages:
            raise UserError("ft needs stage features from both networks; one of them declares no stages")
        s_shape, t_shape = student.stages[-1], teacher.stages[-1]
        self.paraphraser = Paraphraser(int(t_shape[1]), self.k, self.paraphraser_bn)
        # Trained only by its own phase (the engine enables gradients for exactly a phase's
        # parameters), frozen otherwise, so it is never part of the main-phase optimizer.
        self.paraphraser.requires_grad_(False)
        self.translator = Translator(int(s_shape[1]), int(t_shape[1]), self.k)
        self.to(ctx.device)

    def _paraphraser_training(self) -> bool:
        return any(p.requires_grad for p in self.paraphraser.parameters())

    def train(self, mode: bool = True) -> FactorTransfer:
        super().train(mode)
        if self.paraphraser is not None and not self._paraphraser_training():
            self.paraphraser.eval()  # frozen: the same factor for a map in every step
        return self

    def reconstruction_loss(self, f_t: torch.Tensor) -> torch.Tensor:
        """MSE between the paraphraser's reconstruction and the teacher map (initialisation phase)."""
        return TF.mse_loss(self.paraphraser(f_t), f_t)

    def forward(self, student: Features[torch.Tensor], teacher: Features[torch.Tensor],
                batch: Batch, ctx: TermContext) -> dict[str, torch.Tensor]:
        if self.paraphraser.training and not self._paraphraser_training():
            self.paraphraser.eval()
        with torch.no_grad():  # the teacher's factor is a fixed target
            factor_t = self.paraphraser.encoder(teacher.stages[-1])
        factor_s = self.translator(student.stages[-1])
        return {"ft": F.factor_transfer(factor_s, factor_t, self.p1, self.p2)}

    def phases(self) -> list[InitPhase]:
        return init_phase(
            self.init_epochs, self.init_lr,
            parameters=lambda student: list(self.paraphraser.parameters()),
            loss=lambda s, t, batch: {"ft_rec": self.reconstruction_loss(t.stages[-1])},
            student_forward=False,  # the paraphraser only sees the teacher
        )
