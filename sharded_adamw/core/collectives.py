"""Every ``torch.distributed`` call of the library, with its copy-in and copy-out.

Nothing else in the package calls a collective. ``Comm`` resolves what the user passed as
``process_group`` (nothing, a ``ProcessGroup``, or a 2-D ``DeviceMesh`` named
``("replicate", "shard")``), counts the bytes each collective moves, and degrades to local
copies when there is a single process and no initialised group.

``reduce_scatter_single`` and ``all_gather_single`` are torch 2.13's names for
``reduce_scatter_tensor`` and ``all_gather_into_tensor`` (the old names warn there); the
newest name this torch has is used, so the package runs on torch 2.6 and later.

``SideChannel`` is the one exception to "collectives only here, on the training group": a
private CPU gloo group and a store mailbox over which ``state_server.py`` sends shards point to
point from a background thread, so that ``state_dict()`` is never a collective on the group
training runs on.

Byte counts: a reduce-scatter counts its full input (also on gloo, where the averaging runs as
an in-place all-reduce of that input, which is what gloo's reduce-scatter runs internally: the
count is that of the reduce-scatter it stands for; the bench's dispatch counter sees the
all-reduce and counts it twice), an all-gather its full output, and an all-reduce twice its
buffer, because a ring all-reduce is a reduce-scatter followed by an
all-gather and sends as much as both. With these, one step of sharded AdamW counts
``P * elem`` for the reduce-scatter and ``P * elem`` for the all-gather (plus padding): the
``2 * P * elem`` that DDP's all-reduce of the same gradients counts.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Bytes moved by each kind of collective."""

    reduce_scatter: int = 0
    all_gather: int = 0
    all_reduce: int = 0
    calls: dict = field(
        default_factory=lambda: {"reduce_scatter": 0, "all_gather": 0, "all_reduce": 0}
    )

    def as_dict(self) -> dict:
        return {
            "reduce_scatter_bytes": self.reduce_scatter,
            "all_gather_bytes": self.all_gather,
            "all_reduce_bytes": self.all_reduce,
            "reduce_scatter_calls": self.calls["reduce_scatter"],
            "all_gather_calls": self.calls["all_gather"],
            "all_reduce_calls": self.calls["all_reduce"],
        }


class Handle:
    """In-flight collectives (one, several or none); ``wait()`` blocks on each, then runs the
    follow-up once."""

    def __init__(
        self,
        work: dist.Work | list[dist.Work] | None,
        then: Callable[[], None] | None = None,
    ):
        works = work if isinstance(work, list) else [work]
        self._works = [w for w in works if w is not None]  # None: it ran synchronously
        self._then = then

    def wait(self) -> None:
        while self._works:
            self._works.pop(0).wait()
        if self._then is not None:
            then, self._then = self._then, None
            then()

    def and_then(self, then: Callable[[], None]) -> Handle:
        """A handle that waits for this one, then runs ``then``."""
        return Handle(None, lambda: (self.wait(), then()))


