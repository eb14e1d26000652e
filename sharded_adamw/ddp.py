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

from .collectives import Handle, completed_future
from .optimizer import ShardedAdamW


class _HookState:
    """The optimizer, the routes from each DDP bucket to the optimizer's gradient shards
    (rebuilt when DDP rebuilds its buckets), and the one reduction this hook keeps pending."""

    def __init__(self, opt: ShardedAdamW):
        self.opt = opt
        self.routes: dict = {}
        self.last: Handle | None = None
        self.syncing = False  # the last forward will reduce gradients in its backward
        self.accumulators: list = []  # the AccumulateGrad nodes our release hooks sit on

    def before_forward(self, ddp: DistributedDataParallel) -> None:
        """Forward pre-hook: wait for reductions still running on DDP's buffers (on gloo the
        hook averages them in place, and this forward's backward will refill them), and note
        whether this backward synchronises (not under ``no_sync()`` or with
        ``require_backward_grad_sync`` off)."""
        self.opt._wait_pending()
        self.syncing = torch.is_grad_enabled() and ddp.require_backward_grad_sync

    def release(self, p: torch.Tensor, ddp: DistributedDataParallel) -> None:
        """Post-hook on ``p``'s AccumulateGrad node, after DDP's own (registered first), which
        has just copied ``p.grad`` into DDP's bucket: drop ``p.grad`` now, not when the whole
        bucket is ready (DDP's first iteration has one bucket for the whole model)."""
        if self.syncing and not ddp.static_graph and p.grad is not None:
            b, i = self.opt._slot[p]
            b.present[i] = True
            p.grad = None

    def route(self, bucket: dist.GradBucket) -> tuple:
        """For a DDP bucket: its parameters, the (bucket, slot) of each in the optimizer, the
        destinations (whole chunks, for a reduce-scatter's output) and the owned views of
        DDP's buffer and of the shards (for an in-place average), and the reduce dtype."""
        params = bucket.parameters()
        key = (tuple(id(p) for p in params), bucket.buffer().data_ptr())
        cached = self.routes.get(bucket.index())
        if cached is None or cached[0] != key:  # DDP rebuilds its buckets after iteration 1;
            # replacing the route drops its views of the old buffer, so DDP can free it
            slots = [self.opt._slot[p] for p in params]
            chunks = [b.views(b.grad, i, owned_only=False) for b, i in slots]
            owned, owned_dst, owned_src = [], [], []
            for j, ((b, i), g) in enumerate(zip(slots, bucket.gradients())):
                s = b.layout.slots[i]
                if s.owned:
                    owned.append(j)
                    owned_dst.append(b.views(b.grad, i))
                    owned_src.append(g.reshape(-1)[s.start : s.end])
            reduce_dtype = slots[0][0].reduce_dtype
            route = (params, slots, chunks, (owned, owned_dst, owned_src), reduce_dtype)
            self.routes[bucket.index()] = cached = (key, route)
        return cached[1]


def _reduce_scatter_hook(
    state: _HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Launch the bucket's reduction into the optimizer's shards, release the parameters'
    gradients, and hand DDP its buffer back at once.

    DDP needs nothing from the reduction (the shards live in the optimizer, and ``attach``
    tells DDP's reducer not to copy its buffer back into ``p.grad``), so the returned future
    is already complete and backward never waits for communication, on gloo (whose
    reduce-scatter has no future) as on NCCL. ``step()`` waits for the work.

    Two ways, same bits: on gloo, DDP's own buffer is averaged in place by an all-reduce (no
    copy-in at all; gloo's reduce-scatter would all-reduce a clone of it anyway) and each
    parameter's owned range is copied out of it; elsewhere (NCCL), the gradients are copied
    into a chunked staging buffer and reduce-scattered, keeping one such buffer pending.
    ``p.grad`` (the local, unreduced gradient DDP copied into its bucket) is set to None:
    nothing should read it, and its memory is the full model's gradients.
    """
    params, slots, chunks, (owned, owned_dst, owned_src), reduce_dtype = state.route(bucket)
    opt = state.opt
    comm = opt._comm
    buffer = bucket.buffer()
    accumulate = [b.reduced[i] for b, i in slots]  # a second synced backward before step()
    for (b, i), p in zip(slots, params):
        b.reduced[i] = b.has_grad = True
        if p.grad is not None:
            b.present[i] = True
    in_place = comm.in_place and comm.replicate_group is None and buffer.dtype == reduce_dtype
    with record_function("sharded_adamw.reduce_scatter"):
        if in_place:
            handle = comm.average_in_place(buffer, async_op=True)
        else:
            if state.last is not None:  # FSDP2's rule: one pending staging buffer at most
                state.last.wait()
            width = sum(c.numel() for c in chunks)
            staging = torch.empty(
                (comm.world_size, width), dtype=reduce_dtype, device=buffer.device
            )
            out = torch.empty(width, dtype=reduce_dtype, device=buffer.device)
            handle = comm.reduce_scatter_grads(bucket.gradients(), staging, out, False, True)

    def to_shards() -> None:
        if in_place:
            _copy_or_add(owned_dst, owned_src, [accumulate[j] for j in owned])
        else:
            _copy_or_add(chunks, list(out.split([c.numel() for c in chunks])), accumulate)

    for p in params:
        p.grad = None
    state.last = handle.and_then(to_shards)
    opt._pending.append(state.last)
    return completed_future(buffer)


def _copy_or_add(dst: list[torch.Tensor], src: list[torch.Tensor], add: list[bool]) -> None:
    """``dst[k] += src[k]`` where ``add[k]``, else ``dst[k] = src[k]`` (one kernel each)."""
    if not any(add):
        torch._foreach_copy_(dst, src)
    elif all(add):
        torch._foreach_add_(dst, src)
    else:
        pick = lambda want: [[t for t, a in zip(ts, add) if a == want] for ts in (dst, src)]  # noqa: E731
        torch._foreach_copy_(*pick(False))
        torch._foreach_add_(*pick(True))


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
    state = _HookState(opt)
    model.register_comm_hook(state, _reduce_scatter_hook)
    # DDP's reducer then leaves p.grad alone at the end of backward instead of copying its
    # bucket back into it (the optimizer-in-backward mode): the hook has released p.grad,
    # and only the optimizer's shards hold the averaged gradient.
    model.reducer._set_optimizer_in_backward()
    opt._hooks.append(model.register_forward_pre_hook(lambda *_: state.before_forward(model)))
    with torch.enable_grad():
        for p in trainable:
            node = p.view_as(p).grad_fn.next_functions[0][0]  # p's AccumulateGrad
            state.accumulators.append(node)
            opt._hooks.append(node.register_hook(lambda *_, p=p: state.release(p, model)))
    opt._ddp = model
