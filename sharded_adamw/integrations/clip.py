"""Gradient clipping on the sharded gradient, and torch's clipping functions routed to it.

After the reduce-scatter the averaged gradient lives only in each ``ShardedAdamW``'s gradient
shards: standalone, ``p.grad`` is ``None`` (ZeRO-2); attached to DDP, ``p.grad`` holds this
rank's local, unreduced gradient. ``torch.nn.utils.clip_grad_norm_`` on ``p.grad`` would then
clip nothing, or clip the wrong tensor with a norm that differs per rank, in silence.

So torch's functions are wrapped where callers reach them (``torch.nn.utils.X`` and
``torch.nn.utils.clip_grad.X``, which is what scripts, Lightning's precision plugin and
accelerate call), by ``install.py`` when the first ``ShardedAdamW`` is built. When the given
parameters belong to a ``ShardedAdamW`` the call is computed on its shards, with torch's
formulas, and returns what torch returns (the global norm, the same on every rank); otherwise
torch's own function runs unchanged.

- ``clip_grad_norm_`` / ``clip_grads_with_norm_``: a norm over all shards (one all-reduce of a
  scalar) and the same ``clamp(max_norm / (norm + 1e-6), max=1)`` scaling of what each rank owns.
- ``clip_grad_value_``: an elementwise clamp, exact on shards.
- ``get_total_norm(grads)`` takes gradients, not parameters: routed when every given tensor is
  the ``.grad`` of a parameter of one ``ShardedAdamW``. After a synchronising backward
  ``p.grad`` is ``None`` and the caller passes nothing, which cannot be told apart from no
  gradient; the ``clip_grads_with_norm_`` that follows then raises, naming the fix
  (``clip_grad_norm_``, routed, or ``opt.clip_grad_norm_``), instead of clipping nothing.

Errors instead of a wrong answer: parameters of a ``ShardedAdamW`` mixed with parameters that
have gradients and are not its own (or another optimizer's), or only some of its parameters.

Not detectable: code that reads or scales ``p.grad`` by hand, and a reference taken with
``from torch.nn.utils import clip_grad_norm_`` before the first ``ShardedAdamW`` was built
(or with the routing turned off, see ``install.py``). Use ``opt.clip_grad_norm_`` there.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from ..core.clipping import clamp_values, scale_by_norm, total_norm
from ..core.registry import owners, sharding_grads

if TYPE_CHECKING:
    from ..core.optimizer import ShardedAdamW


def _owner(parameters: Iterable[torch.Tensor] | torch.Tensor, what: str) -> ShardedAdamW | None:
    """The one ``ShardedAdamW`` that owns the given parameters, or ``None`` if none owns any;
    raises where routing would clip only part of the gradient."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    own = owners(params)
    found = {id(o): o for o in own.values() if o is not None}
    if not found:
        return None
    if len(found) > 1:
        raise RuntimeError(
            f"torch.nn.utils.{what} was given parameters of {len(found)} different "
            "ShardedAdamW optimizers; their gradients live in separate shards: call "
            "opt.clip_grad_norm_(...) on each optimizer (or build one optimizer)"
        )
    opt = next(iter(found.values()))
    foreign = [p for p in params if own[id(p)] is None and p.grad is not None]
    if foreign:
        p = foreign[0]
        raise RuntimeError(
            f"torch.nn.utils.{what} was given parameters of a ShardedAdamW together with "
            f"{len(foreign)} parameter(s) it does not optimize (first: shape {tuple(p.shape)}); "
            "the sharded gradient cannot be clipped jointly with plain p.grad: clip each set "
            "separately (opt.clip_grad_norm_ for the ShardedAdamW's)"
        )
    given = {id(p) for p in params}
    missing = [p for p in opt.owned_params() if id(p) not in given]
    if missing:
        raise RuntimeError(
            f"torch.nn.utils.{what} was given only some of a ShardedAdamW's parameters "
            f"({opt.param_name(missing[0])} is missing); the sharded clip covers all of them: pass "
            "all of the optimizer's parameters, or call opt.clip_grad_norm_(...)"
        )
    return opt


