"""The backward side of a step: gradients -> reduce-scatter -> the optimizer's gradient shards.

One ``Reducer`` per optimizer owns everything between a parameter's gradient and the averaged
gradient in its bucket's shard: the staging buffers, the reductions in flight, which
parameters had a gradient, and where the backward is (``Phase``). Per bucket it has a
start/finish pair: ``start`` stages the gradients and launches the reduce-scatter,
``finish`` waits for every reduction still in flight. The optimizer asks it for the reduced
shards (``finish``, ``shards``) and for which parameters had a gradient (``presence``), and
tells it when a step has used them (``consumed``); nothing else writes its records.

Two kinds, chosen once:

- ``HookReducer`` (standalone, ZeRO-2): a post-accumulate-grad hook per parameter counts
  the gradients of each bucket and launches the buckets in order as they fill; the end of
  backward launches the rest (unused parameters count as zeros), so that every rank
  reduce-scatters every bucket once per backward, in the same order.
- ``integrations.ddp.DDPReducer`` (``attach()``): DDP's comm hook hands over its buckets.

With ``full_grads`` (ZeRO-1: ``p.grad`` keeps the averaged gradient) the two are
``FullGradReducer`` (the hooks all-reduce each bucket and write ``p.grad``) and
``integrations.ddp.DDPFullGradReducer`` (DDP all-reduces as usual); both take the shards
from ``p.grad`` when the step finishes the reduction.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch.autograd.profiler import record_function

from .bucket import ShardBucket, as_real
from .collectives import Comm, Handle


class Phase(enum.Enum):
    """Where the gradients of the current step are."""

    IDLE = "no gradient since the last step"
    LOCAL = "gradients in p.grad that no reduction has taken (no_sync, or no hooks)"
    BACKWARD = "a synchronising backward is launching buckets as they fill"
    REDUCING = "every bucket launched since the last step; reductions may be in flight"
    REDUCED = "every shard holds the averaged gradient"


class BucketGrads:
    """One bucket's side of the reduction: its staging views, which of its parameters had a
    gradient, and whether its shard holds one."""

    def __init__(self, bucket: ShardBucket):
        n = len(bucket.params)
        self.bucket = bucket
        self.holds = False  # the shard holds a gradient since the last step
        self.present = [False] * n  # had a gradient on this rank since the last step
        # Parameters whose gradient torch would keep as a zero tensor: they had one since the
        # last ``zero_grad(set_to_none=True)`` and were zeroed with ``set_to_none=False``.
        # torch.optim.AdamW goes on stepping those (momentum, weight decay) in steps where
        # they get no new gradient, so they step here too, with a zero gradient.
        self.kept = [False] * n
        self.stepped = [False] * n  # agreed presence of the last step
        self.delivered = [False] * n  # attached, in place: an average reached this slot
        self.written: dict[int, tuple] = {}  # full_grads: p.grad we created, and its version
        self.arrived = 0  # gradients that arrived in the current backward
        self.arrivals: list[torch.Tensor | None] = []  # attached, staging: DDP's views
        self.slot: tuple = ()  # (device, index) of its BufferPool slot
        self.staging: torch.Tensor | None = None  # that slot, bound before use
        self._views: list[torch.Tensor] = []
        self._gaps: list[torch.Tensor] = []

    def clear(self) -> None:
        """A step has used the gradient: the next backward starts the shard afresh."""
        n = len(self.bucket.params)
        self.holds = False
        self.present = [False] * n
        self.delivered = [False] * n

    def slot_bytes(self) -> int:
        """Bytes of pool slot the reduce-scatter input needs (reduce dtype)."""
        return self.bucket.layout.padded_numel * self.bucket.reduce_dtype.itemsize

    def bind(self, buffer: torch.Tensor) -> None:
        """Use the byte buffer ``buffer`` for the reduce-scatter input and precompute each
        parameter's view of it, so a backward makes no per-parameter views."""
        layout = self.bucket.layout
        self.staging = buffer[: self.slot_bytes()].view(self.bucket.reduce_dtype)
        self._views = [self.staging[s.base : s.base + s.numel] for s in layout.slots]
        self._gaps = [self.staging[a:b] for a, b in layout.gaps()]

    def stage(self, grads: list[torch.Tensor | None]) -> None:
        """Copy ``grads`` (one per parameter, None for no gradient, which counts as zeros)
        into the staging buffer in the bucket's layout, zeros in the padding."""
        have = [(d, as_real(g).reshape(-1)) for d, g in zip(self._views, grads) if g is not None]
        if len(have) == len(grads):
            torch._foreach_copy_(self._views, [g for _, g in have])
        else:
            for d, g in zip(self._views, grads):
                if g is None:
                    d.zero_()
            if have:
                torch._foreach_copy_([d for d, _ in have], [g for _, g in have])
        if self._gaps:  # the slot is shared with other buckets: zero the padding
            torch._foreach_zero_(self._gaps)

    def reduce_scatter(
        self, comm: Comm, grads: list[torch.Tensor | None], async_op: bool
    ) -> Handle:
        """Average ``grads`` into this rank's gradient shard, adding to what the shard
        already holds since the last step (so no micro-batch is lost).

        The one copy of the data path that ZeRO-2 needs: the gradients go into the staging
        buffer (``stage``), then one collective averages it into the shard."""
        self.stage(grads)
        accumulate, self.holds = self.holds, True
        with record_function("sharded_adamw.reduce_scatter"):
            return comm.reduce_scatter_grads(self.staging, self.bucket.grad, accumulate, async_op)

    def all_reduce(self, comm: Comm, grads: list[torch.Tensor | None], async_op: bool) -> Handle:
        """``full_grads``: average ``grads`` over the ranks as DDP does (same bits) and write
        the average into every parameter's ``p.grad`` (zeros where no rank had one)."""
        self.stage(grads)
        with record_function("sharded_adamw.all_reduce"):
            handle, scale = comm.average_in_place(self.staging, async_op)
        return handle.and_then(lambda: self._write_grads(scale))

    def _write_grads(self, scale: float) -> None:
        for i, (p, view) in enumerate(zip(self.bucket.params, self._views)):
            avg = view.view(as_real(p).shape)
            avg = avg if scale == 1.0 else avg * scale
            if p.grad is None:  # no gradient here; perhaps on another rank (``written``)
                p.grad = torch.empty_like(p)
                as_real(p.grad).copy_(avg)
                self.written[i] = (p.grad, p.grad._version)
            else:
                as_real(p.grad).copy_(avg)
                if i in self.written and self.written[i][0] is p.grad:
                    self.written[i] = (p.grad, p.grad._version)  # our copy, not a backward

    def take_from_grads(self) -> None:
        """``full_grads``: the shard becomes this rank's owned part of every parameter's
        ``p.grad`` as it is now (after whatever clipping or scaling the user applied to it);
        zeros where ``p.grad`` is None."""
        b = self.bucket
        for i, (p, s) in enumerate(zip(b.params, b.layout.slots)):
            owned = b.owned(b.grad, i)
            if p.grad is None:
                owned.zero_()
            else:
                owned.copy_(as_real(p.grad).reshape(-1)[s.start : s.end])
        self.holds = True


