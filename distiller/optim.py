"""The optimizers a run can use, by config name (``optim.name``), and DOT.

:data:`OPTIMIZERS` maps a name to a factory ``factory(params, lr, optim, device)``. An optimizer
that defines ``step_kd()`` gets the distillation and the task gradients apart
(:class:`distiller.engine.step.SplitGradientOptimizer`). A factory registered with ``options=(...)`` reads
those keys of the ``optim`` node beyond the common ones (DOT's ``delta``); another optimizer's keys must
stay null (the config's validation refuses them: :func:`distiller.config.key_scope.option_error`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from common.errors import UserError
from common.registry import Registry

__all__ = ["OPTIMIZERS", "DOT", "sgd", "dot", "make_optimizer", "check_optimizer"]

OptimizerFactory = Callable[[list[nn.Parameter], float, Any, torch.device], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
"""Optimizers by config name (``optim.name``): ``factory(params, lr, optim, device)``, ``optim`` the typed
``optim`` config node. An optimizer that defines ``step_kd()`` receives split task / distillation gradients
(see :mod:`distiller.engine.step`)."""


class DOT(torch.optim.Optimizer):
    """DOT: A Distillation-Oriented Trainer (Zhao et al., ICCV 2023).

    SGD with two momentum buffers per parameter: the task loss's gradient is averaged with the
    momentum ``momentum - delta``, the distillation loss's with ``momentum + delta``, so the
    distillation direction is followed more steadily. Per iteration::

        opt.zero_grad(set_to_none=True); loss_dist.backward(retain_graph=True)
        opt.step_kd()    # records every parameter's .grad as its distillation gradient
        opt.zero_grad(set_to_none=True); loss_task.backward()
        opt.step()       # .grad is the task gradient; updates with both, forgets the recorded ones

    With ``g_t`` the task and ``g_d`` the distillation gradient, ``wd`` the group's weight decay
    and ``lr`` its learning rate, a parameter that received

    * both: ``v_t <- (momentum - delta) v_t + g_t + wd θ``; ``v_d <- (momentum + delta) v_d + g_d``;
      ``θ <- θ - lr v_t - lr v_d`` (weight decay enters once, through the task branch);
    * only ``g_t``: ``v_t <- momentum v_t + g_t + wd θ``; ``θ <- θ - lr v_t``;
    * only ``g_d`` (a method's helpers): ``v_d <- momentum v_d + g_d + wd θ``; ``θ <- θ - lr v_d``;
    * neither: nothing changes, buffers included.

    A buffer starts at its first (decayed) gradient, as in :class:`torch.optim.SGD`; no dampening,
    no Nesterov; the task update comes first, the distillation update second. Unlike the authors'
    code, which leaves out ``wd θ`` on the very first step of a distillation-only parameter (its
    buffer starts at the raw gradient), weight decay applies from the first step in every case.

    The buffers are the state keys ``momentum_buffer`` (task) and ``momentum_kd_buffer``
    (distillation), saved by :meth:`state_dict`. Each parameter group may set its own ``lr``,
    ``momentum``, ``delta`` and ``weight_decay``; schedulers set ``group["lr"]``. Without a
    ``step_kd()`` before it, :meth:`step` is SGD with momentum ``momentum`` on ``.grad``.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 5e-4) -> None:
        defaults = {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay}
        self._check(defaults)
        super().__init__(params, defaults)
        self._dist_grads: dict[torch.Tensor, torch.Tensor] = {}

    @staticmethod
    def _check(group: Mapping[str, Any]) -> None:
        if not group["lr"] >= 0:
            raise ValueError(f"invalid learning rate: {group['lr']}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"invalid weight_decay: {group['weight_decay']}")
        if not 0 <= group["delta"] <= group["momentum"]:
            # the task momentum, momentum - delta, must not be negative
            raise ValueError(f"delta={group['delta']} must be between 0 and momentum={group['momentum']}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check(self.param_groups[-1])

    @torch.no_grad()
    def step_kd(self) -> None:
        """Record every parameter's current ``.grad`` as its distillation gradient; nothing is updated."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("DOT does not support sparse gradients")
                    # a copy: zero_grad(set_to_none=False) or DDP's bucket views would overwrite it
                    self._dist_grads[p] = p.grad.detach().clone()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update with ``.grad`` as the task gradient and the gradients :meth:`step_kd` recorded."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dist_grads, self._dist_grads = self._dist_grads, {}
        for group in self.param_groups:
            lr, wd, momentum, delta = group["lr"], group["weight_decay"], group["momentum"], group["delta"]
            for p in group["params"]:
                g_task, g_dist = p.grad, dist_grads.get(p)
                if g_task is None and g_dist is None:
                    continue
                if g_task is not None and g_task.is_sparse:
                    raise RuntimeError("DOT does not support sparse gradients")
                state = self.state[p]
                both = g_task is not None and g_dist is not None
                if g_task is not None:
                    d_p = g_task.add(p, alpha=wd) if wd != 0 else g_task
                    buf = _accumulate(state, "momentum_buffer", d_p, momentum - delta if both else momentum)
                    p.add_(buf, alpha=-lr)
                if g_dist is not None:
                    d_p = g_dist.add(p, alpha=wd) if wd != 0 and not both else g_dist
                    buf = _accumulate(state, "momentum_kd_buffer", d_p, momentum + delta if both else momentum)
                    p.add_(buf, alpha=-lr)
        return loss


def _accumulate(state: dict[str, Any], key: str, d_p: torch.Tensor, mu: float) -> torch.Tensor:
    """``state[key] <- mu * state[key] + d_p``; a new buffer starts at ``d_p`` itself."""
    buf = state.get(key)
    if buf is None:
        buf = state[key] = torch.clone(d_p).detach()
    else:
        buf.mul_(mu).add_(d_p)
    return buf


@OPTIMIZERS.register("sgd")
def sgd(params: list[nn.Parameter], lr: float, optim: Any, device: torch.device) -> torch.optim.SGD:
    """SGD with the fused kernel on CUDA and the foreach kernel elsewhere (or as configured)."""
    impl = optim.implementation
    if impl == "auto" or impl == "fused" and device.type != "cuda":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs: dict[str, Any] = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           nesterov=optim.nesterov, **kwargs)


@OPTIMIZERS.register("dot", options=("delta",))
def dot(params: list[nn.Parameter], lr: float, optim: Any, device: torch.device) -> DOT:
    """DOT with the task momentum ``optim.momentum - optim.delta`` and the distillation one ``+ delta``."""
    if optim.nesterov:
        raise UserError("optim.nesterov=true is not available with optim=dot (DOT has no Nesterov momentum); "
                        "use optim.nesterov=false")
    if optim.implementation not in ("auto", "loop"):
        raise UserError(f"optim.implementation={optim.implementation} is not available with optim=dot; "
                        "use auto or loop")
    delta = 0.075 if optim.delta is None else optim.delta
    if delta > optim.momentum:
        raise UserError(f"optim.delta={delta} must be <= optim.momentum={optim.momentum} "
                        "(the task momentum is momentum - delta)")
    return DOT(params, lr=lr, momentum=optim.momentum, delta=delta, weight_decay=optim.weight_decay)


def make_optimizer(params: list[nn.Parameter], lr: float, optim: Any, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names (the typed ``optim`` config node), over ``params`` at ``lr``."""
    return OPTIMIZERS.get(optim.name)(params, lr, optim, device)


def check_optimizer(optim: Any, device: torch.device) -> None:
    """Fail now, in one line, on an optimizer option that would fail when the first phase starts: whatever
    the factory refuses, found by building it over one probe parameter (a key of another optimizer, e.g.
    ``optim.delta`` with SGD, was refused when the config was validated)."""
    make_optimizer([nn.Parameter(torch.zeros(1, device=device))], float(optim.lr), optim, device)
