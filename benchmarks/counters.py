"""Counting what a step holds, sends and copies: the bytes of the storages behind tensors, each
once; the collectives dispatched with the bytes they move (``CommCounter``); and the bytes that
copy, cat, scale and fill kernels read and write (``CopyCounter``, over ``DATA_MOVEMENT_OPS``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields, is_dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ADAMW_BYTES_PER_ELEMENT = 28  # fp32 AdamW reads param, grad, exp_avg, exp_avg_sq; writes three


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensors_in(obj, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor inside ``obj``: lists, tuples, sets, dict values and dataclass fields,
    ``depth`` levels down (for peers' internal buffers)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in fields(obj)]
    if isinstance(obj, list | tuple | set):
        return [t for x in obj for t in tensors_in(x, depth - 1)]
    return []


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors``, each storage once: a view (a parameter inside
    a flat buffer, a state slice) counts its whole storage, and a storage already in ``seen``
    (counted under another heading) counts nothing. ``seen`` is updated."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = _local(t).untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


# Which argument of each c10d op holds the data, and how many times its bytes are counted.
# The rule is collectives.py's: a reduce-scatter counts its full input, an all-gather its
# full output, an all-reduce twice its buffer (a ring all-reduce sends as much as a
# reduce-scatter and an all-gather); any other data collective counts its first argument.
_COLLECTIVE_DATA = {
    "allreduce_": (0, 2),
    "allreduce_coalesced_": (0, 2),
    "_reduce_scatter_base_": (1, 1),
    "reduce_scatter_": (1, 1),
    "reduce_scatter_tensor_coalesced_": (1, 1),
    "_allgather_base_": (0, 1),
    "allgather_": (0, 1),
    "allgather_coalesced_": (0, 1),
    "allgather_into_tensor_coalesced_": (0, 1),
    "alltoall_": (1, 1),
    "alltoall_base_": (1, 1),
    "gather_": (1, 1),
}
_NOT_DATA = {"barrier", "monitored_barrier_", "check_for_nan"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(y) for y in x)
    return 0


def collective_bytes(op: str, args: tuple) -> int | None:
    """Bytes counted for one call of the c10d op named ``op`` (e.g. ``allreduce_``) with the
    op's positional ``args``; None for ops that move no data (barriers)."""
    if op in _NOT_DATA:
        return None
    index, times = _COLLECTIVE_DATA.get(op, (0, 1))
    return times * _nbytes(args[index]) if len(args) > index else 0


class CommCounter(TorchDispatchMode):
    """Counts the c10d collectives dispatched while active and the bytes they move.

    Every collective of torch.distributed reaches the dispatcher as a ``c10d`` op, whether it
    comes from Python (ZeroRedundancyOptimizer, DeepSpeed, FSDP2, ShardedAdamW) or from C++
    (DDP's reducer), so one rule counts every contender. A dispatch mode routes every op
    through Python, which is why it is only active during the unmeasured probe step."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            n = collective_bytes(func.overloadpacket.__name__, args)
            if n is not None:
                self.bytes += n
                self.calls += 1
        return func(*args, **(kwargs or {}))


# ---- bytes copied ------------------------------------------------------------------------------

aten = torch.ops.aten
READS_ALL, READS_SOURCES, READS_NONE = "all", "sources", "none"

# The data-movement kernels counted by ``CopyCounter``, and which tensor arguments each reads:
# all of them (``cat``, ``mul_``: an in-place op reads what it rewrites), all but the first (the
# destination of a copy is only written), or none (a fill writes, it reads no data). ``out=``
# arguments are only written, whatever the op.
DATA_MOVEMENT_OPS = {
    aten.copy_: READS_SOURCES,
    aten._foreach_copy_: READS_SOURCES,
    aten._to_copy: READS_ALL,
    aten.clone: READS_ALL,
    aten.cat: READS_ALL,
    aten._chunk_cat: READS_ALL,
    aten.stack: READS_ALL,
    aten.mul: READS_ALL,
    aten.mul_: READS_ALL,
    aten.div: READS_ALL,
    aten.div_: READS_ALL,
    aten.add: READS_ALL,
    aten.add_: READS_ALL,
    aten._foreach_mul: READS_ALL,
    aten._foreach_mul_: READS_ALL,
    aten._foreach_div_: READS_ALL,
    aten._foreach_add: READS_ALL,
    aten._foreach_add_: READS_ALL,
    aten._amp_foreach_non_finite_check_and_unscale_: READS_ALL,
    aten.zero_: READS_NONE,
    aten.fill_: READS_NONE,
    aten.zeros: READS_NONE,
    aten.zeros_like: READS_NONE,
}


def moved_bytes(func, args: tuple, kwargs: dict, out) -> int:
    """Bytes one call of a ``DATA_MOVEMENT_OPS`` kernel reads and writes: the tensor arguments
    it reads (per the table), plus the arguments it writes in place or ``out=``, or else the
    tensors it returns."""
    reads = DATA_MOVEMENT_OPS[func.overloadpacket]
    read = written = 0
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        writes = arg.alias_info is not None and arg.alias_info.is_write
        if writes:
            written += _nbytes(value)
        if not arg.is_out and (reads == READS_ALL or (reads == READS_SOURCES and i > 0)):
            read += _nbytes(value)
    if not any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        written = _nbytes(out)
    return read + written


class CopyCounter(TorchDispatchMode):
    """Counts the bytes ``DATA_MOVEMENT_OPS`` kernels move while active, per op name; nothing
    while ``paused`` (``copies.update_excluded`` pauses it inside the AdamW update, whose own
    traffic is counted apart, in ``update_elements`` and ``update_bytes``).

    A dispatch mode sees every aten op dispatched while it is active, from Python or from C++:
    DDP's reducer copying each gradient into its bucket is counted (checked on CPU, where
    backward runs on the caller's thread). Kernels that a backend runs on its own threads
    (gloo's internal copies) are not seen."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, int] = {}
        self.paused = 0
        self.update_elements = 0
        self.update_bytes = 0

    @property
    def bytes(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused and func.overloadpacket in DATA_MOVEMENT_OPS:
            name = func.overloadpacket.__name__
            self.by_op[name] = self.by_op.get(name, 0) + moved_bytes(func, args, kwargs, out)
        return out