class BufferPool:
    """A few reusable bucket-sized byte buffers per device, shared in turn by the buckets'
    reduce-scatter inputs.

    Bucket ``i`` of a device uses slot ``i % size`` (fewer slots where a device has fewer
    buckets). Before a bucket uses a slot, ``acquire`` waits for the collective that used it
    last (and runs its delivery), so at most ``size`` buckets' worth of staging exists at
    any time: the buffers live exactly as long as their collective needs them. Views into
    the slots are made once, at bind.
    """

    def __init__(self, size: int):
        self.size = size
        self.buffers: dict[torch.device, list[torch.Tensor]] = {}
        self._users: dict[tuple, Handle] = {}  # slot -> the collective using it

    def bind(self, records: list[BucketGrads]) -> None:
        """Bind the buckets that have no staging yet (allocating the slots once)."""
        if all(g.staging is not None for g in records):
            return
        self.drain()
        need: dict[torch.device, int] = {}
        users: dict[torch.device, int] = {}
        for g in records:
            device = g.bucket.device
            need[device] = max(need.get(device, 0), g.slot_bytes())
            users[device] = users.get(device, 0) + 1
        for device, nbytes in need.items():
            slots = min(self.size, users[device])  # one bucket needs one slot, not two
            have = self.buffers.get(device)
            if have is None or have[0].numel() < nbytes or len(have) < slots:
                self.buffers[device] = [
                    torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(slots)
                ]
        counts: dict[torch.device, int] = {}
        for g in records:
            device = g.bucket.device
            i = counts[device] = counts.get(device, -1) + 1
            slot = i % len(self.buffers[device])
            g.slot = (device, slot)
            g.bind(self.buffers[device][slot])

    def acquire(self, record: BucketGrads) -> None:
        """Wait until the last collective that used ``record``'s slot is done."""
        handle = self._users.pop(record.slot, None)
        if handle is not None:
            handle.wait()

    def hold(self, record: BucketGrads, handle: Handle) -> None:
        """Record that ``handle``'s collective uses ``record``'s slot until it is waited."""
        self._users[record.slot] = handle

    def drain(self) -> None:
        """Wait for every collective that uses a slot."""
        for handle in self._users.values():
            handle.wait()
        self._users.clear()


