"""Which rank owns which elements of which parameter, and how parameters form buckets.

Pure arithmetic: nothing here touches a process group or allocates a tensor, so every rule can
be tested without processes.

Sharding rule (the same as ``torch.chunk`` on the flattened parameter, and as FSDP2 / DTensor
``Shard(0)``): a parameter of ``n`` elements on ``W`` ranks is cut into chunks of
``c = ceil(n / W)`` elements; rank ``r`` owns the flat range ``[min(r*c, n), min((r+1)*c, n))``.
Every rank reserves ``c`` elements for the parameter in its shard, so the last owning rank (and
any rank past the end) carries up to ``c`` elements of zero padding. Padding per parameter is
therefore at most ``W - 1`` elements, and ownership is balanced at element level, even for one
huge tensor.

Because the rule depends on nothing but ``n`` and ``W``, the layout of a parameter does not
depend on which bucket it lands in, nor on DDP's bucket order: any set of parameters can be
reduce-scattered together (chunk, concatenate rank-major, split) and each rank receives exactly
its chunks.

Buckets group consecutive parameters of one (param group, dtype, device) until the bucket's
full padded size would pass ``bucket_cap_bytes``; a parameter larger than the cap gets a bucket
of its own. A bucket's shard on a rank is the concatenation of its chunks of every parameter in
the bucket, in bucket order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def chunk_size(numel: int, world_size: int) -> int:
    """Elements each rank reserves for a parameter of ``numel`` elements."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return math.ceil(numel / world_size)


def owned_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Flat ``[start, end)`` of the parameter that ``rank`` owns (empty past the end)."""
    c = chunk_size(numel, world_size)
    return min(rank * c, numel), min((rank + 1) * c, numel)


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter's chunk sits inside its bucket's shard on every rank."""

    index: int  # position of the parameter in the optimizer's flat parameter list
    numel: int
    chunk: int  # elements reserved per rank
    offset: int  # start of this parameter's chunk inside the bucket shard
    start: int  # this rank's owned flat range of the parameter
    end: int

    @property
    def owned(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketLayout:
    """A run of parameters reduce-scattered, updated and all-gathered together."""

    key: tuple  # (param group index, dtype, device) shared by every slot
    slots: tuple[ParamSlot, ...]
    world_size: int

    @property
    def shard_numel(self) -> int:
        """Elements of the bucket's shard on every rank (padding included)."""
        return sum(s.chunk for s in self.slots)

    @property
    def padded_numel(self) -> int:
        """Elements of the bucket's full reduce-scatter input / all-gather output."""
        return self.shard_numel * self.world_size

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)


def plan_buckets(
    params: Sequence[tuple[int, tuple, int, int]],
    world_size: int,
    rank: int,
    bucket_cap_bytes: int,
) -> list[BucketLayout]:
    """Cut parameters into buckets and place each parameter's chunk.

    ``params`` lists ``(index, key, numel, element_size)`` in the order buckets should be
    filled; parameters with different keys never share a bucket, and a key change always
    starts a new bucket so that buckets stay in the given order.
    """
    if bucket_cap_bytes <= 0:
        raise ValueError(f"bucket_cap_bytes must be positive, got {bucket_cap_bytes}")
    buckets: list[BucketLayout] = []
    slots: list[ParamSlot] = []
    key = None
    used = 0
    for index, pkey, numel, elem in params:
        chunk = chunk_size(numel, world_size)
        size = chunk * world_size * elem
        if slots and (pkey != key or used + size > bucket_cap_bytes):
            buckets.append(BucketLayout(key, tuple(slots), world_size))
            slots, used = [], 0
        key = pkey
        start, end = owned_range(numel, world_size, rank)
        offset = sum(s.chunk for s in slots)
        slots.append(ParamSlot(index, numel, chunk, offset, start, end))
        used += size
    if slots:
        buckets.append(BucketLayout(key, tuple(slots), world_size))
    return buckets
