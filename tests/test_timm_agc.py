"""Adaptive gradient clipping routed to the shards (``integrations/timm.py``), against the
same clipping of ``p.grad`` under DDP + ``torch.optim.AdamW``.

timm itself does not install on this project's machines (its ``torchvision`` dependency has
no wheel for torch's CPU build in the registry), so the clipping function routed here is this
test's own implementation of AGC (Brock et al. 2021: each output row's gradient scaled down to
at most ``clip_factor`` times the row's weight norm, floored at ``eps``), with timm's
signature; ``install.py`` applies the same ``route_adaptive_clip_grad`` to timm's function when
timm is imported. Bitwise on one process; at W = 2 the row norms come from float64 partial
sums over the shards, so the clip factors differ from torch's in the last bit (1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW
from sharded_adamw.integrations.timm import route_adaptive_clip_grad

from . import distributed


def agc(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """AGC on ``p.grad``, written from the paper: per output row (whole tensor for vectors)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for p in params:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.ndim))
        if p.ndim > 1:
            w = p.detach().norm(norm_type, dim=dims, keepdim=True)
            g = p.grad.norm(norm_type, dim=dims, keepdim=True)
        else:
            w, g = p.detach().norm(norm_type), p.grad.norm(norm_type)
        limit = w.clamp(min=eps) * clip_factor
        scaled = p.grad * (limit / g.clamp(min=1e-6))
        p.grad.copy_(torch.where(g < limit, p.grad, scaled))


routed = route_adaptive_clip_grad(agc)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(9, 17)
        self.b = nn.Conv1d(17, 7, 3)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x)).transpose(1, 2)
        return self.head(self.b(h).transpose(1, 2))


def _run(rank: int, world: int, mode: str, clip: bool) -> dict:
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = ShardedAdamW(model.parameters(), lr=3e-2, bucket_cap_mb=0.0005)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    net = model
    if world > 1 and mode == "attached":
        net = DDP(model)
        opt.attach(net)
    ref_net = DDP(ref) if world > 1 else ref
    for step in range(4):
        x = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(10 * step + rank))
        (net(x) * 10).pow(2).mean().backward()
        (ref_net(x) * 10).pow(2).mean().backward()
        if clip:  # as timm's train.py does: every parameter but the classifier head
            routed([p for n, p in model.named_parameters() if not n.startswith("head")], 0.02)
            agc([p for n, p in ref.named_parameters() if not n.startswith("head")], 0.02)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    out = {
        "equal": all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters())),
        "rel": max(
            ((p - q).abs().max() / q.abs().max()).item()
            for p, q in zip(model.parameters(), ref.parameters())
        ),
    }
    if world == 1:  # tensors stay in this process (a queue would pass file descriptors)
        out["params"] = [p.detach().clone() for p in model.parameters()]
    if world > 1:
        dist.barrier()
    return out


def test_one_process_is_bitwise_and_clipping_changes_the_result():
    clipped, unclipped = _run(0, 1, "standalone", True), _run(0, 1, "standalone", False)
    assert clipped["equal"], clipped["rel"]
    moved = max((a - b).abs().max().item() for a, b in zip(clipped["params"], unclipped["params"]))
    assert moved > 1e-3, moved  # AGC clipped something


@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_two_ranks_match_ddp_adamw(mode):
    for r in distributed.run(_run, 2, mode, True):
        assert r["rel"] <= 1e-5, r["rel"]