class Reducer:
    """What both kinds share: the records, the staging pool, the reductions in flight."""

    model: torch.nn.Module | None = None  # the DDP model driving the reduction, if any

    def __init__(
        self,
        buckets: list[ShardBucket],
        comm: Comm,
        gather_buffers: int,
        overlap: bool,
        name_of: Callable[[torch.Tensor], str],
    ):
        self.buckets = buckets  # the optimizer's list: buckets built later appear here
        self.comm = comm
        self.overlap = overlap
        self.name_of = name_of
        self.records: dict[ShardBucket, BucketGrads] = {}
        self.pool = BufferPool(gather_buffers)
        self.pending: list[Handle] = []
        self.hooks: list = []
        self.phase = Phase.IDLE

    @property
    def needs_agreement(self) -> bool:
        """Whether the ranks must agree which parameters had a gradient (their local
        ``presence`` may differ)."""
        return True

    def added(self, buckets: list[ShardBucket]) -> None:
        """Take new buckets (built at construction, or later for deferred parameters)."""
        for b in buckets:
            self.records[b] = BucketGrads(b)

    # ---- per bucket: start and finish ----------------------------------------------------

    def start(self, bucket: ShardBucket, grads: list[torch.Tensor | None]) -> None:
        """Stage ``grads`` in a pool slot and launch the bucket's reduce-scatter."""
        record = self.records[bucket]
        self.pool.acquire(record)
        handle = record.reduce_scatter(self.comm, grads, async_op=self.overlap)
        self.pool.hold(record, handle)
        self.pending.append(handle)

    def start_local(self, bucket: ShardBucket) -> None:
        """Launch ``bucket`` from its parameters' ``p.grad``, recording which exist (torch
        AdamW skips parameters without one), then drop ``p.grad``: the shard now holds this
        rank's part (ZeRO-2)."""
        self.start(bucket, self.local_grads(bucket))
        for p in bucket.params:
            p.grad = None

    def local_grads(self, bucket: ShardBucket) -> list[torch.Tensor | None]:
        """The parameters' ``p.grad``, recording which exist (torch AdamW skips parameters
        without one)."""
        record = self.records[bucket]
        grads = []
        for i, p in enumerate(bucket.params):
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    raise RuntimeError(
                        "ShardedAdamW does not support sparse gradients "
                        f"(parameter {self.name_of(p)}); use torch.optim.SparseAdam"
                    )
                record.present[i] = True
            grads.append(g)
        return grads

    def wait(self) -> None:
        """Wait for (and deliver) every reduction in flight."""
        for handle in self.pending:
            handle.wait()
        self.pending.clear()

    def finish(self) -> None:
        """Make sure every bucket's gradient shard is reduced and complete."""
        self._launch_rest()
        self.phase = Phase.REDUCED
        with record_function("sharded_adamw.reduce_scatter_wait"):
            self.wait()

    def _launch_rest(self) -> None:
        raise NotImplementedError

    def adopt_new(self, new: list[ShardBucket]) -> None:
        """Buckets built in ``step()`` for parameters unfrozen or materialised since: their
        gradients are still in ``p.grad``; reduce them now unless ``finish`` will."""
        self.pool.bind(list(self.records.values()))
        for b in new:
            self.start_local(b)

    # ---- what the step asks -----------------------------------------------------------

    def shards(self) -> list[torch.Tensor]:
        """The gradient shards that hold a gradient since the last step."""
        return [b.grad for b in self.buckets if self.records[b].holds]

    def presence(self) -> list[list[bool]]:
        """Which parameters of each bucket step, as this rank knows it: those that had a
        gradient (agreed over the ranks by ``StepAgreement`` where ``needs_agreement``),
        and those whose gradient torch would have kept as a zero tensor (``kept``)."""
        out = []
        for b in self.buckets:
            record = self.records[b]
            bp = self._local_presence(record)
            if any(record.kept):
                if not record.holds:  # no reduction this step: the kept gradients are zeros
                    b.grad.zero_()
                    record.holds = True
                bp[:] = [x or k for x, k in zip(bp, record.kept)]
            out.append(bp)
        return out

    def _local_presence(self, record: BucketGrads) -> list[bool]:
        return record.present

    def consumed(self, present: list[list[bool]]) -> None:
        """A step used the averaged gradient (or skipped it). ``present``: which parameters
        it stepped, as agreed (with fused AdamW: this rank's; ``zero_grad`` reads the agreed
        flags back), kept for ``zero_grad(set_to_none=False)``, which keeps their gradients
        as torch does. The next backward starts the shards afresh,
        whether or not ``opt.zero_grad()`` is called (training loops such as HF ``Trainer``
        call ``model.zero_grad()``, which cannot reach the shards). Unlike ``p.grad`` under
        torch AdamW, the sharded gradient never carries over from one step to the next."""
        self.phase = Phase.IDLE
        for b, bp in zip(self.buckets, present):
            self.records[b].stepped = list(bp)
        for record in self.records.values():
            record.clear()

    def zero_grad(self, set_to_none: bool, absent_on_device: torch.Tensor | None) -> None:
        """After ``Optimizer.zero_grad``: which gradients torch would now keep as zero
        tensors, and the shards dropped. ``absent_on_device``: the fused step's agreed
        absence flags, read back here (a sync, in this rarely used form only)."""
        if not set_to_none and absent_on_device is not None:
            absent, k = absent_on_device.tolist(), 0
            for b in self.buckets:
                n = len(b.params)
                self.records[b].stepped = [a == 0.0 for a in absent[k : k + n]]
                k += n
        for b in self.buckets:
            record = self.records[b]
            if set_to_none:
                record.kept = [False] * len(b.params)
            else:  # torch keeps every gradient that exists, zeroed
                record.kept = [
                    k or s or r or p.grad is not None
                    for k, s, r, p in zip(record.kept, record.stepped, record.present, b.params)
                ]
            record.stepped = [False] * len(b.params)
            record.clear()

    def close(self) -> None:
        """Stop reducing: wait for what is in flight and remove the hooks."""
        self.wait()
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


