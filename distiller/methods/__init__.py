"""Distillation methods: one module per method, each registers itself in :data:`METHODS` on import.

Importing this package imports every method module, so ``METHODS.get(name)`` knows
them all. Adding a method is adding one file and one import below.
"""
from __future__ import annotations

from distiller.methods.base import METHODS, BuildContext, DistillMethod, Features, Phase, Taps

# --- single-stage methods: logits, embeddings, stage features --------------------------------
from distiller.methods import kd, fitnet, at, sp, cc, vid, rkd, pkt, nst, crd, dkd  # noqa: E402,F401

# --- two-stage and connector methods (ab, ft, fsp, ofd, reviewkd, kdsvd): add imports here -----
from distiller.methods import ab, ft, fsp, ofd, reviewkd, kdsvd  # noqa: E402,F401

__all__ = ["METHODS", "BuildContext", "DistillMethod", "Features", "Phase", "Taps"]
