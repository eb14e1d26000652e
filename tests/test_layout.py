"""The bucket layout and the ownership rule (``layout.py``), without processes."""

import pytest

from sharded_adamw import owned_range, plan_buckets, shard_size


@pytest.mark.parametrize("sizes", [[1], [5, 7, 64], [481, 1, 1000, 3], [10_000_001]])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_each_bucket_is_cut_into_equal_contiguous_shards_with_under_w_padding(sizes, world):
    params = [(i, (), n, 4) for i, n in enumerate(sizes)]
    (bucket,) = plan_buckets(params, world, 0, bucket_cap_bytes=1 << 40)
    assert bucket.numel == sum(sizes)
    assert bucket.padded_numel == bucket.shard_numel * world
    assert 0 <= bucket.padded_numel - bucket.numel <= world - 1
    base = 0
    for s in bucket.slots:  # parameters one after the other, in the given order
        assert s.base == base
        base += s.numel


@pytest.mark.parametrize("sizes", [[1], [5, 7, 64], [481, 1, 1000, 3], [13, 29, 13, 37]])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_the_ranks_owned_ranges_partition_every_parameter_in_rank_order(sizes, world):
    params = [(i, (), n, 4) for i, n in enumerate(sizes)]
    per_rank = [plan_buckets(params, world, r, 1 << 40)[0] for r in range(world)]
    layout = per_rank[0]
    S = layout.shard_numel
    for i, n in enumerate(sizes):
        ranges = layout.ranges(i)
        assert [r for s, e in ranges for r in range(s, e)] == list(range(n))
        for rank, (s, e) in enumerate(ranges):
            slot = per_rank[rank].slots[i]
            assert (slot.start, slot.end) == (s, e)
            if e > s:  # the owned elements sit in that rank's shard where the bucket has them
                assert slot.offset == slot.base + s - rank * S
                assert 0 <= slot.offset and slot.offset + slot.owned <= S


def test_owned_range_clips_to_the_parameter():
    # a bucket of 10 elements on 4 ranks: shards of 3; a parameter at [4, 9)
    assert [owned_range(4, 5, 3, r) for r in range(4)] == [(0, 0), (0, 2), (2, 5), (5, 5)]
    assert shard_size(10, 4) == 3


def test_buckets_respect_cap_and_keys():
    params = [(i, ("g0",) if i < 4 else ("g1",), 100 + i, 4) for i in range(6)]
    buckets = plan_buckets(params, world_size=3, rank=1, bucket_cap_bytes=1300)
    assert [[s.index for s in b.slots] for b in buckets] == [[0, 1, 2], [3], [4, 5]]


def test_a_parameter_larger_than_the_cap_gets_its_own_bucket():
    buckets = plan_buckets([(0, (), 10, 4), (1, (), 10_000, 4), (2, (), 10, 4)], 2, 0, 100)
    assert [[s.index for s in b.slots] for b in buckets] == [[0], [1], [2]]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="world_size"):
        shard_size(5, 0)
    with pytest.raises(ValueError, match="world_size"):
        plan_buckets([(0, (), 5, 4)], 0, 0, 100)
    with pytest.raises(ValueError, match="bucket_cap_bytes"):
        plan_buckets([(0, (), 5, 4)], 2, 0, 0)


@pytest.mark.parametrize("sizes", [[1], [5, 7, 64], [481, 1, 1000, 3], [13, 29, 13, 37]])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("align", [4, 16, 64])
def test_aligned_layout_starts_every_parameter_and_shard_on_the_alignment(sizes, world, align):
    """Every parameter's start and the shard size are multiples of ``align``; the padding
    (``gaps``) is exactly what no parameter covers; the ranks' ranges still partition each
    parameter; a shard boundary inside a parameter falls at a multiple of ``align`` of it."""
    params = [(i, (), n, 4) for i, n in enumerate(sizes)]
    per_rank = [plan_buckets(params, world, r, 1 << 40, align)[0] for r in range(world)]
    layout = per_rank[0]
    assert layout.shard_numel % align == 0
    covered = [0] * layout.padded_numel
    for s in layout.slots:
        assert s.base % align == 0
        for k in range(s.base, s.base + s.numel):
            covered[k] += 1
    for a, b in layout.gaps():
        for k in range(a, b):
            covered[k] += 1
    assert covered == [1] * layout.padded_numel
    assert layout.padded_numel - layout.numel < align * (len(sizes) + world)
    for i, n in enumerate(sizes):
        ranges = layout.ranges(i)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
            assert hi == lo and (lo % align == 0 or lo in (0, n))  # n: empty ranges after it


def test_alignment_follows_the_device_and_dtype():
    from sharded_adamw.core.layout import align_elements

    assert align_elements("cpu", 4) == 16  # 64 bytes, torch's CPU allocator alignment
    assert align_elements("cpu", 2) == 32
    assert align_elements("cuda", 4) == 64  # 256 bytes
    assert align_elements("cpu", 8) == 8
