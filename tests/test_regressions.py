"""Single-process programs that once made ShardedAdamW differ from ``torch.optim.AdamW``:
each runs the same program with both optimizers and asserts the same bits (``torch.equal``)
on every parameter and state tensor. Each test names the defect it guards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sharded_adamw import ShardedAdamW


def _pair(make, **kwargs):
    """Two identical models from ``make``; ShardedAdamW on one, torch AdamW on the other."""
    torch.manual_seed(0)
    ours = make()
    ref = copy.deepcopy(ours)
    return (ours, ShardedAdamW(ours.parameters(), **kwargs)), (
        ref,
        torch.optim.AdamW(ref.parameters(), **kwargs),
    )


def _assert_same(a: nn.Module, oa, b: nn.Module, ob) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sb:
        for key, t in sb[k].items():
            assert torch.equal(sa[k][key], t), (k, key)


def _two_linears(bias: bool = False):
    return lambda: nn.ModuleDict({"a": nn.Linear(4, 4, bias=bias), "b": nn.Linear(4, 4, bias=bias)})


def test_parameters_with_gradients_on_some_steps_only_use_their_own_step_count():
    """The host mirror of the step counts was re-read after the update had bumped its
    version and then incremented: true count + 1, so a bucket whose counts differed was
    taken as uniform (7.3e-3 off after six steps)."""
    (m, opt), (r, ref) = _pair(_two_linears(), lr=0.1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for use in [("a", "b"), ("b",), ("b",), ("a",), ("a", "b"), ("a", "b")]:
        for net, o in ((m, opt), (r, ref)):
            sum(net[k](x).pow(2).sum() for k in use).backward()
            o.step()
            o.zero_grad()
    _assert_same(m, opt, r, ref)


def test_zero_grad_set_to_none_false_keeps_stepping_unused_parameters():
    """torch keeps a zeroed gradient, so AdamW goes on stepping a parameter unused in later
    steps (momentum and weight decay continue); ShardedAdamW had consumed it and skipped."""
    (m, opt), (r, ref) = _pair(_two_linears(bias=True), lr=0.1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for step, use in enumerate([("a", "b"), ("a",), ("a",), ("a", "b"), ("a",)]):
        for net, o in ((m, opt), (r, ref)):
            sum(net[k](x).pow(2).sum() for k in use).backward()
            o.step()
            o.zero_grad(set_to_none=step != 2)  # step 3 drops the kept gradients again
    _assert_same(m, opt, r, ref)


def test_a_layer_frozen_at_construction_steps_once_unfrozen():
    """torch AdamW steps a parameter as soon as it has a gradient; ShardedAdamW refused a
    parameter frozen when the optimizer was built."""

    def make():
        m = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
        m[0].requires_grad_(False)
        return m

    (m, opt), (r, ref) = _pair(make, lr=0.1)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        if step == 2:
            m[0].requires_grad_(True)
            r[0].requires_grad_(True)
        for net, o in ((m, opt), (r, ref)):
            net(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    _assert_same(m, opt, r, ref)


def test_channels_last_and_transposed_parameters_keep_their_layout_and_match():
    """Non-contiguous parameters were refused (any conv after ``channels_last``)."""

    def make():
        m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.Flatten(2))
        m.append(nn.Linear(25, 6)).to(memory_format=torch.channels_last)
        m[4].weight = nn.Parameter(m[4].weight.detach().t().contiguous().t())
        return m

    (m, opt), (r, ref) = _pair(make, lr=0.1)
    strides = [p.stride() for p in m.parameters()]
    assert not m[0].weight.is_contiguous() and not m[4].weight.is_contiguous()
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for step in range(4):
        for net, o in ((m, opt), (r, ref)):
            net(x).pow(2).sum().backward()
            o.step()
            o.zero_grad()
            if step == 1:  # a write by hand between steps reaches the next update
                with torch.no_grad():
                    net[0].weight.mul_(0.5)
    assert [p.stride() for p in m.parameters()] == strides
    _assert_same(m, opt, r, ref)


def test_complex_parameters_match_adamw():
    """Complex parameters were refused; torch AdamW updates them through view_as_real."""

    def make():
        m = nn.Module()
        m.a = nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
        m.b = nn.Parameter(torch.randn(4))
        return m

    (m, opt), (r, ref) = _pair(make, lr=0.1, amsgrad=True)
    for _ in range(4):
        for net, o in ((m, opt), (r, ref)):
            ((net.a.abs() ** 2).sum() + (net.b**3).sum()).backward()
            o.step()
            o.zero_grad()
    assert m.a.dtype == torch.complex64
    _assert_same(m, opt, r, ref)


def test_deepcopy_gives_an_optimizer_that_steps_like_the_original():
    """A deep copy raised ``AttributeError: '_buckets'`` at its first step."""
    (m, opt), (r, ref) = _pair(_two_linears(), lr=0.1)
    x = torch.randn(3, 4)
    for net, o in ((m, opt), (r, ref)):
        net["a"](x).sum().backward()
        o.step()
        o.zero_grad()
    copies = [copy.deepcopy(opt), copy.deepcopy(ref)]
    for o in copies:
        for p in (p for g in o.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        o.step()
    a, b = (sum((list(g["params"]) for g in o.param_groups), []) for o in copies)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("bad", [dict(differentiable=True), dict(capturable=True)])
def test_what_cannot_run_sharded_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ShardedAdamW(nn.Linear(2, 2).parameters(), **bad)


def _channels_last_vs_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.Flatten(2))
        return m.append(nn.Linear(25, 6)).to(memory_format=torch.channels_last)

    out = {}
    for mode in ("attached", "standalone"):
        ours, ref = make(), make()
        opt = ShardedAdamW(ours.parameters(), lr=0.1, bucket_cap_mb=0.0005)
        net = DDP(ours) if mode == "attached" else ours
        ref_net = DDP(ref)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            x = torch.randn(2, 3, 9, 9, generator=g).to(memory_format=torch.channels_last)
            for n, o in ((net, opt), (ref_net, ref_opt)):
                n(x).pow(2).mean().backward()
                o.step()
                o.zero_grad()
        out[mode] = all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))
        out[mode + " layout kept"] = not ours[0].weight.is_contiguous()
    return out


def test_channels_last_matches_ddp_at_two_ranks_attached_and_standalone():
    """Attached on gloo, DDP's gradient views of a channels_last parameter are in memory
    order, not the shards' logical order: they are delivered one by one."""
    from . import distributed

    for r in distributed.run(_channels_last_vs_ddp, 2):
        assert r == {
            "attached": True,
            "attached layout kept": True,
            "standalone": True,
            "standalone layout kept": True,
        }


