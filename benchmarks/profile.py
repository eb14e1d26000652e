"""``--profile``: where a training step's time goes, per contender, from ``torch.profiler``.

For each size and each of ``PROFILED`` (DDP + AdamW, ShardedAdamW standalone and attached,
built by the contender builders of ``contenders``), one contender at a time: ``warmup``
unmeasured steps, ``steps`` timed steps without the profiler (its overhead is not free, so
the two wall times say how far the profiled split can be trusted), then ``steps`` timed steps
under ``torch.profiler`` (CPU activity, CUDA too on a GPU). This driver wraps each step's parts
in its own ranges (``bench.forward``, ``bench.backward``, ``bench.step``: optimizer step plus
``zero_grad``), so the split shows next to the library's ranges.

Every row is milliseconds per step:

- wall: ``time.perf_counter`` around forward, backward and step after a barrier, each step the
  slowest rank's, averaged over the steps;
- ranges: total CPU time (children included) of every ``record_function`` range whose name
  starts with one of ``RANGE_PREFIXES``, found by name, so a range the library adds later
  shows up without a change here. Ranges nest (``bench.backward`` holds the reduce-scatter
  launches of standalone ShardedAdamW, ``bench.step`` the update), so rows do not add up;
- ops: self CPU time (children excluded) of the copy-like aten ops of ``COPY_OPS``, wherever
  they ran (inside the model, DDP or the optimizer), on the threads the profiler sees
  (not gloo's own worker threads).

Each range and op row is the largest rank's figure; the table says so.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from .contenders import CONTENDERS, Trainer

PROFILED = ["DDP + AdamW", "ShardedAdamW (standalone)", "ShardedAdamW (attach)"]
RANGE_PREFIXES = ("bench.", "sharded_adamw.", "DistributedDataParallel.")
COPY_OPS = (
    "aten::copy_",
    "aten::cat",
    "aten::_chunk_cat",
    "aten::clone",
    "aten::mul",
    "aten::mul_",
    "aten::_foreach_copy_",
    "aten::_foreach_mul_",
    "aten::add_",
    "aten::_foreach_add_",
)


@dataclass
class Profile:
    """One contender's figures on this rank: step wall times in seconds, unprofiled and
    profiled, and per row name (a range or an op) its CPU microseconds and call count summed
    over the profiled steps (device microseconds too on a GPU)."""

    name: str
    steps: int
    wall: list[float] = field(default_factory=list)
    wall_profiled: list[float] = field(default_factory=list)
    ranges: dict[str, tuple[float, int, float]] = field(default_factory=dict)
    ops: dict[str, tuple[float, int, float]] = field(default_factory=dict)


def _timed_step(t: Trainer, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """One training step inside the ``bench.*`` ranges, after a barrier; its seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    with record_function("bench.forward"):
        loss = nn.functional.cross_entropy(t.net(x).float().flatten(0, 1), y.flatten())
    with record_function("bench.backward"):
        t.backward(loss)
    with record_function("bench.step"):
        t.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def profile_one(
    name: str,
    make: Callable[[nn.Module, torch.device], Trainer],
    base: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
) -> Profile:
    """Warm up, time ``steps`` steps without and ``steps`` under the profiler, cycling through
    ``batches``, for the contender ``make`` builds on a copy of ``base``. Collective."""
    t = make(copy.deepcopy(base).to(device), device)
    batch = lambda i: batches[i % len(batches)]  # noqa: E731
    for i in range(warmup):
        _timed_step(t, *batch(i), device)
    out = Profile(name, steps)
    out.wall = [_timed_step(t, *batch(warmup + i), device) for i in range(steps)]
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        out.wall_profiled = [_timed_step(t, *batch(warmup + i), device) for i in range(steps)]
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", 0.0)
        if e.key.startswith(RANGE_PREFIXES):
            out.ranges[e.key] = (e.cpu_time_total, e.count, device_us)
        elif e.key in COPY_OPS:
            self_device = getattr(e, "self_device_time_total", 0.0)
            out.ops[e.key] = (e.self_cpu_time_total, e.count, self_device)
    return out


def profile_all(
    base: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    warmup: int,
    steps: int,
    device: torch.device,
    names: list[str],
) -> list[list[Profile]]:
    """``profile_one`` for every contender in ``names``; per contender, every rank's Profile
    (on every rank)."""
    out = []
    for name in names:
        mine = profile_one(name, CONTENDERS[name], base, batches, warmup, steps, device)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        out.append(every)
    return out


def _ms(values: list[float]) -> float:
    return 1e3 * sum(values) / len(values)


def profile_markdown(per_rank: list[Profile]) -> str:
    """One contender's table: wall rows, then ranges and copy-like ops in milliseconds per
    step, each the largest rank's, with calls per step; a device column on a GPU."""
    first = per_rank[0]
    n = first.steps
    cuda = any(v[2] for p in per_rank for v in (*p.ranges.values(), *p.ops.values()))
    head = ["row", "what is timed", "ms/step (max over ranks)", "calls/step"]
    head += ["device ms/step"] if cuda else []
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def add(row: str, what: str, ms: float, calls: float, device_ms: float = 0.0) -> None:
        cells = [row, what, f"{ms:.2f}", f"{calls:g}"] + ([f"{device_ms:.2f}"] if cuda else [])
        lines.append("| " + " | ".join(cells) + " |")

    slowest = lambda attr: [max(ts) for ts in zip(*(getattr(p, attr) for p in per_rank))]  # noqa: E731
    add("wall (no profiler)", "perf_counter, slowest rank per step", _ms(slowest("wall")), 1)
    add("wall (profiled)", "perf_counter, slowest rank per step", _ms(slowest("wall_profiled")), 1)

    def rows(attr: str, what: str, order: list[str]) -> None:
        for key in order:
            got = [getattr(p, attr).get(key, (0.0, 0, 0.0)) for p in per_rank]
            us, count, dev = (max(g[i] for g in got) for i in range(3))
            add(key, what, us / 1e3 / n, count / n, dev / 1e3 / n)

    names = sorted({k for p in per_rank for k in p.ranges})
    rows("ranges", "range, total CPU", sorted(names, key=lambda k: (not k.startswith("bench."), k)))
    rows("ops", "op, self CPU", sorted({k for p in per_rank for k in p.ops}))
    total = lambda i: max(sum(v[i] for v in p.ops.values()) for p in per_rank) / n  # noqa: E731
    add("copy-like ops, sum", "op, self CPU", total(0) / 1e3, total(1), total(2) / 1e3)
    return "\n".join(lines)


PROFILE_NOTE = """\
- wall: forward, backward and optimizer step + zero_grad, timed after a barrier, the slowest \
rank per step, averaged; "no profiler" and "profiled" are two runs of the same steps, their \
gap is the profiler's overhead.
- range rows: total CPU time (children included) of record_function ranges, matched by name \
prefix (bench.*, the driver's own; sharded_adamw.*, the library's; DistributedDataParallel.*). \
Ranges nest (bench.backward holds standalone ShardedAdamW's reduce-scatter launches, \
bench.step the update and all-gather), so rows do not add up.
- op rows: self CPU time (children excluded) of copy-like aten ops, wherever they ran \
(model, DDP, optimizer), on the threads the profiler records; gloo runs collectives on its \
own threads, which only show as waits. The sum row is the largest rank's sum.
- Every range and op row is the largest rank's figure (per row, so rows may come from \
different ranks)."""
