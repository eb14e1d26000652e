"""The ownership rule and bucket planning, without processes."""

import pytest
import torch

from sharded_adamw import chunk_size, owned_range, plan_buckets


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 7, 64, 481, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_owned_ranges_partition_the_parameter_like_torch_chunk(numel, world):
    ranges = [owned_range(numel, world, r) for r in range(world)]
    chunks = torch.arange(numel).chunk(world)
    covered = [i for s, e in ranges for i in range(s, e)]
    assert covered == list(range(numel))
    for r, (s, e) in enumerate(ranges):
        assert e - s <= chunk_size(numel, world)
        if r < len(chunks):
            assert (s, e) == (chunks[r][0].item(), chunks[r][-1].item() + 1)


def test_one_huge_tensor_splits_evenly():
    sizes = [owned_range(10_000_001, 4, r) for r in range(4)]
    owned = [e - s for s, e in sizes]
    assert max(owned) - min(owned) <= 3


def test_buckets_respect_cap_and_keys_and_place_chunks_contiguously():
    params = [(i, ("g0",) if i < 4 else ("g1",), 100 + i, 4) for i in range(6)]
    buckets = plan_buckets(params, world_size=3, rank=1, bucket_cap_bytes=1300)
    assert [[s.index for s in b.slots] for b in buckets] == [[0, 1, 2], [3], [4, 5]]
    for b in buckets:
        offset = 0
        for s in b.slots:
            assert s.offset == offset and s.chunk == chunk_size(s.numel, 3)
            assert (s.start, s.end) == owned_range(s.numel, 3, 1)
            offset += s.chunk
        assert b.padded_numel == 3 * b.shard_numel


def test_a_parameter_larger_than_the_cap_gets_its_own_bucket():
    buckets = plan_buckets([(0, (), 10, 4), (1, (), 10_000, 4), (2, (), 10, 4)], 2, 0, 100)
    assert [[s.index for s in b.slots] for b in buckets] == [[0], [1], [2]]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="world_size"):
        chunk_size(5, 0)
    with pytest.raises(ValueError, match="bucket_cap_bytes"):
        plan_buckets([(0, (), 5, 4)], 2, 0, 0)
