"""Every ``torch.distributed`` call of the library, with its copy-in and copy-out.

Nothing else in the package calls a collective. ``Comm`` resolves what the user passed as
``process_group`` (nothing, a ``ProcessGroup``, or a 2-D ``DeviceMesh`` named
``("replicate", "shard")``), counts the bytes each collective moves, and degrades to local
copies when there is a single process and no initialised group.

``reduce_scatter_single`` and ``all_gather_single`` are torch 2.13's names for
``reduce_scatter_tensor`` and ``all_gather_into_tensor`` (the old names warn there).

Byte counts: a reduce-scatter counts its full input, an all-gather its full output, and an
all-reduce twice its buffer, because a ring all-reduce is a reduce-scatter followed by an
all-gather and sends as much as both. With these, one step of sharded AdamW counts
``P * elem`` for the reduce-scatter and ``P * elem`` for the all-gather (plus padding): the
``2 * P * elem`` that DDP's all-reduce of the same gradients counts.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
    """An in-flight collective; ``wait()`` blocks, then runs the follow-up once."""

    def __init__(self, work: dist.Work | None, then: Callable[[], None] | None = None):
        self._work = work
        self._then = then

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
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
            self.world_size, self.rank, self.backend = 1, 0, "local"
        else:
            self.world_size = dist.get_world_size(self.shard_group)
            self.rank = dist.get_rank(self.shard_group)
            self.backend = str(dist.get_backend(self.shard_group))
        self.replicas = (
            1 if self.replicate_group is None else dist.get_world_size(self.replicate_group)
        )
        self.dp_size = self.world_size * self.replicas
        self.global_rank = dist.get_rank() if self.shard_group is not None else 0
        self.stats = CommStats()

    @property
    def distributed(self) -> bool:
        return self.shard_group is not None

    # ---- the data path -------------------------------------------------------------------

    @property
    def in_place(self) -> bool:
        """Whether gradients are averaged by an in-place all-reduce of the whole buffer.

        gloo runs a reduce-scatter as a clone of its whole input plus an all-reduce, and a
        shard of the all-reduce has the same bits as the reduce-scatter's; all-reducing the
        buffer in place therefore gives the same result without the clone. NCCL has a real
        reduce-scatter, which moves half the bytes."""
        return self.backend == "gloo"

    def reduce_scatter_grads(
        self,
        grads: Sequence[torch.Tensor],
        staging: torch.Tensor,
        into: torch.Tensor,
        accumulate: bool,
        async_op: bool,
    ) -> Handle:
        """Average ``grads`` over all data-parallel ranks into this rank's shard ``into``
        (added to it when ``accumulate``); ``wait()`` on the handle delivers.

        Copy-in: each gradient is flattened, cut into ``world_size`` chunks (zero padded), and
        the chunks are laid out rank-major in ``staging`` (``world_size x shard``, the reduce
        dtype, owned by the caller, who must not reuse it before ``wait()``). Every element is
        multiplied by ``1 / dp_size`` before the sum, exactly as DDP's reducer does, so that
        the averaged gradient has DDP's bits: on NCCL inside the collective (``premul_sum``),
        elsewhere by one pass over ``staging``. Across a replicate group the shard is then
        all-reduced.
        """
        flat = [g.reshape(-1) for g in grads]
        torch._chunk_cat(flat, 0, self.world_size, out=staging)
        self._count("reduce_scatter", staging)
        if not self.distributed:
            return Handle(None, lambda: _deliver(staging[0], into, accumulate))
        if self.in_place:
            self._scale(staging)
            work = dist.all_reduce(staging, group=self.shard_group, async_op=async_op)
            result = staging[self.rank]
        else:
            direct = not accumulate and into.dtype == staging.dtype
            result = into if direct else staging.new_empty(staging.shape[1])
            work = _reduce_scatter(
                result, staging.view(-1), self._average_op(staging), self.shard_group, async_op
            )
        return Handle(work, lambda: self._finish_average(result, into, accumulate))

    def average_in_place(self, buffer: torch.Tensor, async_op: bool) -> Handle:
        """Average ``buffer`` over the shard group in place (an all-reduce; for DDP's own bucket
        buffers on gloo, see ``in_place``), scaled before the sum as DDP's reducer does."""
        self._count("reduce_scatter", buffer)
        if not self.distributed:
            return Handle(None)
        self._scale(buffer)
        return Handle(dist.all_reduce(buffer, group=self.shard_group, async_op=async_op))

    def _scale(self, t: torch.Tensor) -> None:
        if self.dp_size > 1:
            t.mul_(1.0 / self.dp_size)

    def _average_op(self, staging: torch.Tensor):
        """The reduce op that averages: NCCL folds the ``1 / dp_size`` factor into the sum;
        other backends get a scaling pass over ``staging`` first, then a sum."""
        if self.backend == "nccl" and self.dp_size > 1 and hasattr(dist, "_make_nccl_premul_sum"):
            return dist._make_nccl_premul_sum(1.0 / self.dp_size)
        self._scale(staging)
        return dist.ReduceOp.SUM

    def _finish_average(self, result: torch.Tensor, into: torch.Tensor, accumulate: bool) -> None:
        if self.replicate_group is not None:
            self._count("all_reduce", result)
            dist.all_reduce(result, group=self.replicate_group)
        _deliver(result, into, accumulate)

    def all_gather_params(
        self, gathered: torch.Tensor, copy_out: Callable[[], None], async_op: bool
    ) -> Handle:
        """All-gather the bucket whose updated shard sits in ``gathered[rank]`` (in place:
        ``gathered`` is ``world_size x shard``), then run ``copy_out`` to write it into the
        parameters."""
        self._count("all_gather", gathered)
        if not self.distributed:
            return Handle(None, copy_out)
        work = dist.all_gather_single(
            gathered.view(-1), gathered[self.rank], group=self.shard_group, async_op=async_op
        )
        return Handle(work, copy_out)

    def gather_shard(self, shard: torch.Tensor) -> torch.Tensor:
        """The ``(world_size, numel)`` stack of every shard rank's ``shard`` (for state dicts)."""
        out = torch.empty((self.world_size, shard.numel()), dtype=shard.dtype, device=shard.device)
        if not self.distributed:
            out[0].copy_(shard)
            return out
        dist.all_gather_single(out.view(-1), shard.contiguous(), group=self.shard_group)
        return out

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


def _deliver(result: torch.Tensor, into: torch.Tensor, accumulate: bool) -> None:
    """Write an averaged shard into its destination (nothing to do when it already is it)."""
    if result is into:
        return
    if accumulate:
        into.add_(result)
    else:
        into.copy_(result)


def _reduce_scatter(out, inp, op, group, async_op):
    """``reduce_scatter_single`` (torch >= 2.13's name) or ``reduce_scatter_tensor``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, op=op, group=group, async_op=async_op)


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
    dist.all_gather_single(sizes, size, group=group)
    lengths = sizes.tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    rows = torch.empty((world, max(lengths)), dtype=torch.uint8, device=device)
    dist.all_gather_single(rows.view(-1), padded, group=group)
    rows = rows.cpu()
    return [bytes(rows[r, :n].tolist()) for r, n in enumerate(lengths)]


def _is_device_mesh(obj) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without DeviceMesh
        return False
    return isinstance(obj, DeviceMesh)
