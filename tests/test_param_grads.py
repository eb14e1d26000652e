"""Per-parameter reads and writes of the sharded gradient (``grad_norms``, ``scale_grads_``,
``full_grad``) against the same computations on ``p.grad`` of DDP + ``torch.optim.AdamW``:
bitwise on one process, within float rounding of the order of the sum on several (W = 2, 3,
4: shards cut through parameters and rows), and the step after a scaling equal to AdamW's
after the same scaling of ``p.grad``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed

NORMS = [2.0, 1.0, float("inf"), 3.0]


class Odd(nn.Module):
    """Sizes that divide by neither 2, 3 nor 4, so shards cut through rows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Conv1d(13, 5, 3)
        self.c = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.a(x))  # (batch, 11, 13)
        h = self.b(h.transpose(1, 2)).transpose(1, 2)  # (batch, 9, 5)
        return self.c(h)


def _pair(world: int, mode: str) -> tuple:
    """The same ``Odd`` model twice: ShardedAdamW (attached to DDP in ``mode`` "attached")
    and DDP + torch AdamW."""
    torch.manual_seed(0)
    model = Odd()
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=1e-2, bucket_cap_mb=0.0005)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    net = DDP(model) if mode == "attached" and world > 1 else model
    if mode == "attached" and world > 1:
        opt.attach(net)
    ref_net = DDP(ref) if world > 1 else ref
    return model, net, opt, ref, ref_net, ref_opt


def _programs(rank: int, world: int, mode: str) -> dict:
    model, net, opt, ref, ref_net, ref_opt = _pair(world, mode)
    out = {"norm_rel": 0.0, "norm_equal": True, "full_equal": True, "params_equal": True}
    for step in range(3):
        x = torch.randn(4, 11, 7, generator=torch.Generator().manual_seed(10 * step + rank))
        net(x).pow(2).mean().backward()
        ref_net(x).pow(2).mean().backward()
        params, refs = list(model.parameters()), list(ref.parameters())
        for norm_type in NORMS:
            for unitwise in (False, True):
                ours = opt.grad_norms(params, norm_type, unitwise)
                for q, n in zip(refs, ours):
                    g = q.grad
                    if unitwise and g.ndim > 1:
                        want = g.norm(norm_type, dim=tuple(range(1, g.ndim)), keepdim=True)
                    else:
                        want = g.norm(norm_type)
                    assert n.shape == want.shape, (n.shape, want.shape)
                    out["norm_equal"] &= torch.equal(n, want)
                    rel = ((n - want).abs() / want.abs().clamp(min=1e-30)).max().item()
                    out["norm_rel"] = max(out["norm_rel"], rel)
        for p, q in zip(params, refs):
            out["full_equal"] &= torch.equal(opt.full_grad(p), q.grad)
        # adaptive-clipping-like scaling: a per-row factor on matrices, a scalar elsewhere
        factors = [
            torch.linspace(0.5, 1.5, q.shape[0]).reshape(-1, *([1] * (q.ndim - 1)))
            if q.ndim > 1
            else torch.tensor(0.25)
            for q in refs
        ]
        opt.scale_grads_(params, factors)
        for q, f in zip(refs, factors):
            q.grad.mul_(f)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out["params_equal"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())
    )
    out["max_rel_param"] = max(
        ((p - q).abs().max() / q.abs().max()).item()
        for p, q in zip(model.parameters(), ref.parameters())
    )
    if world > 1:
        dist.barrier()
    return out


def test_one_process_is_bitwise_torch():
    out = _programs(0, 1, "standalone")
    assert out["norm_equal"] and out["full_equal"] and out["params_equal"], out


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_several_ranks_match_the_averaged_gradient(world, mode):
    for r in distributed.run(_programs, world, mode):
        # the norm sums the ranks' partial sums in float64: rounding of the order only
        assert r["norm_rel"] <= 1e-6, r
        # the averaged gradient itself: bitwise on gloo at W=2 (one addition), else within
        # the rounding of the all-reduce's order (as for the parameters themselves)
        if world == 2:
            assert r["full_equal"] and r["params_equal"], r
        assert r["max_rel_param"] <= 1e-5, r


def _gathered(rank: int, world: int, mode: str) -> dict:
    """Code that reads and changes p.grad inside ``opt.gathered_grads()``: the values are
    DDP's averaged gradient; a change made there reaches the step; p.grad is None after."""
    model, net, opt, ref, ref_net, ref_opt = _pair(world, mode)
    out = {"grads_equal": True, "none_after": True}
    for step in range(3):
        x = torch.randn(4, 11, 7, generator=torch.Generator().manual_seed(10 * step + rank))
        net(x).pow(2).mean().backward()
        ref_net(x).pow(2).mean().backward()
        with opt.gathered_grads():
            for p, q in zip(model.parameters(), ref.parameters()):
                out["grads_equal"] &= torch.equal(p.grad, q.grad)
            model.a.weight.grad.mul_(0.5)  # a change, in place
            model.c.weight.grad = model.c.weight.grad * 2.0  # a change, replaced
        ref.a.weight.grad.mul_(0.5)
        ref.c.weight.grad = ref.c.weight.grad * 2.0
        out["none_after"] &= all(p.grad is None for p in model.parameters())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out["params_equal"] = all(
        torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())
    )
    if world > 1:
        dist.barrier()
    return out


def test_gathered_grads_on_one_process():
    out = _gathered(0, 1, "standalone")
    assert all(out.values()), out


@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_gathered_grads_are_ddps_average_and_changes_reach_the_step(mode):
    for r in distributed.run(_gathered, 2, mode):
        assert all(r.values()), r
