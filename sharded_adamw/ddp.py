"""DDP integration: ``attach()`` swaps DDP's all-reduce for a reduce-scatter into the shards.

DDP keeps doing what it does well (bucketing in C++, ``no_sync``, unused-parameter detection,
the bucket rebuild after the first iteration); only the communication changes. The hook does
not depend on DDP's bucket layout: each DDP bucket is cut per parameter by the same chunking
rule as the optimizer's own buckets, so its reduce-scatter output is a list of per-parameter
chunks that are copied into the optimizer's gradient shards wherever they live.

After the hook, ``p.grad`` still holds this rank's local, unreduced gradient: only the
optimizer's shards hold the average (use ``ShardedAdamW.clip_grad_norm_``).

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

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel

from . import registry
from .collectives import completed_future
from .optimizer import ShardedAdamW

logger = logging.getLogger("sharded_adamw")
_models: weakref.WeakSet = weakref.WeakSet()


class _HookState:
    """The optimizer, and the routes from each DDP bucket to the optimizer's gradient shards
    (rebuilt when DDP rebuilds its buckets)."""

    def __init__(self, opt: ShardedAdamW):
        self.opt = opt
        self.routes: dict = {}

    def route(self, params: list[torch.Tensor]) -> tuple:
        key = tuple(id(p) for p in params)  # DDP rebuilds its buckets after iteration 1
        if key not in self.routes:
            dst, chunks, touched = [], [], []
            for p in params:
                bucket, i = self.opt._slot[p]
                dst.append(bucket.views(bucket.grad, i, owned_only=False))
                chunks.append(bucket.layout.slots[i].chunk)
                if bucket not in touched:
                    touched.append(bucket)
            self.routes[key] = (dst, chunks, touched, touched[0].reduce_dtype)
        return self.routes[key]


def _reduce_scatter_hook(
    state: _HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Launch the bucket's reduce-scatter and hand DDP its buffer back at once.

    DDP needs nothing from the reduction (the shards live in the optimizer), so the returned
    future is already complete and backward never waits for communication, on gloo (whose
    reduce-scatter has no future) as on NCCL. ``step()`` waits for the work and copies each
    parameter's chunk into the optimizer's gradient shards.
    """
    dst, chunks, touched, reduce_dtype = state.route(bucket.parameters())
    opt = state.opt
    buffer = bucket.buffer()
    out = torch.empty(sum(chunks), dtype=reduce_dtype, device=buffer.device)
    with record_function("sharded_adamw.reduce_scatter"):
        handle = opt._comm.reduce_scatter_grads(bucket.gradients(), out, reduce_dtype, True)

    def to_shards() -> None:
        torch._foreach_copy_(dst, list(out.split(chunks)))
        for b in touched:
            b.has_grad = True

    opt._pending.append(handle.and_then(to_shards))
    return completed_future(buffer)


def attach(opt: ShardedAdamW, model: torch.nn.Module) -> None:
    """Register the reduce-scatter comm hook on ``model``; see ``ShardedAdamW.attach``."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            "ShardedAdamW.attach() needs a torch.nn.parallel.DistributedDataParallel model, "
            f"got {type(model).__name__}"
        )
    if opt._ddp is model:
        return
    if opt._ddp is not None:
        raise RuntimeError("ShardedAdamW.attach(): this optimizer is already attached to a model")
    names = {p: n for n, p in model.module.named_parameters()}
    ignored = getattr(model, "parameters_to_ignore", set())
    trainable = [
        p
        for n, p in model.module.named_parameters()
        if p.requires_grad and n not in ignored and p.numel() > 0
    ]
    for p in trainable:
        if p not in opt._slot:
            raise ValueError(
                f"ShardedAdamW.attach(): DDP parameter {names[p]!r} (shape {tuple(p.shape)}) "
                "is not optimized by this ShardedAdamW; pass all of the model's trainable "
                "parameters to the optimizer"
            )
    mine = set(trainable)
    for p in opt._slot:
        if p not in mine:
            raise ValueError(
                f"ShardedAdamW.attach(): optimizer {opt._name(p)} is not a trainable "
                "parameter of this DDP model"
            )
    ddp_world = dist.get_world_size(model.process_group)
    if ddp_world != opt._comm.dp_size:
        raise ValueError(
            f"ShardedAdamW.attach(): DDP averages over {ddp_world} ranks but the optimizer's "
            f"process group has {opt._comm.dp_size}"
        )
    for p, n in names.items():
        opt._names.setdefault(p, n)
    for h in opt._hooks:
        h.remove()
    opt._hooks.clear()
    model.register_comm_hook(_HookState(opt), _reduce_scatter_hook)
    opt._ddp = model


def _pair(opt: ShardedAdamW, model: DistributedDataParallel) -> None:
    """Attach ``opt`` to ``model`` if it optimizes exactly the model's trainable parameters;
    warn if they only overlap (or the attach is refused)."""
    if opt._ddp is not None or getattr(opt, "_ddp_warned", False):
        return
    trainable = {id(p) for p in model.parameters() if p.requires_grad and p.numel() > 0}
    mine = {id(p) for p in opt._slot}
    if not trainable & mine:
        return
    if trainable == mine:
        try:
            attach(opt, model)
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


def _on_optimizer_built(opt: ShardedAdamW) -> None:
    """A DDP model built before the optimizer: find it among the recorded ones."""
    models = [m for m in list(_models) if opt._ddp is None]
    exact = [
        m
        for m in models
        if {id(p) for p in m.parameters() if p.requires_grad and p.numel() > 0}
        == {id(p) for p in opt._slot}
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
