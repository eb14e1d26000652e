"""``torch.nn.utils`` clipping on a ShardedAdamW's parameters clips the sharded gradient.

Each scenario trains DDP + ``torch.optim.AdamW`` with torch's clipping and ShardedAdamW
(standalone or attached) with the very same torch call, and compares parameters after the
run and the norms every rank got. Clipping is active: the same run without clipping lands
far from the clipped one. All scenarios of a world size run in one spawn.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups

WORLD_SIZES = (2, 3)
STEPS = 6
TOL = 1e-6


def _norm_clip(params, max_norm=0.05):
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def _norm_clip_module(params, max_norm=0.05):
    return torch.nn.utils.clip_grad.clip_grad_norm_(params, max_norm)


def _value_clip(params, clip_value=2e-3):
    torch.nn.utils.clip_grad_value_(params, clip_value)
    return torch.zeros(())


def _total_then_clip(params, max_norm=0.05):
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# After a synchronising backward p.grad is None in both modes: get_total_norm receives no
# tensors, and the clip_grads_with_norm_ that follows must raise instead of clipping nothing.
UNROUTABLE = {("standalone", "total_then_clip"), ("attach", "total_then_clip")}
CLIPS = {
    "norm": _norm_clip,
    "norm_module": _norm_clip_module,
    "value": _value_clip,
    "total_then_clip": _total_then_clip,
}


def _run(rank: int, mode: str, clip, clip_ours: bool = True) -> tuple[dict, list[float]]:
    torch.manual_seed(0)
    ref_model = TinyLM()
    model = copy.deepcopy(ref_model)
    ref = DDP(ref_model)
    ref_opt = torch.optim.AdamW(param_groups(ref_model))
    opt = ShardedAdamW(param_groups(model))
    net = DDP(model) if mode == "attach" else model  # attached automatically
    norms = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss_fn(ref(x), y).backward()
        ref_norm = clip(ref_model.parameters())
        ref_opt.step()
        ref_opt.zero_grad()
        loss_fn(net(x), y).backward()
        if clip_ours:
            norms.append((float(ref_norm), float(clip(model.parameters()))))
        opt.step()
        opt.zero_grad()
    worst = max(
        (p.detach() - q.detach()).abs().max().item()
        for p, q in zip(ref_model.parameters(), model.parameters())
    )
    return {"worst": worst}, norms


def _mixed_params_raise(rank: int) -> str:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    opt = ShardedAdamW(a.parameters())
    torch.optim.AdamW(b.parameters())
    (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
    try:
        torch.nn.utils.clip_grad_norm_(list(a.parameters()) + list(b.parameters()), 1.0)
    except RuntimeError as e:
        opt.zero_grad()
        return str(e)
    return ""


def _scenarios(rank: int, W: int) -> dict:
    out = {}
    for mode in ("standalone", "attach"):
        for name, clip in CLIPS.items():
            if (mode, name) not in UNROUTABLE:
                out[(mode, name)] = _run(rank, mode, clip)
        out[(mode, "unclipped")] = _run(rank, mode, _norm_clip, clip_ours=False)
        out[(mode, "unroutable")] = _unroutable_raises(rank, mode)
    out["mixed"] = _mixed_params_raise(rank)
    return out


def _unroutable_raises(rank: int, mode: str) -> str:
    """get_total_norm([p.grad ...]) then clip_grads_with_norm_: the message it raises."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = ShardedAdamW(param_groups(model))
    net = DDP(model) if mode == "attach" else model
    x, y = batch(0, rank)
    loss_fn(net(x), y).backward()
    try:
        _total_then_clip(model.parameters())
    except RuntimeError as e:
        return str(e)
    finally:
        opt.zero_grad()
    return "no error"


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def results(request):
    return distributed.run(_scenarios, request.param, timeout=240)


@pytest.mark.parametrize("mode", ["standalone", "attach"])
@pytest.mark.parametrize("name", list(CLIPS))
def test_torch_clip_call_clips_the_sharded_gradient_like_adamw(results, mode, name):
    if (mode, name) in UNROUTABLE:
        for per_rank in results:
            assert "not computed from its sharded gradient" in per_rank[(mode, "unroutable")]
        return
    for per_rank in results:
        stats, norms = per_rank[(mode, name)]
        assert stats["worst"] < TOL, stats
        for ref_norm, ours in norms:
            assert abs(ref_norm - ours) <= 1e-5 * max(ref_norm, 1.0), norms
    # every rank got the same global norm
    assert len({tuple(n for _, n in r[(mode, name)][1]) for r in results}) == 1


@pytest.mark.parametrize("mode", ["standalone", "attach"])
def test_clipping_is_active_in_the_comparison(results, mode):
    for per_rank in results:
        assert per_rank[(mode, "unclipped")][0]["worst"] > 100 * TOL


def test_mixing_sharded_and_plain_parameters_raises(results):
    for per_rank in results:
        assert "does not optimize" in per_rank["mixed"]
