"""Mistakes that used to pass in silence are caught or fixed.

- A standalone ShardedAdamW over a DDP model's parameters, without ``attach``: attached by
  itself when it optimizes exactly the model's trainable parameters, whether DDP is built
  before the optimizer or after it (nanoGPT order), and the run equals DDP + AdamW bitwise at
  W = 2; a warning naming ``opt.attach`` when they only overlap.
- An optimizer built before ``init_process_group``: a clear error at the first step.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups

WORLD_SIZES = (2, 3)


def _ddp_order(rank: int, order: str) -> dict:
    torch.manual_seed(0)
    ref_model = TinyLM()
    model = copy.deepcopy(ref_model)
    ref = DDP(ref_model)
    ref_opt = torch.optim.AdamW(param_groups(ref_model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "ddp_first":
            net = DDP(model)
            opt = ShardedAdamW(param_groups(model))
        else:
            opt = ShardedAdamW(param_groups(model))
            net = DDP(model)
    for step in range(4):
        x, y = batch(step, rank)
        for m, o in ((ref, ref_opt), (net, opt)):
            loss_fn(m(x), y).backward()
            o.step()
            o.zero_grad()
    equal = all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))
    return {"attached": opt.attached_model is net, "equal": equal, "warnings": len(caught)}


def _partial_overlap_warns(rank: int) -> list[str]:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ShardedAdamW(model[0].parameters())
        net = DDP(model)
    assert opt.attached_model is None and net is not None
    return [str(w.message) for w in caught]


def _late_process_group(rank: int, W: int) -> str:
    """Tear the group down, build the optimizer with no group, bring a group back (on a
    port rank 0 found free, not the old one plus one, which another job may hold)."""
    port = [distributed.free_port() if rank == 0 else None]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    model = nn.Linear(3, 3)
    opt = ShardedAdamW(model.parameters())
    os.environ["MASTER_PORT"] = str(port[0])
    dist.init_process_group("gloo", rank=rank, world_size=W)
    model(torch.ones(1, 3)).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return ""


def _scenarios(rank: int, W: int) -> dict:
    return {
        "ddp_first": _ddp_order(rank, "ddp_first"),
        "optimizer_first": _ddp_order(rank, "optimizer_first"),
        "partial": _partial_overlap_warns(rank),
        "late_pg": _late_process_group(rank, W),
    }


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request):
    return request.param, distributed.run(_scenarios, request.param, timeout=180)


@pytest.mark.parametrize("order", ["ddp_first", "optimizer_first"])
def test_unattached_optimizer_over_a_ddp_model_is_attached(results, order):
    W, per_rank = results
    for r in per_rank:
        assert r[order]["attached"] and r[order]["warnings"] == 0
        if W == 2:
            assert r[order]["equal"]


def test_partial_overlap_with_ddp_warns_naming_attach(results):
    _, per_rank = results
    for r in per_rank:
        assert len(r["partial"]) == 1 and "opt.attach(ddp_model)" in r["partial"][0]


def test_optimizer_built_before_init_process_group_fails_at_first_step(results):
    W, per_rank = results
    for rank, r in enumerate(per_rank):
        assert "built before torch.distributed.init_process_group()" in r["late_pg"]
        assert f"{W} ranks" in r["late_pg"] and f"rank {rank}" in r["late_pg"]
