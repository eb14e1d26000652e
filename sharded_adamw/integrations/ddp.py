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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel

from ..core.bucket import ShardBucket, as_real, is_dense
from ..core.collectives import completed_future, deliver
from ..core.reducer import BucketGrads, Phase, Reducer

# No ``from __future__ import annotations`` in this module: DDP reads the comm hook's
# annotations at runtime.

logger = logging.getLogger("sharded_adamw")


@dataclass
class Run:
    """A stretch of owned elements that is contiguous both in DDP's buffer and in one
    gradient shard: delivered by one kernel. ``src`` is None where the parameter's gradient
    is not in the shards' order (non-contiguous, complex): delivered one parameter at a
    time."""

    bucket: ShardBucket
    dst: int  # start in the bucket's gradient shard
    src: int | None  # start in DDP's flat buffer
    length: int
    members: list[int] = field(default_factory=list)  # positions in the DDP bucket


@dataclass
class Route:
    """From one DDP bucket to the optimizer's gradient shards (rebuilt when DDP rebuilds
    its buckets after the first iteration)."""

    key: tuple
    params: list[torch.Tensor]
    slots: list[tuple[ShardBucket, int]]
    views: list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]  # (dst, src, members)
    reduce_dtype: torch.dtype
    grads: list[torch.Tensor]


