"""How parameters form buckets, where each parameter lives in its bucket, and which rank owns
which elements.

Pure arithmetic: nothing here touches a process group or allocates a tensor, so every rule can
be tested without processes.

A bucket is one flat buffer: its parameters one after the other, in bucket order, each
starting at a multiple of ``align`` elements (zero padding between them), then zero padding up
to ``W`` shards of ``S`` elements, ``S`` a multiple of ``align`` too (``W`` the world size).
Rank ``r`` owns ``[r * S, (r + 1) * S)`` of the bucket (the tail padding sits at the end of
the last ranks' shards). Padding per bucket: under ``align`` elements per parameter, plus
under ``W * align`` at the end.

``align`` is ``ALIGN_BYTES`` of the device over the element size: every parameter, and every
shard, then starts where a tensor of its own would (torch's CPU allocator aligns to 64 bytes,
its CUDA allocator to 512, and cuBLASLt picks kernels by alignment up to 256 bytes). Kernels
read a misaligned tensor otherwise: BLAS took another path and gave other bits for a
parameter inside a bucket than for the same values alone (a forward that differed from
``torch.optim.AdamW``'s run in the last bit); Inductor decides alignment from
``storage_offset`` (0 for a parameter here, whatever its address) and would emit aligned
loads for a misaligned pointer; fused and vectorised kernels take slower tails. And a shard
boundary that falls inside a parameter falls at a multiple of ``align`` of it, so the part of
the parameter past it keeps its vector lanes. The optimizer keeps the parameters as views of
this buffer, so:

- the all-gather of the shards writes the parameters themselves (no copy-out);
- the update runs in place on the owned shard, a contiguous slice of the buffer (no cat);
- the reduce-scatter input is the gradients laid out the same way, one copy-in at most.

A parameter's owned part on a rank is therefore one contiguous flat range ``[start, end)`` of
the parameter (empty where the rank's shard does not reach it); over the ranks these ranges
partition the parameter in rank order. A parameter may be split over several ranks, or lie
within one rank's shard entirely: ownership depends on the bucket a parameter lands in, which
every rank plans identically from the parameter list and the bucket cap.

Buckets group consecutive parameters of one (param group, dtype, device) until the bucket's
size would pass ``bucket_cap_bytes``; a parameter larger than the cap gets a bucket of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Bytes every parameter's and shard's start is aligned to, by device type (see above).
ALIGN_BYTES = {"cuda": 256}
DEFAULT_ALIGN_BYTES = 64


def align_elements(device_type: str, element_size: int) -> int:
    """Elements of ``element_size`` bytes that make ``ALIGN_BYTES`` on ``device_type``."""
    return max(ALIGN_BYTES.get(device_type, DEFAULT_ALIGN_BYTES) // element_size, 1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shard_size(numel: int, world_size: int) -> int:
    """Elements of each rank's shard of a bucket of ``numel`` elements (``ceil(numel / W)``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return -(-numel // world_size)


def owned_range(base: int, numel: int, shard: int, rank: int) -> tuple[int, int]:
    """The flat ``[start, end)`` of a parameter of ``numel`` elements that starts at ``base``
    in its bucket, owned by ``rank`` when every shard has ``shard`` elements (empty, with
    ``start == end``, where the rank's shard does not reach the parameter)."""
    lo = min(max(rank * shard - base, 0), numel)
    hi = min(max((rank + 1) * shard - base, lo), numel)
    return lo, hi


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter sits in its bucket, and what of it this rank owns."""

    index: int  # position of the parameter in the optimizer's flat parameter list
    numel: int
    base: int  # start of the parameter in the bucket's flat buffer
    start: int  # this rank's owned flat range of the parameter
    end: int
    offset: int  # where that range starts in this rank's shard

    @property
    def owned(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketLayout:
    """A run of parameters reduce-scattered, updated and all-gathered together."""

    key: tuple  # (param group index, dtype, device) shared by every slot
    slots: tuple[ParamSlot, ...]
    world_size: int
    align: int = 1  # elements every parameter's start and the shard size are multiples of

    @property
    def numel(self) -> int:
        """Elements of the parameters (padding excluded)."""
        return sum(s.numel for s in self.slots)

    @property
    def span(self) -> int:
        """Elements from the bucket's start to the end of its last parameter."""
        last = self.slots[-1]
        return last.base + last.numel

    @property
    def shard_numel(self) -> int:
        """Elements of the bucket's shard on every rank (padding included)."""
        return _round_up(shard_size(self.span, self.world_size), self.align)

    @property
    def padded_numel(self) -> int:
        """Elements of the bucket's flat buffer: parameters and padding."""
        return self.shard_numel * self.world_size

    def gaps(self) -> list[tuple[int, int]]:
        """The ``[start, end)`` stretches of the buffer that no parameter covers (the padding
        before each aligned parameter and at the end), in order."""
        out, end = [], 0
        for s in self.slots:
            if s.base > end:
                out.append((end, s.base))
            end = s.base + s.numel
        if self.padded_numel > end:
            out.append((end, self.padded_numel))
        return out

    def ranges(self, i: int) -> list[tuple[int, int]]:
        """Every rank's owned flat range of slot ``i``'s parameter, in rank order."""
        s, shard = self.slots[i], self.shard_numel
        return [owned_range(s.base, s.numel, shard, r) for r in range(self.world_size)]


def plan_buckets(
    params: Sequence[tuple[int, tuple, int, int]],
    world_size: int,
    rank: int,
    bucket_cap_bytes: int,
    align: Callable[[tuple], int] | int = 1,
) -> list[BucketLayout]:
    """Cut parameters into buckets and place each parameter in its bucket.

    ``params`` lists ``(index, key, numel, element_size)`` in the order buckets should be
    filled; parameters with different keys never share a bucket, and a key change always
    starts a new bucket so that buckets stay in the given order. ``align``: the alignment in
    elements (see the module docstring), or a function of the key that gives it.
    """
    if bucket_cap_bytes <= 0:
        raise ValueError(f"bucket_cap_bytes must be positive, got {bucket_cap_bytes}")
    shard_size(1, world_size)  # checks world_size
    runs: list[tuple[tuple, list[tuple[int, int]]]] = []
    used = 0
    for index, key, numel, elem in params:
        if not runs or key != runs[-1][0] or used + numel * elem > bucket_cap_bytes:
            runs.append((key, []))
            used = 0
        runs[-1][1].append((index, numel))
        used += numel * elem
    buckets = []
    for key, members in runs:
        a = align(key) if callable(align) else align
        bases, base = [], 0
        for _, numel in members:
            bases.append(base)
            base = _round_up(base + numel, a)
        span = bases[-1] + members[-1][1]
        shard = _round_up(shard_size(span, world_size), a)
        slots = []
        for (index, numel), base in zip(members, bases):
            start, end = owned_range(base, numel, shard, rank)
            offset = base + start - rank * shard
            slots.append(ParamSlot(index, numel, base, start, end, min(max(offset, 0), shard)))
        buckets.append(BucketLayout(key, tuple(slots), world_size, a))
    return buckets
