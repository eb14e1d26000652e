"""DDP integration: ``attach()`` swaps DDP's all-reduce for a reduce-scatter into the shards.

DDP keeps doing what it does well (bucketing in C++, ``no_sync``, unused-parameter detection,
the bucket rebuild after the first iteration); only the communication changes. The hook does
not depend on DDP's bucket layout: each DDP bucket is cut per parameter by the same chunking
rule as the optimizer's own buckets, so its reduce-scatter output is a list of per-parameter
chunks that are copied into the optimizer's gradient shards wherever they live.

After the hook, ``p.grad`` still holds this rank's local, unreduced gradient: only the
optimizer's shards hold the average (use ``ShardedAdamW.clip_grad_norm_``).
"""

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel

from .collectives import completed_future
from .optimizer import ShardedAdamW


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
