"""``state_dict()`` works on any subset of ranks, never hangs, and returns the full torch-format
state after the last completed step.

Each scenario trains ShardedAdamW side by side with DDP + ``torch.optim.AdamW`` and compares
the state one or more ranks receive, while the other ranks keep training, with AdamW's own
``state_dict()`` at the same step: bitwise at W = 2, within ``REL_TOL`` at W = 3 (gloo's ring
sums in a different order; see test_equivalence). All scenarios of a world size run in one
spawn of W processes.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups

WORLD_SIZES = (2, 3)
REL_TOL = 1e-6


def _pair(mode: str, **kwargs):
    torch.manual_seed(0)
    ref_model = TinyLM()
    model = copy.deepcopy(ref_model)
    ref = DDP(ref_model)
    ref_opt = torch.optim.AdamW(param_groups(ref_model))
    opt = ShardedAdamW(param_groups(model), state_dict_timeout=20.0, **kwargs)
    net = DDP(model) if mode == "attach" else model
    if mode == "attach":
        opt.attach(net)
    return ref, ref_opt, net, opt


def _train(pairs, step: int, rank: int) -> None:
    x, y = batch(step, rank)
    for m, o in pairs:
        loss_fn(m(x), y).backward()
        o.step()
        o.zero_grad()


def _diff(ours: dict, ref: dict) -> float:
    """Largest relative difference between two AdamW state dicts; inf on a structural
    mismatch (keys, steps, shapes)."""
    if ours["state"].keys() != ref["state"].keys():
        return float("inf")
    worst = 0.0
    for pid, want in ref["state"].items():
        got = ours["state"][pid]
        if set(got) != set(want) or float(got["step"]) != float(want["step"]):
            return float("inf")
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = got[key].double(), want[key].double()
            if a.shape != b.shape:
                return float("inf")
            worst = max(worst, (a - b).abs().max().item() / (b.abs().max().item() or 1.0))
    return worst


def _callers_see_last_step(rank: int, W: int, mode: str, callers: set[int]) -> dict:
    """``callers`` ask for the state after step 3 while the other ranks train on to step 6."""
    ref, ref_opt, net, opt = _pair(mode)
    out = {}
    for step in range(6):
        _train([(ref, ref_opt), (net, opt)], step, rank)
        if step == 2 and rank in callers:
            out["diff"] = _diff(opt.state_dict(), ref_opt.state_dict())
    return out


def _all_ranks_at_once(rank: int, W: int) -> dict:
    ref, ref_opt, net, opt = _pair("standalone")
    for step in range(4):
        _train([(ref, ref_opt), (net, opt)], step, rank)
    sds = [opt.state_dict() for _ in range(2)]  # twice: the channel is reusable
    return {"diff": max(_diff(sd, ref_opt.state_dict()) for sd in sds)}


def _zero_habit(rank: int, W: int) -> dict:
    """ZeroRedundancyOptimizer's habit: consolidate everywhere, state_dict() on rank 0."""
    ref, ref_opt, net, opt = _pair("attach")
    for step in range(3):
        _train([(ref, ref_opt), (net, opt)], step, rank)
    opt.consolidate_state_dict(to=0)
    out = {}
    if rank == 0:
        out["diff"] = _diff(opt.state_dict(), ref_opt.state_dict())
    _train([(ref, ref_opt), (net, opt)], 3, rank)
    return out


def _between_backward_and_step(rank: int, W: int) -> dict:
    """Standalone, the caller asks after its backward: the other ranks cannot update past the
    step agreement, so the caller still gets the state after the last completed step."""
    ref, ref_opt, net, opt = _pair("standalone")
    for step in range(2):
        _train([(ref, ref_opt), (net, opt)], step, rank)
    x, y = batch(2, rank)
    loss_fn(net(x), y).backward()
    out = {}
    if rank == 0:
        time.sleep(0.5)  # let the others reach step()
        out["diff"] = _diff(opt.state_dict(), ref_opt.state_dict())
    opt.step()
    return out


