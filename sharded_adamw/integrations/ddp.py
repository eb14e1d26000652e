"""DDP integration: ``attach()`` swaps DDP's all-reduce for a reduce-scatter into the shards.

DDP keeps doing what it does well (bucketing in C++, ``no_sync``, unused-parameter detection,
the bucket rebuild after the first iteration); only the communication changes. The hook does
not depend on DDP's bucket layout: each parameter's owned range (gloo) or chunk (NCCL) is
routed to the optimizer's gradient shard wherever it lives.

Memory: DDP's bucket buffers hold the gradients; ``p.grad`` is released as soon as DDP has
copied it into its bucket (a post-hook on the parameter's AccumulateGrad node, registered after
DDP's own), and DDP's reducer is told not to copy its buckets back into ``p.grad`` at the end of
backward. So after backward ``p.grad`` is None on every synchronising backward (under
``no_sync()`` it accumulates as usual), and only the optimizer's shards hold the average;
``torch.nn.utils.clip_grad_norm_`` is routed to them (``clip.py``).

A DDP model built while an optimizer over its parameters exists is paired with it by
``autoattach.py``.
"""

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel

from ..core.bucket import as_real, is_dense
from ..core.collectives import completed_future, deliver

# The optimizer calls into this module (``attach``); here its class is only a type hint, quoted
# because DDP reads the comm hook's annotations at runtime (no ``from __future__ import
# annotations`` in this module).
if TYPE_CHECKING:
    from ..core.optimizer import ShardedAdamW

logger = logging.getLogger("sharded_adamw")


class _HookState:
    """The optimizer, and the routes from each DDP bucket to the optimizer's gradient shards
    (rebuilt when DDP rebuilds its buckets)."""

    def __init__(self, opt: "ShardedAdamW"):
        self.opt = opt
        self.routes: dict = {}
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
        runs of owned elements to deliver from DDP's buffer to the shards after an in-place
        average, and the reduce dtype.

        A run is a stretch that is contiguous both in DDP's buffer and in one gradient shard
        (consecutive parameters, in the same order in both, as DDP's buckets and ours usually
        are), so it is delivered by one kernel; each run keeps the parameters it covers."""
        params = bucket.parameters()
        buffer = bucket.buffer()
        key = (tuple(id(p) for p in params), buffer.data_ptr())
        cached = self.routes.get(bucket.index())
        if cached is None or cached[0] != key:  # DDP rebuilds its buckets after iteration 1;
            # replacing the route drops its views of the old buffer, so DDP can free it
            slots = [self.opt._slot[p] for p in params]
            flat, item = buffer.view(-1), buffer.element_size()
            runs: list[list] = []  # [shard bucket, dst start, src start, length, members]
            grads = [_logical(g, p) for g, p in zip(bucket.gradients(), params)]
            for j, ((b, i), g) in enumerate(zip(slots, grads)):
                s = b.layout.slots[i]
                if not s.owned:
                    continue
                if not g.is_contiguous() or g.is_complex():  # not the shards' order: one by one
                    runs.append([b, s.offset, None, s.owned, [j]])
                    continue
                src = (g.data_ptr() - buffer.data_ptr()) // item + s.start
                last = runs[-1] if runs else None
                if (
                    last
                    and last[2] is not None
                    and last[0] is b
                    and last[1] + last[3] == s.offset
                    and (last[2] + last[3] == src)
                ):
                    last[3] += s.owned
                    last[4].append(j)
                else:
                    runs.append([b, s.offset, src, s.owned, [j]])
            views = [
                (b.grad[d : d + n], None if r is None else flat[r : r + n], members)
                for b, d, r, n, members in runs
            ]
            reduce_dtype = slots[0][0].reduce_dtype
            route = (params, slots, views, reduce_dtype, grads)
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
    parameter's owned range is copied out of it; elsewhere (NCCL), each of the optimizer's
    buckets is staged from DDP's buffers once all its gradients have arrived (DDP's buckets
    and the optimizer's need not match) and reduce-scattered, as standalone.
    ``p.grad`` (the local, unreduced gradient DDP copied into its bucket) is set to None:
    nothing should read it, and its memory is the full model's gradients.
    """
    params, slots, runs, reduce_dtype, grads = state.route(bucket)
    opt = state.opt
    comm = opt.comm
    buffer = bucket.buffer()
    for (b, i), p in zip(slots, params):
        if p.grad is not None:
            b.present[i] = True
    in_place = (
        comm.in_place(buffer.device)
        and comm.replicate_group is None
        and buffer.dtype == reduce_dtype
    )
    with record_function("sharded_adamw.reduce_scatter"):
        if in_place:
            accumulate = [b.reduced[i] for b, i in slots]  # a second synced backward
            for b, i in slots:
                b.reduced[i] = b.has_grad = True
            handle, scale = comm.average_in_place(buffer, async_op=True)
            opt._pending.append(
                handle.and_then(lambda: _deliver_runs(runs, slots, grads, accumulate, scale))
            )
        else:
            for (b, i), g in zip(slots, grads):
                opt.arrived(b, i, g)
    for p in params:
        p.grad = None
    return completed_future(buffer)


def _logical(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Parameter ``p``'s gradient in DDP's bucket, as a view with ``p``'s shape and indexing.

    DDP lays a dense non-contiguous parameter's gradient (channels_last) into its bucket in
    the parameter's memory order, while ``GradBucket.gradients()`` views every stretch as
    contiguous: for such a parameter the view is rebuilt with the parameter's strides."""
    if p.is_contiguous() or not is_dense(p):
        return g
    return g.as_strided(p.shape, p.stride(), g.storage_offset())


def _deliver_runs(
    runs: list, slots: list, grads: list[torch.Tensor], accumulate: list[bool], scale: float
) -> None:
    """Write (or add, after a second synchronised backward) the averaged owned elements of a
    DDP bucket into the shards, times ``scale``: one kernel per run, or per parameter in the
    rare run whose parameters differ in whether to add, and for a non-contiguous parameter
    (its gradient's memory order is not the shards' logical order)."""
    for dst, src, members in runs:
        add = {accumulate[j] for j in members}
        if len(add) == 1 and src is not None:
            deliver(src, dst, add.pop(), scale)
            continue
        for j in members:
            b, i = slots[j]
            s = b.layout.slots[i]
            grad = as_real(grads[j]).reshape(-1)[s.start : s.end]
            deliver(grad, b.owned(b.grad, i), accumulate[j], scale)


def attach(opt: "ShardedAdamW", model: torch.nn.Module) -> None:
    """Register the reduce-scatter comm hook on ``model``; see ``ShardedAdamW.attach``."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            "ShardedAdamW.attach() needs a torch.nn.parallel.DistributedDataParallel model, "
            f"got {type(model).__name__}"
        )
    if opt._ddp is model:
        return
    opt.build_deferred()  # parameters materialised (to_empty) since the optimizer was built
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
                f"ShardedAdamW.attach(): optimizer {opt.param_name(p)} is not a trainable "
                "parameter of this DDP model"
            )
    ddp_world = dist.get_world_size(model.process_group)
    if ddp_world != opt.comm.dp_size:
        raise ValueError(
            f"ShardedAdamW.attach(): DDP averages over {ddp_world} ranks but the optimizer's "
            f"process group has {opt.comm.dp_size}"
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
    opt._gather.watch(model.module)
