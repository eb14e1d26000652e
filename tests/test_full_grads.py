"""``full_grads=True`` (ZeRO-1: ``p.grad`` keeps the averaged gradient) against DDP +
``torch.optim.AdamW`` on the same program: ``p.grad`` after backward, code that reads and
changes it before ``step()`` (torch's clipping, a per-parameter scaling as adaptive clipping
does, GradScaler), gradient accumulation, a parameter unused on some ranks, and the
parameters after each step.

Bitwise where the averaged gradient has the same bits: attached at every world size (DDP
all-reduces on both sides), standalone on one process and at W = 2 (a sum of two values has
one order); standalone at W = 3, 4 the all-reduce runs over the optimizer's buckets, not
DDP's, so gloo's ring adds in another order (within 1e-5 relative)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 5)
        self.side = nn.Linear(7, 5)  # used on rank 0 only

    def forward(self, x, use_side: bool):
        y = self.b(torch.tanh(self.a(x)))
        return y + self.side(x) if use_side else y


def _program(rank: int, world: int, mode: str) -> dict:
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, full_grads=True, bucket_cap_mb=0.0005)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    distributed_run = world > 1
    net = model
    if distributed_run and mode == "attached":
        net = DDP(model, find_unused_parameters=True)
        opt.attach(net)
    ref_net = DDP(ref, find_unused_parameters=True) if distributed_run else ref
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    out = {"grads_equal": True, "params_equal": True, "max_rel": 0.0}
    for step in range(4):
        for micro in range(2):  # accumulation: two backwards per step
            g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
            x = torch.randn(3, 7, generator=g)
            use_side = rank == 0
            scaler.scale(net(x, use_side).pow(2).mean()).backward()
            ref_scaler.scale(ref_net(x, use_side).pow(2).mean()).backward()
        for o, s in ((opt, scaler), (ref_opt, ref_scaler)):
            s.unscale_(o)
        for p, q in zip(model.parameters(), ref.parameters()):
            same = (p.grad is None) == (q.grad is None) and (
                p.grad is None or torch.equal(p.grad, q.grad)
            )
            out["grads_equal"] &= same
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        for m in (model, ref):  # a per-row scaling, as adaptive clipping does on p.grad
            m.a.weight.grad.mul_(torch.linspace(0.5, 1.0, 13).unsqueeze(1))
        scaler.step(opt)
        ref_scaler.step(ref_opt)
        scaler.update()
        ref_scaler.update()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        out["params_equal"] &= torch.equal(p, q)
        rel = ((p - q).abs().max() / q.abs().max()).item()
        out["max_rel"] = max(out["max_rel"], rel)
    if distributed_run:
        dist.barrier()
    return out


def test_one_process_is_bitwise_adamw():
    out = _program(0, 1, "standalone")
    assert out["grads_equal"] and out["params_equal"], out


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_several_ranks_match_ddp_adamw(world, mode):
    for r in distributed.run(_program, world, mode):
        if mode == "attached" or world == 2:
            assert r["grads_equal"] and r["params_equal"], r
        else:
            assert r["max_rel"] <= 1e-5, r


def _unused_everywhere(rank: int, world: int, mode: str) -> dict:
    """A block no rank uses for a while (in a step of two micro-batches), with
    ``zero_grad(set_to_none=False)``: DDP leaves its p.grad None, so AdamW does not step it;
    it must not step here either, nor get a p.grad."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, full_grads=True, bucket_cap_mb=0.0005)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    net, ref_net = model, ref
    if world > 1:
        ref_net = DDP(ref, find_unused_parameters=True)
        if mode == "attached":
            net = DDP(model, find_unused_parameters=True)
            opt.attach(net)
    out = {"params_equal": True, "grads_agree": True}
    for step in range(4):
        for micro in range(2):
            x = torch.randn(3, 7, generator=torch.Generator().manual_seed(10 * step + micro + rank))
            use_side = step >= 2  # unused on every rank in steps 0 and 1
            net(x, use_side).pow(2).mean().backward()
            ref_net(x, use_side).pow(2).mean().backward()
        opt.step()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            out["grads_agree"] &= (p.grad is None) == (q.grad is None)
        opt.zero_grad(set_to_none=False)
        ref_opt.zero_grad(set_to_none=False)
    out["params_equal"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())
    )
    if world > 1:
        dist.barrier()
    return out


@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_a_parameter_unused_everywhere_gets_no_gradient_and_no_step(mode):
    assert all(_unused_everywhere(0, 1, mode).values())
    for r in distributed.run(_unused_everywhere, 2, mode):
        assert all(r.values()), r