class Comm:
    """The process groups one optimizer talks over, and its byte counters.

    ``world_size`` and ``rank`` are those of the shard group: state is split ``world_size``
    ways. ``replicas`` copies of each shard exist across the replicate group (1 for a flat
    group). Gradients are averaged over ``dp_size = world_size * replicas`` ranks.
    """

    def __init__(self, process_group=None):
        self.replicate_group = None
        if process_group is not None and _is_device_mesh(process_group):
            mesh = process_group
            if mesh.ndim == 1:
                self.shard_group = mesh.get_group()
            elif mesh.ndim == 2:
                names = mesh.mesh_dim_names
                if names is None or set(names) != {"replicate", "shard"}:
                    raise ValueError(
                        f"a 2-D DeviceMesh must name its dims ('replicate', 'shard'), got {names}"
                    )
                self.shard_group = mesh.get_group("shard")
                self.replicate_group = mesh.get_group("replicate")
            else:
                raise ValueError(f"DeviceMesh must be 1-D or 2-D, got {mesh.ndim}-D")
        elif process_group is not None:
            self.shard_group = process_group
        elif dist.is_available() and dist.is_initialized():
            self.shard_group = dist.group.WORLD
        else:
            self.shard_group = None
        if self.shard_group is None:
            self.world_size, self.rank, self._backends = 1, 0, {"": "local"}
        else:
            self.world_size = dist.get_world_size(self.shard_group)
            self.rank = dist.get_rank(self.shard_group)
            self._backends = _backends_by_device(self.shard_group)
        self.replicas = (
            1 if self.replicate_group is None else dist.get_world_size(self.replicate_group)
        )
        self.dp_size = self.world_size * self.replicas
        self.shard_ranks = [  # global rank of each shard rank, for broadcasts
            dist.get_global_rank(self.shard_group, i) if self.distributed else i
            for i in range(self.world_size)
        ]
        self.global_rank = dist.get_rank() if self.shard_group is not None else 0
        self.force_nccl_path = os.environ.get("SHARDED_ADAMW_DATA_PATH", "") == "nccl"
        self.stats = CommStats()

    def check_still_alone(self) -> None:
        """Raise if this ``Comm`` resolved to a single process but a process group of several
        ranks exists now (built after the optimizer): every rank would silently train its own
        copy of the model."""
        if self.distributed or not dist.is_available() or not dist.is_initialized():
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

    @property
    def distributed(self) -> bool:
        return self.shard_group is not None

    # ---- the data path -------------------------------------------------------------------

    def backend_on(self, device: torch.device) -> str:
        """The name of the backend that moves the shard group's tensors on ``device``
        ("gloo", "nccl", ...; "local" without a process group)."""
        return self._backends.get(device.type, self._backends.get("", "undefined"))

    def gloo_path(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` take the gloo data path (in-place all-reduce of the
        staging buffer, one broadcast per shard) rather than the one written for NCCL (a
        reduce-scatter and an all-gather into tensors). Every other backend takes the NCCL
        path. ``SHARDED_ADAMW_DATA_PATH=nccl`` in the environment (read at construction)
        makes gloo take the NCCL path too, so that CI without a GPU runs its code: gloo
        implements ``reduce_scatter_tensor`` and ``all_gather_into_tensor``."""
        return self.backend_on(device) == "gloo" and not self.force_nccl_path

    def in_place(self, device: torch.device) -> bool:
        """Whether gradients on ``device`` are averaged by an in-place all-reduce of the whole
        buffer.

        gloo runs a reduce-scatter as a clone of its whole input plus an all-reduce, and a
        shard of the all-reduce has the same bits as the reduce-scatter's; all-reducing the
        buffer in place therefore gives the same result without the clone. NCCL has a real
        reduce-scatter, which moves half the bytes."""
        return self.gloo_path(device)

    def reduce_scatter_grads(
        self, staging: torch.Tensor, into: torch.Tensor, accumulate: bool, async_op: bool
    ) -> Handle:
        """Average the flat gradients in ``staging`` (a bucket's layout, the reduce dtype,
        ``world_size`` equal shards; the caller must not reuse it before ``wait()``) over all
        data-parallel ranks into this rank's shard ``into`` (added to it when
        ``accumulate``); ``wait()`` on the handle delivers.

        On NCCL a reduce-scatter (SUM) writes the shard. On gloo, whose reduce-scatter is an
        all-reduce of a clone of its input, ``staging`` is all-reduced in place and this
        rank's part of it delivered. Across a replicate group the shard is then all-reduced.
        The averaged gradient has DDP's bits: see ``_scale_for``.
        """
        n = into.numel()
        self._count("reduce_scatter", staging)
        scale = self._scale_for(staging)
        if not self.distributed:
            return Handle(None, lambda: deliver(staging[:n], into, accumulate, scale))
        if self.in_place(staging.device):
            work = dist.all_reduce(staging, group=self.shard_group, async_op=async_op)
            result = staging[self.rank * n : (self.rank + 1) * n]
        else:
            direct = not accumulate and into.dtype == staging.dtype and scale == 1.0
            result = into if direct else staging.new_empty(n)
            work = _reduce_scatter(result, staging, dist.ReduceOp.SUM, self.shard_group, async_op)
        return Handle(work, lambda: self._finish_average(result, into, accumulate, scale))

    def average_in_place(self, buffer: torch.Tensor, async_op: bool) -> tuple[Handle, float]:
        """All-reduce ``buffer`` (DDP's own bucket, on gloo: see ``in_place``) over the shard
        group in place; returns the handle and the factor the caller applies to the parts it
        delivers (``_scale_for``)."""
        self._count("reduce_scatter", buffer)
        scale = self._scale_for(buffer)
        if not self.distributed:
            return Handle(None), scale
        return Handle(dist.all_reduce(buffer, group=self.shard_group, async_op=async_op)), scale

    def _scale_for(self, t: torch.Tensor) -> float:
        """Where the ``1 / dp_size`` of the average is applied, so that the result has the
        bits of DDP's reducer, which multiplies every gradient by ``1 / dp_size`` as it copies
        it into its bucket and then sums: for a power-of-two ``dp_size`` after the sum, on the
        delivered shard only (scaling by a power of two is exact, so it commutes with the
        sum); otherwise before the sum, by one pass over ``t``, exactly DDP's product.
        Returns the factor left to apply on delivery.

        The sum itself is always a plain SUM, on NCCL too: no ``PREMUL_SUM``, whose bf16/fp16
        form torch built wrongly before pytorch#190747 (the factor read as 2 bytes), whose
        factor is rounded to the reduce dtype (1/3 is 0.2% off in bf16), and which rules out
        NCCL's NVLS (NVSwitch) reductions."""
        if self.dp_size == 1:
            return 1.0
        if self.dp_size & (self.dp_size - 1) == 0:
            return 1.0 / self.dp_size
        t.mul_(1.0 / self.dp_size)
        return 1.0

    def _finish_average(
        self, result: torch.Tensor, into: torch.Tensor, accumulate: bool, scale: float
    ) -> None:
        if self.replicate_group is not None:
            self._count("all_reduce", result)
            dist.all_reduce(result, group=self.replicate_group)
        deliver(result, into, accumulate, scale)

    def all_gather_params(self, flat: torch.Tensor, async_op: bool) -> Handle:
        """All-gather a bucket in place: this rank's updated shard of ``flat`` (the buffer the
        parameters are views of) goes to every rank, the others' shards land in ``flat``.

        On NCCL one all-gather. On gloo one broadcast per shard from its owner, all in flight
        at once: gloo's all-gather collects into a buffer of its own and copies out, which
        costs more than the broadcasts (docs/performance.md). Either way the bytes land
        unchanged."""
        self._count("all_gather", flat)
        if not self.distributed:
            return Handle(None)
        n = flat.numel() // self.world_size
        shards = flat.view(self.world_size, n)
        if self.gloo_path(flat.device):
            return Handle(
                [
                    dist.broadcast(shards[i], src, group=self.shard_group, async_op=async_op)
                    for i, src in enumerate(self.shard_ranks)
                ]
            )
        work = _all_gather_single(
            flat, shards[self.rank], group=self.shard_group, async_op=async_op
        )
        return Handle(work)

    # ---- small agreements ----------------------------------------------------------------

    def all_reduce_(
        self, t: torch.Tensor, op: str = "sum", *, shard_only: bool = False
    ) -> torch.Tensor:
        """In-place all-reduce of a small tensor over the shard group, and the replicate group
        unless ``shard_only`` (use that for quantities that replicas hold identically)."""
        if not self.distributed:
            return t
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._count("all_reduce", t)
        dist.all_reduce(t, op=rop, group=self.shard_group)
        if self.replicate_group is not None and not shard_only:
            self._count("all_reduce", t)
            dist.all_reduce(t, op=rop, group=self.replicate_group)
        return t

    def all_gather_object(self, obj, device: torch.device) -> list:
        """Every data-parallel rank's ``obj`` (construction-time checks and checkpoints only).

        The pickled bytes travel in ``uint8`` tensors on ``device`` (the parameters'), not
        through ``dist.all_gather_object``, which on NCCL uses ``torch.cuda.current_device()``:
        cuda:0 on every rank whose script moved the model without ``torch.cuda.set_device``.
        """
        if not self.distributed:
            return [obj]
        groups = [self.shard_group] + ([self.replicate_group] if self.replicate_group else [])
        out = [obj]
        for group in groups:
            blobs = _all_gather_bytes(pickle.dumps(out), device, group)
            out = [x for blob in blobs for x in pickle.loads(blob)]
        return out

    def _count(self, kind: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size() * (2 if kind == "all_reduce" else 1)
        setattr(self.stats, kind, getattr(self.stats, kind) + n)
        self.stats.calls[kind] += 1

    def reset_stats(self) -> CommStats:
        """Return the counters so far and start new ones."""
        stats, self.stats = self.stats, CommStats()
        return stats


def deliver(result: torch.Tensor, into: torch.Tensor, accumulate: bool, scale: float) -> None:
    """Write an averaged shard, times ``scale``, into its destination (one kernel; nothing to
    do when the collective wrote it there)."""
    if result is into:
        return
    if accumulate:
        into.add_(result, alpha=scale)
    elif scale == 1.0:
        into.copy_(result)
    else:
        torch.mul(result, scale, out=into)


def _reduce_scatter(out, inp, op, group, async_op):
    return _reduce_scatter_single(out, inp, op=op, group=group, async_op=async_op)


class SideChannel:
    """A CPU gloo group over the shard group's ranks and a store mailbox, private to one
    optimizer: ``state_server`` moves state shards over it point to point, from a background
    thread, without touching the process group that training uses.

    Built at optimizer construction, collectively over the shard group only: shard rank 0's
    random name (shared through the construction-time ``all_gather_object``) and the group's
    global ranks make a store prefix no other optimizer, run or restart uses, and each member
    creates a ``ProcessGroupGloo`` under it. It is not registered with ``torch.distributed``,
    so ``destroy_process_group()`` neither waits for it nor destroys it under a serving thread.

    The mailbox uses two more client connections to the job's ``TCPStore`` where there is one,
    one for the serving thread's blocking waits and one for posting requests: a store client
    serialises its calls, and a thread blocked waiting for a request must not hold up another
    thread's store calls. With another kind of store it polls the default store.
    """

    TO_CALLER, TO_SERVER = 1, 2  # tags: server -> caller (header, data), caller -> server (go)

    def __init__(self, comm: Comm, timeout: float, device: torch.device):
        name = comm.all_gather_object(uuid.uuid4().hex, device)[0]
        self.ranks = dist.get_process_group_ranks(comm.shard_group)
        self.rank, self.size, self.timeout = comm.rank, comm.world_size, timeout
        prefix = f"sharded_adamw/{name}/{'_'.join(map(str, self.ranks))}"
        base = dist.distributed_c10d._get_default_store()
        self.pg = dist.ProcessGroupGloo(
            dist.PrefixStore(prefix + "/gloo", base),
            self.rank,
            self.size,
            datetime.timedelta(seconds=timeout),
        )
        tcp = base
        while isinstance(tcp, dist.PrefixStore):
            tcp = tcp.underlying_store
        self.blocking = isinstance(tcp, dist.TCPStore)

        def client() -> dist.Store:
            if not self.blocking:
                return dist.PrefixStore(prefix + "/mail", base)
            own = dist.TCPStore(
                tcp.host,
                tcp.port,
                is_master=False,
                timeout=datetime.timedelta(seconds=timeout),
                wait_for_workers=False,
            )
            return dist.PrefixStore(prefix + "/mail", own)

        self.inbox, self.outbox = client(), client()  # the serving thread's, the callers'

    def post(self, to: int, message: str) -> None:
        """Append ``message`` to shard rank ``to``'s mailbox."""
        n = self.outbox.add(f"{to}/n", 1)
        self.outbox.set(f"{to}/{n}", message)

    def take(self, n: int) -> str:
        """Message number ``n`` (from 1) of this rank's mailbox; blocks until it is there."""
        key = f"{self.rank}/{n}"
        while True:
            if self.blocking:
                try:
                    self.inbox.wait([key], datetime.timedelta(days=1))
                except dist.DistStoreError as e:
                    if "timeout" in str(e).lower():
                        continue
                    raise
            elif not self.inbox.check([key]):
                time.sleep(0.05)
                continue
            message = self.inbox.get(key).decode()
            self.inbox.delete_key(key)
            return message

    def send(self, t: torch.Tensor, to: int, tag: int) -> dist.Work:
        return self.pg.send([t], to, tag)

    def recv(self, t: torch.Tensor, src: int, tag: int) -> dist.Work:
        return self.pg.recv([t], src, tag)

    def wait(self, work: dist.Work) -> None:
        """Wait at most ``timeout`` seconds; raises on a timeout or a closed connection."""
        if not work.wait(datetime.timedelta(seconds=self.timeout)):
            raise TimeoutError(f"no answer within {self.timeout:g} s")


def completed_future(value: torch.Tensor) -> torch.futures.Future:
    """A future that is already done, for DDP comm hooks on backends without work futures."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def _all_gather_bytes(blob: bytes, device: torch.device, group) -> list[bytes]:
    """Every rank's ``blob``: one all-gather of the lengths, one of the blobs padded to the
    longest, both on ``device``."""
    world = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    _all_gather_single(sizes, size, group=group)
    lengths = sizes.tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    rows = torch.empty((world, max(lengths)), dtype=torch.uint8, device=device)
    _all_gather_single(rows.view(-1), padded, group=group)
    rows = rows.cpu()
    return [bytes(rows[r, :n].tolist()) for r, n in enumerate(lengths)]


def _backends_by_device(group) -> dict[str, str]:
    """Device type -> backend name for ``group``; the key "" stands for every device type.

    ``dist.get_backend`` names one backend only when the group was created with one:
    ``init_process_group()`` without a backend (what a plain torchrun script often writes)
    gives a group whose backend reads "undefined", with gloo for CPU tensors and NCCL for
    CUDA ones ("cpu:gloo,cuda:nccl" in ``get_backend_config``, torch 2.6 to 2.13). The fast
    paths here depend on which backend moves the tensors, so it is read per device."""
    name = str(dist.get_backend(group))
    config = getattr(dist, "get_backend_config", None)
    if config is None:  # pragma: no cover - torch without get_backend_config
        return {"": name}
    out = {}
    for entry in str(config(group)).split(","):
        device, _, backend = entry.strip().rpartition(":")
        out[device] = backend
    if name != "undefined":
        out.setdefault("", name)
    return out


def _is_device_mesh(obj) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        return False
    return isinstance(obj, DeviceMesh)
