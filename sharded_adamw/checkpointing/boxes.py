"""A flat range of an N-D tensor as a few rectangular boxes.

A rank owns the flat range ``[start, end)`` of a parameter (``layout.owned_range``). Checkpoints
that other systems read (``torch.distributed.checkpoint`` with parameter-shaped tensors) record
every piece as a box: an offset and a size in each dimension. A flat range of a row-major tensor
is at most ``2 * ndim - 1`` boxes: per dimension from the outermost in, a partial block at the
start, a run of whole blocks, and a partial block at the end, where the partial blocks recurse
one dimension in. Each box is contiguous in flat order, so it is a view of the rank's flat
state (``flat[box.start - start : box.end - start].view(box.sizes)``): nothing is copied.

Pure arithmetic, tested without processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """One rectangular piece of a tensor: ``offsets`` and ``sizes`` per dimension, and the
    flat range ``[start, end)`` it covers."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int

    @property
    def end(self) -> int:
        return self.start + math.prod(self.sizes)


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> list[Box]:
    """The boxes, in flat order, that cover exactly the flat range ``[start, end)`` of a
    row-major tensor of ``shape``."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if not 0 <= start <= end <= numel:
        raise ValueError(f"flat range [{start}, {end}) is not inside a tensor of shape {shape}")
    if start == end:
        return []
    if not shape:
        return [Box((), (), 0)]
    return _boxes(shape, start, end, (), 0)


def _boxes(shape: tuple[int, ...], start: int, end: int, prefix: tuple, base: int) -> list[Box]:
    """Boxes of ``[start, end)`` (non-empty, relative to ``base``) inside the sub-tensor of
    ``shape`` at outer index ``prefix``."""
    inner = math.prod(shape[1:])
    tail, ones = (0,) * (len(shape) - 1), (1,) * len(prefix)
    first, last = start // inner, end // inner  # rows holding start and end
    if len(shape) == 1 or start % inner == 0 and end % inner == 0:
        return [Box((*prefix, first, *tail), (*ones, last - first, *shape[1:]), base + start)]
    if first == last:  # inside one row
        return _boxes(shape[1:], start % inner, end % inner, (*prefix, first), base + first * inner)
    out = []
    if start % inner:  # the rest of the first row
        row = first * inner
        out += _boxes(shape[1:], start - row, inner, (*prefix, first), base + row)
        first += 1
    if first < last:  # whole rows
        sizes = (*ones, last - first, *shape[1:])
        out.append(Box((*prefix, first, *tail), sizes, base + first * inner))
    if end % inner:  # the start of the last row
        row = last * inner
        out += _boxes(shape[1:], 0, end - row, (*prefix, last), base + row)
    return out