def _server_ahead_refuses(rank: int, W: int) -> dict:
    """Attached with skip_nonfinite=False, nothing stops another rank from updating step N+1
    while rank 0 asks, between its backward and its step, for the state after step N: the
    caller gets an error, not a mix of two steps."""
    ref, ref_opt, net, opt = _pair("attach", skip_nonfinite=False)
    _train([(ref, ref_opt), (net, opt)], 0, rank)
    x, y = batch(1, rank)
    loss_fn(net(x), y).backward()
    out = {}
    if rank == 0:
        time.sleep(1.0)  # the others are inside step 2 by now, blocked in its all-gather
        try:
            opt.state_dict()
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e)
    opt.step()
    return out


def _dead_server_is_named(rank: int, W: int) -> dict:
    """A rank that does not serve: the caller raises within the timeout, naming it."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = ShardedAdamW(param_groups(model), state_dict_timeout=2.0)
    for step in range(2):
        x, y = batch(step, rank)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    if rank == W - 1:
        opt.state_server.close()  # stands for a dead or stuck rank
    dist.barrier()
    out = {}
    if rank == 0:
        start = time.monotonic()
        try:
            opt.state_dict()
            out["error"] = None
        except TimeoutError as e:
            out["error"] = str(e)
        out["seconds"] = time.monotonic() - start
    dist.barrier()
    return out


def _scenarios(rank: int, W: int) -> dict:
    return {
        "rank0_alone_standalone": _callers_see_last_step(rank, W, "standalone", {0}),
        "last_rank_alone_attach": _callers_see_last_step(rank, W, "attach", {W - 1}),
        "subset_attach": _callers_see_last_step(rank, W, "attach", {0, W - 1}),
        "all_at_once": _all_ranks_at_once(rank, W),
        "zero_habit": _zero_habit(rank, W),
        "between_backward_and_step": _between_backward_and_step(rank, W),
        "server_ahead": _server_ahead_refuses(rank, W),
        "dead_server": _dead_server_is_named(rank, W),
    }


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request):
    W = request.param
    return W, distributed.run(_scenarios, W, timeout=180)


def _tol(W: int) -> float:
    return 0.0 if W == 2 else REL_TOL


@pytest.mark.parametrize(
    "name",
    ["rank0_alone_standalone", "last_rank_alone_attach", "subset_attach", "all_at_once"],
)
def test_callers_get_the_state_after_the_last_completed_step(results, name):
    W, per_rank = results
    diffs = [r[name]["diff"] for r in per_rank if "diff" in r[name]]
    assert diffs and max(diffs) <= _tol(W), diffs


def test_consolidate_then_state_dict_on_rank0(results):
    W, per_rank = results
    assert per_rank[0]["zero_habit"]["diff"] <= _tol(W)


def test_caller_between_backward_and_step_gets_the_previous_step(results):
    W, per_rank = results
    assert per_rank[0]["between_backward_and_step"]["diff"] <= _tol(W)


def test_server_already_updating_is_refused_with_a_clear_error(results):
    _, per_rank = results
    error = per_rank[0]["server_ahead"]["error"]
    assert error is not None and "has already begun updating step" in error


def test_unanswered_request_names_the_rank_within_the_timeout(results):
    W, per_rank = results
    out = per_rank[0]["dead_server"]
    assert out["error"] is not None and f"rank {W - 1} did not serve" in out["error"]
    assert out["seconds"] < 15


def _after_a_slow_load(rank: int, world: int) -> bool:
    """Every rank loads a new state; rank 1 is slow to. Rank 0 asks for the state right after
    its own load and must get the loaded state from every rank, not rank 1's older one."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = ShardedAdamW(param_groups(model), state_dict_timeout=60)
    for step in range(2):
        x, y = batch(step, rank)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    new = opt.state_dict()
    for entry in new["state"].values():  # a state no rank has held
        entry["exp_avg"] = entry["exp_avg"] + 1.0
    dist.barrier()
    if rank == 1:
        time.sleep(2.0)
    opt.load_state_dict(new)
    ok = True
    if rank == 0:
        got = opt.state_dict()
        ok = all(
            torch.equal(got["state"][i]["exp_avg"], e["exp_avg"]) for i, e in new["state"].items()
        )
    dist.barrier()
    return ok


def test_a_caller_after_its_load_waits_for_the_other_ranks_loads():
    assert distributed.run(_after_a_slow_load, 2) == [True, True]
