"""timm's adaptive gradient clipping (AGC) on the sharded gradient.

``timm.utils.adaptive_clip_grad(parameters, clip_factor, eps, norm_type)`` (and
``dispatch_clip_grad(..., mode="agc")``, which timm's ``train.py --clip-mode agc`` calls)
rescales each parameter's gradient, per output row, to at most ``clip_factor`` times the
row's weight norm. It reads and writes ``p.grad``, which after a reduce-scatter is None or
this rank's unreduced gradient: AGC would do nothing, in silence. ``install.py`` routes it
here, by the same mechanism as torch's clipping functions, once timm is imported: for the
parameters of a ``ShardedAdamW`` the row norms of the averaged gradient come from the shards
(``ShardedAdamW.grad_norms(..., unitwise=True)``, one small all-reduce), the weight norms
from the parameters (whole on every rank), and each rank scales the rows it owns
(``scale_grads_``). Other parameters go to timm's own function. AGC is per parameter, so a
subset of an optimizer's parameters (timm leaves out the classifier head) is fine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

from ..core.registry import owners

MODULES = ("timm.utils.agc", "timm.utils.clip_grad", "timm.utils")
"""Where timm binds ``adaptive_clip_grad`` (``dispatch_clip_grad`` looks it up in
``timm.utils.clip_grad`` when called)."""


def _row_norms(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The norm of ``t`` per output row (``ndim > 1``), or of the whole (``ndim <= 1``)."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t, norm_type)
    return torch.linalg.vector_norm(t, norm_type, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def sharded_agc(
    opt, params: list[torch.Tensor], clip_factor: float, eps: float, norm_type: float
) -> None:
    """AGC on ``opt``'s sharded gradient of ``params``: rows whose gradient norm exceeds
    ``clip_factor * max(weight norm, eps)`` are scaled down to it. Collective."""
    opt.sync_params()
    limits = [_row_norms(p.detach(), norm_type).clamp_(min=eps).mul_(clip_factor) for p in params]
    norms = opt.grad_norms(params, norm_type, unitwise=True)
    factors = [
        torch.where(g < m.to(g.dtype), torch.ones_like(g), m.to(g.dtype) / g.clamp(min=1e-6))
        for g, m in zip(norms, limits)
    ]
    opt.scale_grads_(params, factors)


def route_adaptive_clip_grad(original: Callable) -> Callable:
    """``original`` (timm's ``adaptive_clip_grad``) routed: the parameters of each
    ``ShardedAdamW`` are clipped on its shards, the others by ``original``."""

    @functools.wraps(original)
    def adaptive_clip_grad(
        parameters: Iterable[torch.Tensor] | torch.Tensor,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        norm_type: float = 2.0,
    ) -> None:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        own = owners(params)
        if all(o is None for o in own.values()):
            return original(params, clip_factor, eps, norm_type)
        opts = {id(o): o for o in own.values() if o is not None}
        for key, opt in opts.items():
            mine = [p for p in params if own[id(p)] is not None and id(own[id(p)]) == key]
            sharded_agc(opt, mine, clip_factor, eps, float(norm_type))
        rest = [p for p in params if own[id(p)] is None]
        if rest:
            original(rest, clip_factor, eps, norm_type)
        return None

    return adaptive_clip_grad
