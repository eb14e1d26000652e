"""The live ``ShardedAdamW`` instances, so that code outside an optimizer (torch's gradient
clipping, DDP's constructor) can find the optimizer that owns a parameter, and the checks that
need to look beyond one optimizer.

Weak references only: the registry never keeps an optimizer alive. Integrations at the edge
(``ddp.py``) subscribe to ``on_optimizer_built``; the core never imports them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

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
    return list(_optimizers)


def owners(params: Iterable[torch.Tensor]) -> dict[int, ShardedAdamW | None]:
    """``id(p) -> the ShardedAdamW that optimizes p`` (``None`` for a parameter none owns)."""
    opts = live_optimizers()
    out: dict[int, ShardedAdamW | None] = {}
    for p in params:
        out[id(p)] = next((o for o in opts if o.owns(p)), None)
    return out


def check_late_process_group(opt: ShardedAdamW) -> None:
    """Raise if ``opt`` resolved to a single process but a process group of several ranks
    exists now: every rank would silently train its own copy of the model."""
    if opt.comm.distributed or not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if world > 1:
        raise RuntimeError(
            "ShardedAdamW was built before torch.distributed.init_process_group(), so it "
            f"runs on this process alone, but a process group of {world} ranks exists now "
            f"(this is rank {dist.get_rank()}): every rank would train its own model. Build "
            "the optimizer after init_process_group() (to optimize each rank's model on its "
            "own on purpose, pass process_group=dist.new_group([rank]) for each rank)"
        )
