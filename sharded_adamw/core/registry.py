"""The live ``ShardedAdamW`` instances, so that code outside an optimizer (torch's gradient
clipping, DDP's constructor) can find the optimizer that owns a parameter, and the checks that
need to look beyond one optimizer.

Weak references only: the registry never keeps an optimizer alive. The integrations subscribe
to ``on_optimizer_built`` (``sharded_adamw/__init__.py`` adds ``integrations/install.py``'s
callback, which installs them at the first construction); the core never imports them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .optimizer import ShardedAdamW

_optimizers: weakref.WeakSet = weakref.WeakSet()
on_optimizer_built: list[Callable[[ShardedAdamW], None]] = []


def optimizer_built(opt: ShardedAdamW) -> None:
    """Record ``opt`` and tell the subscribed integrations (end of its construction)."""
    _optimizers.add(opt)
    for callback in on_optimizer_built:
        callback(opt)


def live_optimizers() -> list[ShardedAdamW]:
    """The ``ShardedAdamW`` instances alive now."""
    return list(_optimizers)


def sharding_grads() -> list[ShardedAdamW]:
    """The live optimizers whose averaged gradient lives in their shards (not ``p.grad``:
    all but those built with ``full_grads``)."""
    return [o for o in live_optimizers() if not o.full_grads]


def owners(params: Iterable[torch.Tensor]) -> dict[int, ShardedAdamW | None]:
    """``id(p) -> the ShardedAdamW whose shards hold p's averaged gradient`` (``None`` where
    none does: not optimized by one, or by one with ``full_grads``, where ``p.grad`` holds
    it and torch's own functions apply)."""
    opts = sharding_grads()
    out: dict[int, ShardedAdamW | None] = {}
    for p in params:
        out[id(p)] = next((o for o in opts if o.owns(p)), None)
    return out
