"""The timed side-by-side run: every contender trains on the same batches (interleaved step by
step on CPU, one at a time on a GPU), then one unmeasured probe step counts its held bytes and
its collectives; ``combine`` merges the ranks' results."""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .contenders import CONTENDERS, Trainer
from .counters import CommCounter, storage_bytes


@dataclass
class Result:
    """One contender's measurements on this rank (``combine`` merges the ranks')."""

    name: str
    times: list[float] = field(default_factory=list)
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes: int = 0
    buffer_bytes: int = 0
    comm_bytes: int = 0
    comm_calls: int = 0
    peak_bytes: int | None = None
    loss: float = float("nan")
    weight_decays: str = ""
    skipped: str | None = None


def agree(error: str | None) -> str | None:
    """The first rank's error, on every rank, so that all ranks skip a contender together."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, error)
    return next((e for e in every if e), None)


def skip_reason(e: BaseException) -> str:
    """Why a contender is skipped: the module it lacks, or the first line of its error."""
    if isinstance(e, ImportError):
        return f"not installed ({e.name or e})"
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


class Runner:
    """One contender: its model copy, its trainer and its measurements."""

    def __init__(self, name: str, make: Callable, base: nn.Module, device: torch.device):
        self.res = Result(name)
        self.device = device
        self.trainer: Trainer | None = None
        error = None
        try:
            self.trainer = make(copy.deepcopy(base).to(device), device)
            groups = self.trainer.optimizer.param_groups
            self.res.weight_decays = ", ".join(f"{g['weight_decay']:g}" for g in groups)
        except Exception as e:  # noqa: BLE001 - a peer that fails to start is reported
            error = skip_reason(e)
        self.res.skipped = agree(error)
        if self.res.skipped:
            self.trainer = None

    def step(self, x: torch.Tensor, y: torch.Tensor, measure: bool) -> None:
        """One timed training step (forward, backward, optimizer step, zero_grad)."""
        if self.trainer is None:
            return
        t = self.trainer
        dist.barrier()
        t0 = time.perf_counter()
        try:
            loss = nn.functional.cross_entropy(t.net(x).float().flatten(0, 1), y.flatten())
            t.backward(loss)
            t.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - reported as skipped, the others go on
            self.res.skipped, self.trainer = skip_reason(e), None
            return
        if measure:
            self.res.times.append(time.perf_counter() - t0)

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One unmeasured step that counts collectives and held bytes, and records the loss."""
        if self.trainer is None:
            return
        t, counter = self.trainer, CommCounter()
        try:
            with counter:
                loss = nn.functional.cross_entropy(t.net(x).float().flatten(0, 1), y.flatten())
                t.backward(loss)
                before = t.held()
                t.step()
                after = t.held()
        except Exception as e:  # noqa: BLE001
            self.res.skipped, self.trainer = skip_reason(e), None
            return
        seen: set[int] = set()
        self.res.param_bytes = storage_bytes(before["params"], seen)
        self.res.grad_bytes = storage_bytes(before["grads"], seen)
        self.res.state_bytes = storage_bytes(after["state"], seen)
        self.res.buffer_bytes = storage_bytes(after["buffers"], seen)
        self.res.comm_bytes, self.res.comm_calls = counter.bytes, counter.calls
        self.res.loss = loss.item()


def combine(per_rank: list[Result]) -> Result:
    """All ranks' results for one contender as one: each step's time is the slowest rank's,
    bytes are the largest rank's, the loss is the mean over ranks."""
    first = per_rank[0]
    skipped = next((r.skipped for r in per_rank if r.skipped), None)
    out = Result(first.name, weight_decays=first.weight_decays, skipped=skipped)
    if skipped:
        return out
    out.times = [max(ts) for ts in zip(*(r.times for r in per_rank))]
    for name in ("param_bytes", "grad_bytes", "state_bytes", "buffer_bytes", "comm_bytes"):
        setattr(out, name, max(getattr(r, name) for r in per_rank))
    out.comm_calls = max(r.comm_calls for r in per_rank)
    if first.peak_bytes is not None:
        out.peak_bytes = max(r.peak_bytes or 0 for r in per_rank)
    out.loss = sum(r.loss for r in per_rank) / len(per_rank)
    return out


def run_all(
    base: nn.Module, batches: list, warmup: int, device: torch.device, names: list[str]
) -> list[Result]:
    """Train every contender in ``names`` on ``batches`` (the last one is the probe step) and
    return the results merged over ranks.

    On CPU the contenders are interleaved step by step so that machine noise hits all alike.
    Peak CUDA memory needs contenders one at a time, so on a GPU each runs alone; its peak is
    counted above what was allocated before it started."""
    *train, (px, py) = batches
    results = []
    if device.type == "cuda":
        for name in names:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)  # the batches, any peer's leftovers
            r = Runner(name, CONTENDERS[name], base, device)
            for i, (x, y) in enumerate(train):
                r.step(x, y, i >= warmup)
            r.probe(px, py)
            if not r.res.skipped:
                r.res.peak_bytes = torch.cuda.max_memory_allocated(device) - before
            results.append(r.res)
            del r
    else:
        runners = [Runner(name, CONTENDERS[name], base, device) for name in names]
        for i, (x, y) in enumerate(train):
            for r in runners:
                r.step(x, y, i >= warmup)
        for r in runners:
            r.probe(px, py)
        results = [r.res for r in runners]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    return [combine(list(rs)) for rs in zip(*every)]
