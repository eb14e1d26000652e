"""Automatic ``attach()``: a DDP model and a ``ShardedAdamW`` over its parameters find each other.

A standalone ``ShardedAdamW`` over the parameters of a DDP model would reduce-scatter what DDP
has already all-reduced: twice the communication, no ZeRO-2 saving, and the average taken
twice. ``watch_ddp()`` (run on import) therefore records every DDP model built after
``import sharded_adamw`` and pairs it with the optimizer in either order: when the optimizer
optimizes exactly the model's trainable parameters it is attached at once (DDP built before the
optimizer: at the optimizer's construction; after it, as nanoGPT-style scripts do: at the end of
DDP's constructor, before any backward); when they only overlap, or the model already has a
comm hook, a warning names the fix. A DDP built before ``import sharded_adamw`` is not seen.
"""

import logging
import warnings
import weakref
from typing import TYPE_CHECKING

from torch.nn.parallel import DistributedDataParallel

from ..core import registry

if TYPE_CHECKING:
    from ..core.optimizer import ShardedAdamW

logger = logging.getLogger("sharded_adamw")
_models: weakref.WeakSet = weakref.WeakSet()


def _pair(opt: "ShardedAdamW", model: DistributedDataParallel) -> None:
    """Attach ``opt`` to ``model`` if it optimizes exactly the model's trainable parameters;
    warn if they only overlap (or the attach is refused)."""
    if opt.attached_model is not None or getattr(opt, "_ddp_warned", False):
        return
    opt.build_deferred()
    trainable = {id(p) for p in model.parameters() if p.requires_grad and p.numel() > 0}
    mine = {id(p) for p in opt.owned_params()}
    if not trainable & mine:
        return
    if trainable == mine:
        try:
            opt.attach(model)
            logger.info(
                "ShardedAdamW: attached to the DistributedDataParallel model over its "
                "parameters (%d tensors)",
                len(mine),
            )
            return
        except (RuntimeError, ValueError) as e:
            reason = f"attaching it automatically failed: {e}"
    else:
        reason = (
            f"the optimizer has {len(mine)} parameter tensors, the model "
            f"{len(trainable)} trainable ones, {len(trainable & mine)} shared"
        )
    opt._ddp_warned = True
    warnings.warn(
        "ShardedAdamW: parameters of this optimizer are also reduced by a "
        "DistributedDataParallel model it is not attached to, so every gradient is reduced "
        "twice (DDP's all-reduce, then the optimizer's reduce-scatter) and ZeRO-2 saves "
        f"nothing; {reason}. Fix: opt.attach(ddp_model) with one ShardedAdamW over all of the "
        "model's trainable parameters, or do not wrap the model in DDP",
        stacklevel=3,
    )


def _on_optimizer_built(opt: "ShardedAdamW") -> None:
    """A DDP model built before the optimizer: find it among the recorded ones."""
    models = [m for m in list(_models) if opt.attached_model is None]
    exact = [
        m
        for m in models
        if {id(p) for p in m.parameters() if p.requires_grad and p.numel() > 0}
        == {id(p) for p in opt.owned_params()}
    ]
    if len(exact) > 1:  # two live wrappers of one model: which one trains is not ours to guess
        warnings.warn(
            f"ShardedAdamW: {len(exact)} DistributedDataParallel models wrap this optimizer's "
            "parameters; call opt.attach(ddp_model) on the one you train",
            stacklevel=4,
        )
        opt._ddp_warned = True
        return
    for model in models:
        _pair(opt, model)


def watch_ddp() -> None:
    """Record every DDP model built from now on and pair it with the live optimizers
    (idempotent)."""
    if getattr(DistributedDataParallel.__init__, "_sharded_adamw", False):
        return
    init = DistributedDataParallel.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _models.add(self)
        for opt in registry.live_optimizers():
            _pair(opt, self)

    recording_init._sharded_adamw = True
    DistributedDataParallel.__init__ = recording_init
    if _on_optimizer_built not in registry.on_optimizer_built:
        registry.on_optimizer_built.append(_on_optimizer_built)
