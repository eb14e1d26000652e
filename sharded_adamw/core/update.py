"""The AdamW update on flat local tensors, computed by torch's own implementation, and the
runs of buckets each call covers.

AdamW is elementwise, so running ``torch.optim.adam.adam`` on a flat slice that cuts through
parameters gives the same bits as running it on the whole parameters, provided the gradient has
the same bits, the step count and hyperparameters are the same, and the same implementation
family (for-loop, foreach or fused) runs on both sides (docs/numerics.md). Delegating keeps us
exact and lets us inherit torch's fixes.

Older torch (2.6 among them) keeps AdamW in its own function, ``torch.optim.adamw.adamw``;
later releases compute it in ``adam`` with ``decoupled_weight_decay=True``. The one that
``torch.optim.AdamW`` of the installed torch calls is used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.autograd.profiler import record_function
from torch.optim.adam import adam

from .bucket import ShardBucket
from .state_formats import BlockwiseInt8

if "decoupled_weight_decay" in inspect.signature(adam).parameters:
    _adamw = functools.partial(adam, decoupled_weight_decay=True)
else:  # older torch
    from torch.optim.adamw import adamw as _adamw


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    group: dict,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step on lists of matching flat tensors with ``group``'s hyperparameters.

    ``steps`` holds one step-count tensor per entry and is incremented in place, as in torch.
    """
    beta1, beta2 = group["betas"]
    _adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=group["foreach"],
        fused=group["fused"],
        grad_scale=grad_scale,
        found_inf=found_inf,
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


class Steps(NamedTuple):
    """Which parameters of one bucket step, as agreed: ``present``, one flag per parameter;
    on the fused device path also ``found_inf`` (1.0: skip the whole step) and ``absent``
    (1.0 per parameter that no rank had a gradient for), tensors never read on the host."""

    present: list[bool]
    found_inf: torch.Tensor | None = None
    absent: torch.Tensor | None = None


class Run(NamedTuple):
    """Consecutive buckets of one param group updated by one call of torch's AdamW."""

    group: dict
    buckets: list[ShardBucket]
    uniform: bool  # every parameter steps, from one count: one step tensor per bucket
    steps: Steps  # the first bucket's (a run that is not uniform has one bucket)


def plan_runs(
    order: list[ShardBucket], steps: dict[ShardBucket, Steps], limit: int
) -> Iterator[Run]:
    """``order`` cut into runs of at least one bucket and at most ``limit`` bytes of shard
    beyond that: a run's all-gathers start only once the whole run is updated, so big
    buckets go one at a time, while small ones still share one call.

    A run is one call over consecutive buckets of a param group whose parameters all step
    from one count (each bucket's ``steps[0]`` stands for its parameters; the other step
    tensors follow in one add). Runs stay small: foreach AdamW allocates temporaries as large
    as its input (``exp_avg_sq.sqrt()``), so one call over every shard would add a
    state-sized buffer to the peak. A bucket where some parameter had no gradient on any
    rank, or whose counts differ (a partial load), is a run of its own over the owned parts
    of the parameters that step; so is every bucket of a fused group: fused AdamW's CPU
    kernel gives a tensor's tail (past its last full vector) other bits than its body, so it
    runs on each parameter's owned part, whose tail is the parameter's own (owned parts start
    at multiples of the alignment). AdamW is elementwise and the bias corrections depend on
    the count alone, so either way the bits are those of ``torch.optim.AdamW``."""
    run: list[ShardBucket] = []
    used, key = 0, None
    for b in order:
        uniform = not b.group["fused"] and b.uniform(steps[b].present)
        size = b.layout.shard_numel * b.update_dtype.itemsize
        if run and ((id(b.group), uniform) != key or not uniform or used + size > limit):
            yield Run(run[0].group, run, key[1], steps[run[0]])
            run, used = [], 0
        run.append(b)
        used += size
        key = (id(b.group), uniform)
    if run:
        yield Run(run[0].group, run, key[1], steps[run[0]])


def update_run(run: Run) -> None:
    """AdamW in place on the owned shards of ``run``. The state is read out of its stores as
    fp32 (``state_formats``: views of fp32 state, so nothing moves; temporaries as large as
    the run for bf16 or int8 state and remainder masters), updated by torch's AdamW, and
    written back; low-precision parameters are updated in their fp32 masters, then rounded
    into the shards."""
    group, buckets = run.group, run.buckets
    with record_function("sharded_adamw.update"):
        state = [_Fp32State(b) for b in buckets]
        if run.uniform:
            torch._foreach_add_([b.other_steps for b in buckets], 1)
            adamw_update(
                [s.param for s in state],
                [b.grad for b in buckets],
                [s.moments["exp_avg"] for s in state],
                [s.moments["exp_avg_sq"] for s in state],
                [s.moments["max_exp_avg_sq"] for s in state] if group["amsgrad"] else [],
                [b.first_step for b in buckets],
                group,
            )
            for b in buckets:
                b.advanced(b.present_all)
        else:
            _update_some(buckets[0], state[0], run.steps)
        masters = [s for s in state if s.bucket.master is not None]
        if masters:  # rounded into the parameters first: remainders are relative to them
            torch._foreach_copy_([s.bucket.shard for s in masters], [s.param for s in masters])
        for s in state:
            s.write_back(run.uniform or run.steps.absent is not None or run.steps.present)


class _Fp32State:
    """One bucket's parameters (or fp32 masters) and state as the update reads them."""

    def __init__(self, b: ShardBucket):
        S = b.layout.shard_numel
        self.bucket = b
        self.param = b.shard if b.master is None else b.master.read(0, S)
        self.moments = {k: store.read(0, S) for k, store in b.moments.items()}

    def write_back(self, present: list[bool] | bool) -> None:
        """Store the updated state: of every parameter (``present`` True: all stepped, or
        which did is only known on the device), else of those that stepped, so that int8
        blocks of parameters that did not are not quantized again (which moves them)."""
        b, S = self.bucket, self.bucket.layout.shard_numel
        if b.master is not None:
            b.master.write(self.param, 0, S)
        for k, store in b.moments.items():
            x = self.moments[k]
            if present is True or not isinstance(store, BlockwiseInt8):
                store.write(x, 0, S)
                continue
            for i, ok in enumerate(present):
                lo, hi = b.block_range(i)
                if ok and hi > lo:
                    store.write(x[lo:hi], lo, hi)


def _update_some(b: ShardBucket, state: _Fp32State, steps: Steps) -> None:
    """AdamW on the owned parts of the parameters of ``b`` that step: one call over those
    present; with ``absent`` (fused, agreed on the device), one call per other parameter,
    skipped on the device where no rank had a gradient."""

    def update(idx: list[int], skip: torch.Tensor | None) -> None:
        cut = lambda t: [b.owned(t, i) for i in idx]  # noqa: E731
        adamw_update(
            cut(state.param),
            cut(b.grad),
            cut(state.moments["exp_avg"]),
            cut(state.moments["exp_avg_sq"]),
            cut(state.moments["max_exp_avg_sq"]) if b.group["amsgrad"] else [],
            [b.steps[i] for i in idx],
            b.group,
            found_inf=skip,
        )

    idx = [i for i, ok in enumerate(steps.present) if ok]
    if idx:
        update(idx, steps.found_inf)
    if steps.absent is not None:
        for i in (i for i, ok in enumerate(steps.present) if not ok):
            update([i], torch.maximum(steps.found_inf, steps.absent[i]))
    b.advanced(steps.present)
