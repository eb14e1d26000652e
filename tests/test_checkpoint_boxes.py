"""Issue 15: a rank's flat owned range of an N-D parameter as rectangular boxes (pure)."""

from __future__ import annotations

import math

import pytest
import torch

from sharded_adamw.checkpointing.boxes import flat_range_boxes
from sharded_adamw.core.layout import plan_buckets

SHAPES = [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (1, 1, 5), (2, 3, 4, 5), (5, 0, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_boxes_cover_exactly_the_flat_range_in_flat_order(shape):
    numel = math.prod(shape)
    index = torch.arange(numel).view(shape)
    for start in range(numel + 1):
        for end in range(start, numel + 1):
            boxes = flat_range_boxes(shape, start, end)
            at = start
            for box in boxes:
                assert box.start == at, (shape, start, end, boxes)
                cut = index[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))]
                assert torch.equal(cut.reshape(-1), torch.arange(box.start, box.end)), box
                at = box.end
            assert at == end
            assert len(boxes) <= 2 * len(shape) - 1, (shape, start, end, boxes)


def test_a_rows_aligned_range_is_one_box_and_a_ragged_one_three():
    assert [(b.offsets, b.sizes) for b in flat_range_boxes((6, 4), 8, 16)] == [((2, 0), (2, 4))]
    got = [(b.offsets, b.sizes) for b in flat_range_boxes((6, 4), 6, 19)]
    assert got == [((1, 2), (1, 2)), ((2, 0), (2, 4)), ((4, 0), (1, 3))]


def test_every_ranks_boxes_tile_the_parameter():
    """The optimizer's ownership (``layout.py``: contiguous shards of a bucket), turned into
    boxes, covers each element of every parameter once."""
    shapes = [(37, 13), (13, 29), (2, 3, 4, 5), (29,)]
    for world in (2, 3, 4, 7):
        params = [(i, (), math.prod(shape), 4) for i, shape in enumerate(shapes)]
        (layout,) = plan_buckets(params, world, 0, bucket_cap_bytes=1 << 30)
        for i, shape in enumerate(shapes):
            hits = torch.zeros(shape, dtype=torch.int64)
            for start, end in layout.ranges(i):
                for box in flat_range_boxes(shape, start, end):
                    hits[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] += 1
            assert bool((hits == 1).all()), (shape, world)


def test_a_scalar_is_one_empty_box_and_ranges_outside_raise():
    assert [(b.offsets, b.sizes, b.start, b.end) for b in flat_range_boxes((), 0, 1)] == [
        ((), (), 0, 1)
    ]
    assert flat_range_boxes((), 1, 1) == []
    with pytest.raises(ValueError, match=r"flat range \[3, 9\) is not inside a tensor of shape"):
        flat_range_boxes((2, 4), 3, 9)