class DDPReducer(Reducer):
    """Attached: DDP's comm hook hands each of its buckets over (``_comm_hook``); DDP keeps
    its bucketing, ``no_sync`` and unused-parameter detection."""

    def __init__(self, previous: Reducer, model: DistributedDataParallel, trainable: list):
        super().__init__(
            previous.buckets, previous.comm, previous.pool.size, previous.overlap, previous.name_of
        )
        self.records, self.pool, self.pending = previous.records, previous.pool, previous.pending
        self.model = model
        self.routes: dict[int, Route] = {}
        self.syncing = False  # the last forward will reduce gradients in its backward
        self.accumulators: list = []  # the AccumulateGrad nodes our release hooks sit on
        self._slot = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        model.register_comm_hook(self, _comm_hook)
        # DDP's reducer then leaves p.grad alone at the end of backward instead of copying its
        # bucket back into it (the optimizer-in-backward mode): the hook has released p.grad,
        # and only the optimizer's shards hold the averaged gradient.
        model.reducer._set_optimizer_in_backward()
        self.hooks.append(model.register_forward_pre_hook(lambda *_: self._before_forward()))
        with torch.enable_grad():
            for p in trainable:
                node = p.view_as(p).grad_fn.next_functions[0][0]  # p's AccumulateGrad
                self.accumulators.append(node)
                self.hooks.append(node.register_hook(lambda *_, p=p: self._release(p)))

    @property
    def needs_agreement(self) -> bool:
        """DDP reduces every parameter unless it may skip some (unused-parameter detection,
        static graph): only then can the ranks' presence differ."""
        return self.model.find_unused_parameters or self.model.static_graph

    def added(self, buckets: list[ShardBucket]) -> None:
        super().added(buckets)
        self._slot.update((p, (b, i)) for b in buckets for i, p in enumerate(b.params))

    def _before_forward(self) -> None:
        """Forward pre-hook: wait for reductions still running on DDP's buffers (on gloo the
        hook averages them in place, and this forward's backward will refill them), and note
        whether this backward synchronises (not under ``no_sync()`` or with
        ``require_backward_grad_sync`` off)."""
        self.wait()
        self.syncing = torch.is_grad_enabled() and self.model.require_backward_grad_sync

    def _release(self, p: torch.Tensor) -> None:
        """Post-hook on ``p``'s AccumulateGrad node, after DDP's own (registered first), which
        has just copied ``p.grad`` into DDP's bucket: drop ``p.grad`` now, not when the whole
        bucket is ready (DDP's first iteration has one bucket for the whole model)."""
        if self.syncing and not self.model.static_graph and p.grad is not None:
            b, i = self._slot[p]
            self.records[b].present[i] = True
            p.grad = None

    def arrived(self, bucket: ShardBucket, i: int, grad: torch.Tensor) -> None:
        """Where the hook stages: DDP hands over parameter ``i``'s local gradient (a view of
        DDP's bucket, valid until the next backward); the bucket's reduce-scatter starts once
        all of its gradients are in."""
        record = self.records[bucket]
        if not record.arrived:
            record.arrivals = [None] * len(bucket.params)
        record.arrivals[i] = grad
        record.arrived += 1
        if record.arrived == len(bucket.params):
            self._start_arrived(bucket, record)

    def _start_arrived(self, bucket: ShardBucket, record: BucketGrads) -> None:
        self.pool.bind(list(self.records.values()))
        self.start(bucket, record.arrivals)
        record.arrivals, record.arrived = [], 0

    def _launch_rest(self) -> None:
        for bucket in self.buckets:  # DDP left a bucket incomplete (missing = 0)
            record = self.records[bucket]
            if record.arrived:
                self._start_arrived(bucket, record)

    def _local_presence(self, record: BucketGrads) -> list[bool]:
        b = record.bucket
        if not record.holds:
            if any(p.grad is not None for p in b.params):
                raise RuntimeError(
                    "ShardedAdamW is attached to DDP but these gradients did not go "
                    "through DDP's backward hook (was the last backward under "
                    "no_sync()?); parameter: " + self.name_of(b.params[0])
                )
            return [False] * len(b.params)
        if self.needs_agreement:
            return list(record.present)  # local; agreed over the ranks
        return [True] * len(b.params)

    def adopt_new(self, new: list[ShardBucket]) -> None:
        Reducer.adopt_new(self, new)

    def route(self, bucket: dist.GradBucket) -> Route:
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
        if cached is not None and cached.key == key:
            return cached
        # DDP rebuilds its buckets after iteration 1; replacing the route drops its views of
        # the old buffer, so DDP can free it
        slots = [self._slot[p] for p in params]
        flat, item = buffer.view(-1), buffer.element_size()
        runs: list[Run] = []
        grads = [_logical(g, p) for g, p in zip(bucket.gradients(), params)]
        for j, ((b, i), g) in enumerate(zip(slots, grads)):
            s = b.layout.slots[i]
            if not s.owned:
                continue
            if not g.is_contiguous() or g.is_complex():  # not the shards' order: one by one
                runs.append(Run(b, s.offset, None, s.owned, [j]))
                continue
            src = (g.data_ptr() - buffer.data_ptr()) // item + s.start
            last = runs[-1] if runs else None
            if (
                last
                and last.src is not None
                and last.bucket is b
                and last.dst + last.length == s.offset
                and last.src + last.length == src
            ):
                last.length += s.owned
                last.members.append(j)
            else:
                runs.append(Run(b, s.offset, src, s.owned, [j]))
        views = [
            (
                r.bucket.grad[r.dst : r.dst + r.length],
                None if r.src is None else flat[r.src : r.src + r.length],
                r.members,
            )
            for r in runs
        ]
        route = Route(key, params, slots, views, slots[0][0].reduce_dtype, grads)
        self.routes[bucket.index()] = route
        return route


class DDPFullGradReducer(Reducer):
    """Attached with ``full_grads`` (ZeRO-1): DDP all-reduces into ``p.grad`` exactly as it
    does for ``torch.optim.AdamW`` (no comm hook), and ``finish`` takes each rank's owned
    part of ``p.grad`` into the shards."""

    def __init__(self, previous: Reducer, model: DistributedDataParallel):
        super().__init__(
            previous.buckets, previous.comm, previous.pool.size, previous.overlap, previous.name_of
        )
        self.records, self.pool, self.pending = previous.records, previous.pool, previous.pending
        self.model = model

    @property
    def needs_agreement(self) -> bool:
        # DDP leaves p.grad None on every rank, or averaged on every rank: nothing to agree
        return False

    def _launch_rest(self) -> None:
        for record in self.records.values():
            record.take_from_grads()

    def _local_presence(self, record: BucketGrads) -> list[bool]:
        return [p.grad is not None for p in record.bucket.params]