def _route_clip_grad_norm_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grad_norm_(
        parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None
    ) -> torch.Tensor:
        generator = isinstance(parameters, types.GeneratorType)
        if isinstance(parameters, Iterable) and not isinstance(parameters, torch.Tensor):
            parameters = list(parameters)
        opt = _owner(parameters, "clip_grad_norm_")
        if opt is None:
            if generator and not parameters:  # torch's warning, which the list() would hide
                warnings.warn(
                    "`parameters` is an empty generator, no gradient clipping will occur.",
                    stacklevel=2,
                )
            return original(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
        norm = total_norm(opt, norm_type, error_if_nonfinite)
        scale_by_norm(opt, float(max_norm), norm)
        return norm

    return clip_grad_norm_


def _route_clip_grads_with_norm_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None) -> None:
        if isinstance(parameters, Iterable) and not isinstance(parameters, torch.Tensor):
            parameters = list(parameters)
        opt = _owner(parameters, "clip_grads_with_norm_")
        if opt is None:
            return original(parameters, max_norm, total_norm, foreach)
        if not getattr(total_norm, "_sharded_adamw_norm", False):
            raise RuntimeError(
                "torch.nn.utils.clip_grads_with_norm_ was given a ShardedAdamW's parameters "
                "with a norm that was not computed from its sharded gradient (after backward "
                "p.grad is None, so get_total_norm([p.grad ...]) sees no gradient and returns "
                "0): use torch.nn.utils.clip_grad_norm_(parameters, max_norm) or "
                "opt.clip_grad_norm_(max_norm), which compute the norm over the shards"
            )
        scale_by_norm(opt, float(max_norm), total_norm)

    return clip_grads_with_norm_


def _route_clip_grad_value_(original: Callable) -> Callable:
    @functools.wraps(original)
    def clip_grad_value_(parameters, clip_value, foreach=None) -> None:
        if isinstance(parameters, Iterable) and not isinstance(parameters, torch.Tensor):
            parameters = list(parameters)
        opt = _owner(parameters, "clip_grad_value_")
        if opt is None:
            return original(parameters, clip_value, foreach)
        clamp_values(opt, clip_value)

    return clip_grad_value_


def _route_get_total_norm(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
        if isinstance(tensors, Iterable) and not isinstance(tensors, torch.Tensor):
            tensors = list(tensors)
        given = [tensors] if isinstance(tensors, torch.Tensor) else tensors
        grad_of = {
            id(p.grad): p for o in sharding_grads() for p in o.owned_params() if p.grad is not None
        }
        params = [grad_of[id(t)] for t in given if id(t) in grad_of]
        if not params:
            return original(tensors, norm_type, error_if_nonfinite, foreach)
        if len(params) != len(given):
            raise RuntimeError(
                "torch.nn.utils.get_total_norm was given gradients of a ShardedAdamW's "
                "parameters (local, unreduced) mixed with other tensors; use "
                "opt.clip_grad_norm_(float('inf')) for the norm of the averaged gradient"
            )
        opt = _owner(params, "get_total_norm")
        return total_norm(opt, norm_type, error_if_nonfinite)

    return get_total_norm


ROUTES: dict[str, Callable[[Callable], Callable]] = {
    "clip_grad_norm_": _route_clip_grad_norm_,
    "clip_grads_with_norm_": _route_clip_grads_with_norm_,
    "clip_grad_value_": _route_clip_grad_value_,
    "get_total_norm": _route_get_total_norm,
}
"""Torch's public clipping functions and, for each, what wraps it (``route(torch_fn)`` is the
routed function). ``install.py`` applies them; torch's own ``clip_grad_norm_`` calls its
private helpers, which stay unwrapped, so calls that are not routed run torch's code."""


def routed(name: str) -> Callable:
    """Torch's clipping function ``name`` (a key of ``ROUTES``), routed, without setting it
    anywhere: for scripts that turned the install off (``install.py``)."""
    return ROUTES[name](getattr(torch.nn.utils, name))