def test_an_expanded_parameter_is_refused_by_name():
    """Its elements share memory: an update of one would be an update of all."""
    shared = nn.Parameter(torch.randn(3).expand(4, 3))
    with pytest.raises(
        ValueError, match=r"do not share memory: parameter #1 of group 0 .*\(0, 1\)"
    ):
        ShardedAdamW([nn.Parameter(torch.randn(2)), shared])


def test_a_load_gives_state_to_a_parameter_frozen_in_the_loading_optimizer():
    """Fuzzer, W=1 seed 10: torch keeps the loaded state of a frozen parameter (and uses it
    once the parameter is unfrozen); ShardedAdamW dropped it."""
    (m, opt), (r, ref) = _pair(_two_linears(), lr=0.1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for net, o in ((m, opt), (r, ref)):
        sum(net[k](x).pow(2).sum() for k in ("a", "b")).backward()
        o.step()
        o.zero_grad()
    m["b"].requires_grad_(False)
    r["b"].requires_grad_(False)
    opt2 = ShardedAdamW(m.parameters(), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    ref2 = torch.optim.AdamW(r.parameters(), lr=0.1)
    ref2.load_state_dict(ref.state_dict())
    for step in range(3):
        if step == 1:
            m["b"].requires_grad_(True)
            r["b"].requires_grad_(True)
        for net, o in ((m, opt2), (r, ref2)):
            sum(net[k](x).pow(2).sum() for k in ("a", "b")).backward()
            o.step()
            o.zero_grad()
    _assert_same(m, opt2, r, ref2)


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(7, 7) for _ in range(3)])

    def forward(self, x: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        for j, lin in enumerate(self.layers):
            if j != skip:
                x = lin(x)
        return x


def _unused_on_one_rank(rank: int, world: int) -> bool:
    """Fuzzer, W=3 seed 2: with overlap_param_gather each rank learnt the all-gather order
    from its own first forward, so a module unused on one rank reordered that rank's
    all-gathers (gloo aborted: "292 vs 12 bytes")."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ours = _Chain()
    ref = copy.deepcopy(ours)
    opt = ShardedAdamW(ours.parameters(), lr=0.1, bucket_cap_mb=0.0001, overlap_param_gather=True)
    ref_net = DDP(ref, find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(2, 7, generator=torch.Generator().manual_seed(10 * step + rank))
        skip = 1 if step == 0 and rank == world - 1 else None  # unused on one rank
        for net, o in ((ours, opt), (ref_net, ref_opt)):
            net(x, skip).square().mean().backward()
            o.step()
            o.zero_grad()
    opt.sync_params()
    return all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_overlap_param_gather_agrees_on_the_gather_order_when_a_module_is_unused_on_one_rank():
    from . import distributed

    assert distributed.run(_unused_on_one_rank, 2) == [True, True]


def test_a_second_optimizer_over_the_same_parameters_takes_them_over():
    """The first optimizer's gradient hooks took ``p.grad`` before the second's: the second
    stepped on zero gradients, silently. Now the second takes over and the first refuses to
    step; its ``state_dict()`` still serves a rebuild-and-load."""
    (m, first), (r, ref) = _pair(_two_linears(), lr=0.1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for net, o in ((m, first), (r, ref)):
        net["a"](x).sum().backward()
        o.step()
        o.zero_grad()
    second = ShardedAdamW(m.parameters(), lr=0.1)
    second.load_state_dict(first.state_dict())
    for _ in range(2):
        for net, o in ((m, second), (r, ref)):
            sum(net[k](x).pow(2).sum() for k in ("a", "b")).backward()
            o.step()
            o.zero_grad()
    _assert_same(m, second, r, ref)
    with pytest.raises(RuntimeError, match="taken them over"):
        first.step()
