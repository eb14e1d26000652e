"""``--copy-bytes``: the memory traffic of ShardedAdamW's data path beyond AdamW's own, counted
kernel by kernel, per element of the local shard and per step.

One step (forward, backward, ``opt.step()``, ``zero_grad``) runs under ``CopyCounter``, which
adds up the bytes that copy, cat, scale and fill kernels read and write
(``counters.DATA_MOVEMENT_OPS``). The same forward and backward of a plain copy of the model, with
no optimizer and no DDP, is counted the same way and subtracted: what is left is what the
optimizer (and, attached, DDP's reducer) adds. The AdamW update itself runs torch's AdamW, whose
internal ops are AdamW's own traffic, not extra copies: ``update_excluded`` wraps the one
function every update goes through, ``sharded_adamw.core.update.adamw_update``, where the library's
modules call it, pauses the counter inside, and counts AdamW's own bytes from the tensors it is
handed (reads of param, grad and both moments, writes of three: 28 bytes per fp32 element).
Wrapping the function, not the profiler region ``sharded_adamw.core.update``, is deliberate: that
region also holds copies that are the optimizer's own (the cat of owned rows into the shard,
the cast of fp32 masters into the all-gather buffer) and must count.

The figure is set beside the issue-14 target for fp32 standalone, ``8W + 8`` bytes per shard
element (W = shard ranks), and the ``24W + 16`` the design of the time moved on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from sharded_adamw.core import update

from .contenders import CONTENDERS, Trainer
from .counters import CopyCounter

SETUPS = [  # (row label, contender)
    ("standalone, fp32", "ShardedAdamW (standalone)"),
    ("attached, fp32", "ShardedAdamW (attach)"),
    ("standalone, bf16 params, fp32 masters", "ShardedAdamW bf16 (standalone)"),
]


@contextlib.contextmanager
def update_excluded(counter: CopyCounter) -> Iterator[None]:
    """While active, every call of ``adamw_update`` from a ``sharded_adamw`` module runs with
    ``counter`` paused and adds the elements it updates and AdamW's own bytes for them."""
    original = update.adamw_update

    def counted(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *args, **kwargs):
        read_write = [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]
        counter.update_elements += sum(p.numel() for p in params)
        counter.update_bytes += sum(t.nbytes for t in grads) + 2 * sum(
            t.nbytes for ts in read_write for t in ts
        )
        counter.paused += 1
        try:
            return original(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *args, **kwargs)
        finally:
            counter.paused -= 1

    callers = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("sharded_adamw.") and getattr(m, "adamw_update", None) is original
    ]
    for m in callers:
        m.adamw_update = counted
    try:
        yield
    finally:
        for m in callers:
            m.adamw_update = original


@dataclass
class CopyBytes:
    """One setup's counts for one step on this rank."""

    label: str
    shard_elements: int  # elements the AdamW update touched
    adamw_bytes: int  # AdamW's own reads and writes of them
    extra_bytes: int  # data-movement bytes beyond the bare model's forward and backward
    extra_by_op: dict[str, int]

    def per_element(self, nbytes: int) -> float:
        return nbytes / self.shard_elements


def _loss(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return net(x).float().square().mean()


def _bare_counts(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Data-movement bytes of a forward and backward of ``model`` alone, gradients from None."""
    model.zero_grad(set_to_none=True)
    counter = CopyCounter()
    with counter:
        _loss(model, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.by_op


def count_copies(
    label: str, make: Callable[[nn.Module, torch.device], Trainer], base: nn.Module, x: torch.Tensor
) -> CopyBytes:
    """Count one step of contender ``make`` on a copy of ``base`` (after two unmeasured steps:
    DDP rebuilds its buckets after the first) against a bare forward and backward of another
    copy in the same dtype. Collective."""
    device = x.device
    trainer = make(copy.deepcopy(base).to(device), device)
    for _ in range(2):
        trainer.backward(_loss(trainer.net, x))
        trainer.step()
    counter = CopyCounter()
    with counter, update_excluded(counter):
        trainer.backward(_loss(trainer.net, x))
        trainer.step()
    if not counter.update_elements:
        raise RuntimeError(f"{label}: the step ran no adamw_update; nothing to count against")
    dtype = next(p.dtype for p in trainer.optimizer.param_groups[0]["params"])
    bare = copy.deepcopy(base).to(device=device, dtype=dtype)
    _bare_counts(bare, x)  # first-call paths
    reference = _bare_counts(bare, x)
    extra = {
        op: n - reference.get(op, 0) for op, n in counter.by_op.items() if n != reference.get(op, 0)
    }
    return CopyBytes(
        label, counter.update_elements, counter.update_bytes, sum(extra.values()), extra
    )


def copy_table(base: nn.Module, x: torch.Tensor) -> list[CopyBytes]:
    """``count_copies`` for every ``SETUPS`` row; each row is the rank with the most extra
    bytes per shard element. Collective: every rank passes the same ``base``."""
    rows = []
    for label, name in SETUPS:
        mine = count_copies(label, CONTENDERS[name], base, x)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        rows.append(max(every, key=lambda r: r.per_element(r.extra_bytes)))
    return rows
