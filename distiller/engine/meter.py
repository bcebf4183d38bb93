"""Running sums of one epoch on the training device, with NaN/Inf detection and no host syncs.

The step loop adds each step's loss, terms and hits to device tensors; the host reads
them only at log intervals, checkpoints and the epoch's end. The first step whose loss
or a term is not finite is remembered, with the terms that were, so the run can stop
naming them.
"""
from __future__ import annotations

from typing import Any

import torch

from common.errors import UserError


class NonFiniteLossError(UserError):
    """A loss term (or gradient) became NaN/Inf; the last good checkpoint is kept."""


class Meter:
    """Sums of ``loss``, ``correct``, ``count`` and every named term, plus the first non-finite step."""

    def __init__(self, device: torch.device, check_finite: bool = True,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self.device, self.check_finite = device, check_finite
        zero = lambda: torch.zeros((), device=device, dtype=torch.float64)
        self.sums: dict[str, torch.Tensor] = state or {
            "loss": zero(), "correct": zero(), "count": zero(),
            "nonfinite_step": torch.full((), -1, device=device, dtype=torch.int64)}
        self.term_names = [k[len("term/"):] for k in self.sums if k.startswith("term/")]

    def add(self, step: int, total: torch.Tensor, terms: dict[str, torch.Tensor], n: int,
            logits: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Account one step of ``n`` samples (all on the device)."""
        acc = self.sums
        if not self.term_names:
            self.term_names = list(terms)
            for name in self.term_names:
                acc[f"term/{name}"] = torch.zeros((), device=self.device, dtype=torch.float64)
            acc["nonfinite_terms"] = torch.zeros(len(self.term_names) + 1, device=self.device, dtype=torch.bool)
        acc["loss"] += total.detach().double() * n
        acc["count"] += n
        if logits is not None:
            acc["correct"] += (logits.detach().argmax(1) == labels).sum()
        values = [terms[name].detach().float() for name in self.term_names]
        for name, value in zip(self.term_names, values):
            acc[f"term/{name}"] += value.double() * n
        if self.check_finite:
            finite = torch.isfinite(torch.stack(values + [total.detach().float()]))
            first_bad = (acc["nonfinite_step"] < 0) & ~finite.all()
            acc["nonfinite_step"] = torch.where(first_bad, step, acc["nonfinite_step"])
            acc["nonfinite_terms"] = torch.where(first_bad, ~finite, acc["nonfinite_terms"])

    def shown(self, with_accuracy: bool, with_terms: bool = False) -> dict[str, float]:
        """Mean loss (train accuracy, each term as ``loss_<term>``) so far: a host sync, for the bar and logs."""
        terms = self.term_names if with_terms else []
        values = torch.stack([self.sums[k] for k in ("count", "loss", "correct", *(f"term/{n}" for n in terms))])
        count, loss, correct, *term_sums = values.tolist()  # one transfer
        count = max(count, 1.0)
        shown = {"loss": loss / count}
        if with_accuracy:
            shown["acc"] = 100.0 * correct / count
        shown.update({f"loss_{n}": value / count for n, value in zip(terms, term_sums)})
        return shown

    def first_nonfinite(self) -> tuple[int, str] | None:
        """``(step, first bad term)`` of the first non-finite step, or None."""
        if not self.check_finite:
            return None
        bad_step = int(self.sums["nonfinite_step"].item())
        if bad_step < 0:
            return None
        flags = self.sums["nonfinite_terms"].tolist()
        names = [n for n, bad in zip(self.term_names + ["total"], flags) if bad] or ["total"]
        return bad_step, names[0]

    def totals(self, reduce: Any) -> tuple[float, float, float, dict[str, float]]:
        """(loss sum, correct, count, term sums) after ``reduce`` (an all-reduce over ranks)."""
        acc = self.sums
        sums = torch.stack([acc["loss"], acc["correct"], acc["count"]] + [acc[f"term/{n}"] for n in self.term_names])
        values = reduce(sums.clone()).tolist()
        return values[0], values[1], values[2], dict(zip(self.term_names, values[3:]))

    def state(self, reduce: Any = None) -> dict[str, torch.Tensor]:
        """What a mid-epoch checkpoint keeps (on the CPU). ``reduce`` (an all-reduce over ranks, called by every
        rank) pools the sums of all ranks, so rank 0's checkpoint holds the whole epoch so far: resumed, rank 0
        continues from them and the other ranks from zero, and the epoch's totals are the uninterrupted run's."""
        pooled = {k: reduce(v.detach().clone()) if reduce is not None and v.is_floating_point() else v.detach()
                  for k, v in self.sums.items()}
        return {k: v.cpu() for k, v in pooled.items()}