def _comm_hook(reducer: DDPReducer, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Launch the bucket's reduction into the optimizer's shards, release the parameters'
    gradients, and hand DDP its buffer back at once.

    DDP needs nothing from the reduction (the shards live in the optimizer, and the reducer
    tells DDP not to copy its buffer back into ``p.grad``), so the returned future is
    already complete and backward never waits for communication, on gloo (whose
    reduce-scatter has no future) as on NCCL. ``step()`` waits for the work.

    Two ways, same bits: on gloo, DDP's own buffer is averaged in place by an all-reduce (no
    copy-in at all; gloo's reduce-scatter would all-reduce a clone of it anyway) and each
    parameter's owned range is copied out of it; elsewhere (NCCL), each of the optimizer's
    buckets is staged from DDP's buffers once all its gradients have arrived (DDP's buckets
    and the optimizer's need not match) and reduce-scattered, as standalone.
    ``p.grad`` (the local, unreduced gradient DDP copied into its bucket) is set to None:
    nothing should read it, and its memory is the full model's gradients.
    """
    route = reducer.route(bucket)
    comm = reducer.comm
    buffer = bucket.buffer()
    reducer.phase = Phase.REDUCING
    records = [reducer.records[b] for b, _ in route.slots]
    for record, (_, i), p in zip(records, route.slots, route.params):
        if p.grad is not None:
            record.present[i] = True
    in_place = (
        comm.in_place(buffer.device)
        and comm.replicate_group is None
        and buffer.dtype == route.reduce_dtype
    )
    with record_function("sharded_adamw.reduce_scatter"):
        if in_place:
            # a second synced backward adds to what the first delivered
            accumulate = [r.delivered[i] for r, (_, i) in zip(records, route.slots)]
            for r, (_, i) in zip(records, route.slots):
                r.delivered[i] = r.holds = True
            handle, scale = comm.average_in_place(buffer, async_op=True)
            reducer.pending.append(handle.and_then(lambda: _deliver_runs(route, accumulate, scale)))
        else:
            for (b, i), g in zip(route.slots, route.grads):
                reducer.arrived(b, i, g)
    for p in route.params:
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


def _deliver_runs(route: Route, accumulate: list[bool], scale: float) -> None:
    """Write (or add, after a second synchronised backward) the averaged owned elements of a
    DDP bucket into the shards, times ``scale``: one kernel per run, or per parameter in the
    rare run whose parameters differ in whether to add, and for a non-contiguous parameter
    (its gradient's memory order is not the shards' logical order)."""
    for dst, src, members in route.views:
        add = {accumulate[j] for j in members}
        if len(add) == 1 and src is not None:
            deliver(src, dst, add.pop(), scale)
            continue
        for j in members:
            b, i = route.slots[j]
            s = b.layout.slots[i]
            grad = as_real(route.grads[j]).reshape(-1)[s.start : s.end]
            deliver(grad, b.owned(b.grad, i), accumulate[j], scale)


def check_attachable(opt, model: torch.nn.Module) -> tuple[list, dict]:
    """The model's trainable parameters, once checked to be exactly ``opt``'s, over the
    same ranks, and every parameter's name in the model; raises naming the first mismatch.
    ``ShardedAdamW.attach`` calls this."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            "ShardedAdamW.attach() needs a torch.nn.parallel.DistributedDataParallel model, "
            f"got {type(model).__name__}"
        )
    names = {p: n for n, p in model.module.named_parameters()}
    ignored = getattr(model, "parameters_to_ignore", set())
    trainable = [
        p
        for n, p in model.module.named_parameters()
        if p.requires_grad and n not in ignored and p.numel() > 0
    ]
    for p in trainable:
        if not opt.owns(p):
            raise ValueError(
                f"ShardedAdamW.attach(): DDP parameter {names[p]!r} (shape {tuple(p.shape)}) "
                "is not optimized by this ShardedAdamW; pass all of the model's trainable "
                "parameters to the optimizer"
            )
    mine = set(trainable)
    for p in opt.owned_params():
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
    return trainable, names