class HookReducer(Reducer):
    """Standalone: gradient hooks launch each bucket as soon as its gradients are in."""

    always_hooks = False  # without overlap_comm, the reductions wait for step()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.no_sync = False  # set by ``ShardedAdamW.no_sync()``
        self._next = 0  # the next bucket to launch in this backward
        self._bucket_of: dict[torch.Tensor, ShardBucket] = {}

    def added(self, buckets: list[ShardBucket]) -> None:
        super().added(buckets)
        self._bucket_of.update((p, b) for b in buckets for p in b.params)
        if not (self.overlap or self.always_hooks):  # everything is communicated in step()
            return
        for b in buckets:
            for p in b.params:
                if p.requires_grad:  # frozen with loaded state: no hook; if unfrozen, its
                    # bucket is launched at the end of backward or in step()
                    self.hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: launch buckets, in order, as their gradients are ready."""
        if self.no_sync:
            self.phase = Phase.LOCAL
            return
        if self.phase is not Phase.BACKWARD:
            self.phase = Phase.BACKWARD
            self.pool.bind(list(self.records.values()))
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self.records[self._bucket_of[p]].arrived += 1
        while self._next < len(self.buckets):
            nxt = self.buckets[self._next]
            if self.records[nxt].arrived < len(nxt.params):
                break
            self.start_local(nxt)
            self._next += 1

    def _end_of_backward(self) -> None:
        """Launch the buckets whose gradients did not all arrive (unused parameters), so that
        every rank reduce-scatters every bucket exactly once per backward, in the same order."""
        for bucket in self.buckets[self._next :]:
            self.start_local(bucket)
        for record in self.records.values():
            record.arrived = 0
        self._next = 0
        self.phase = Phase.REDUCING

    def _launch_rest(self) -> None:
        if self.phase in (Phase.IDLE, Phase.LOCAL):  # no backward launched them
            self.pool.bind(list(self.records.values()))
            for bucket in self.buckets:
                self.start_local(bucket)

    def adopt_new(self, new: list[ShardBucket]) -> None:
        if self.phase in (Phase.REDUCING, Phase.REDUCED):
            super().adopt_new(new)


class FullGradReducer(HookReducer):
    """Standalone with ``full_grads`` (ZeRO-1): each bucket is all-reduced as DDP would
    (averaged, the same bits) and the average goes back into ``p.grad``, which code between
    backward and step reads and may change (clipping, scaling); ``finish`` then takes each
    rank's owned part of ``p.grad`` into the shard. DDP's communication and gradient memory;
    the optimizer state stays sharded."""

    always_hooks = True  # p.grad must hold the average when backward ends, as with DDP

    def local_grads(self, bucket: ShardBucket) -> list[torch.Tensor | None]:
        """As for ``HookReducer``, except that a ``p.grad`` this reducer created (the
        average, for a parameter without a gradient here) and that no backward has added to
        since is staged but not counted as this rank's gradient."""
        record = self.records[bucket]
        before = list(record.present)
        grads = super().local_grads(bucket)
        for i, p in enumerate(bucket.params):
            mine = record.written.get(i)
            if mine is not None and p.grad is mine[0] and p.grad._version == mine[1]:
                record.present[i] = before[i]
        return grads

    def consumed(self, present: list[list[bool]]) -> None:
        """A parameter that no rank had a gradient for gets no ``p.grad``, as under DDP."""
        for b, bp in zip(self.buckets, present):
            record = self.records[b]
            for i, (g, _) in record.written.items():
                if not bp[i] and b.params[i].grad is g:
                    b.params[i].grad = None
            record.written.clear()
        super().consumed(present)

    def start_local(self, bucket: ShardBucket) -> None:
        record = self.records[bucket]
        self.pool.acquire(record)
        handle = record.all_reduce(self.comm, self.local_grads(bucket), async_op=self.overlap)
        self.pool.hold(record, handle)
        self.pending.append(handle)

    def _end_of_backward(self) -> None:
        """As DDP's reducer does: backward ends with the averages in ``p.grad``, so that the
        next backward accumulates into them (and code in between reads them)."""
        super()._end_of_backward()
        self.wait()

    def finish(self) -> None:
        super().finish()
        for record in self.records.values():
            record.take_from_grads()
