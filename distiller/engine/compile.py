"""``torch.compile`` for the training step: the student and teacher networks, compiled in place.

Why in place (:meth:`torch.nn.Module.compile`) rather than ``torch.compile(module)``: the
wrapper that ``torch.compile`` returns prefixes every ``state_dict`` key with ``_orig_mod.``
(our checkpoints would stop loading into plain models, and the older frameworks' files
into ours), and the engine tells networks apart by identity (``model is self.student``).
``Module.compile`` keeps the module, its parameter names and its hooks; only its
``__call__`` runs through the compiled graph.

Feature hooks: :class:`distiller.features.FeatureHooks` registers forward (pre-)hooks on
submodules that store tensors in a Python dict. Dynamo traces submodule hooks inline and
replays the dict stores after the graph, with the tapped tensors as extra graph outputs,
so the features keep their values and gradients flow back through them into the compiled
backward (``tests/test_fast_path.py`` checks compiled == eager with features in the loss).
Dynamo does not guard on module hooks by default (``skip_nnmodule_hook_guards``), and
compiled graphs are shared by all instances of a module class: a second network of the
same class and structure (teacher and student of one architecture, or a second Trainer
in the same process) but with other hooks would silently reuse a graph that does not
fire them, and its features would come back empty. :func:`compile_module` therefore turns
hook guards on; they cost a few dict checks per call.

What is compiled: the networks, where the time goes. The objective (CE, KD, method
terms) stays eager: its ops are small, and several methods keep Python-side state or
data-dependent control flow (CRD's normaliser flag, the memory-bank update) that would
only add graph breaks and recompiles.

Shapes are static (``dynamic=False``): one graph per distinct input (train batch, the
last partial batch of an epoch, the eval batch, train vs eval mode), a handful per run,
and static graphs get the best kernels.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import nn

from common.errors import UserError
from distiller.engine.runtime import Runtime

# Marks a module this helper compiled, so a second call (engine + benchmark) is a no-op.
_MARK = "_distiller_compiled"


def is_compiled(module: nn.Module | None) -> bool:
    """True when ``module`` runs through a compiled ``__call__`` (``Module.compile`` was applied)."""
    return module is not None and getattr(module, "_compiled_call_impl", None) is not None


def _check_cpu_compiler() -> None:
    """TorchInductor generates C++ for CPU kernels; fail in one line before the first step if it cannot."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise UserError("trainer.compile=true on the CPU needs a C++ compiler (g++ or clang++) for "
                        "TorchInductor; install one, or set trainer.compile=false")


def compile_module(module: nn.Module, *, device_type: str = "cuda", backend: str = "inductor",
                   mode: str | None = None, dynamic: bool | None = False) -> nn.Module:
    """Compile ``module`` in place (idempotent) and return it.

    ``backend`` / ``mode`` / ``dynamic`` go to :func:`torch.compile`; ``backend="aot_eager"``
    traces and differentiates exactly like inductor but runs the captured graph eagerly
    (what the fast tests use: it checks capture without minutes of C++ compilation).
    """
    if getattr(module, _MARK, False):
        return module
    if backend == "inductor" and device_type == "cpu":
        _check_cpu_compiler()
    # Guard on hooks: graphs are shared across instances of a class, and hooks decide the features read.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    module.compile(**options)
    setattr(module, _MARK, True)
    return module


def compile_networks(runtime: Runtime, *modules: nn.Module | None, backend: str = "inductor",
                     mode: str | None = None) -> None:
    """Compile each given network in place when ``runtime.compile`` is set (``None`` entries are skipped).

    Call after the feature hooks are registered and after shape probing (a probe of a
    compiled network would compile a throw-away graph for its dummy batch).
    """
    if not runtime.compile:
        return
    for module in modules:
        if module is not None:
            compile_module(module, device_type=runtime.device.type, backend=backend, mode=mode)
