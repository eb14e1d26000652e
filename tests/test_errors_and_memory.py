"""Bad input gets a clear error that names the problem; optimizer memory is 8P/W."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW
from sharded_adamw.core import optimizer as optimizer_module

from . import distributed
from .models import Big


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(eps=-1e-8), "Invalid epsilon value"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(bucket_cap_mb=0), "Invalid bucket_cap_mb"),
    ],
)
def test_invalid_hyperparameters_are_rejected_like_torch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardedAdamW(nn.Linear(2, 2).parameters(), **kwargs)


def test_invalid_hyperparameters_in_a_later_group_name_the_group():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -2.0 \(param group 1\)"):
        ShardedAdamW([{"params": a.parameters()}, {"params": b.parameters(), "lr": -2.0}])


def test_a_parameter_appearing_twice_is_named():
    lin = nn.Linear(3, 2)
    with pytest.raises(
        ValueError, match=r"parameter #2 of group 0 \(shape \(2, 3\).*appears twice"
    ):
        ShardedAdamW([lin.weight, lin.bias, lin.weight])
    with pytest.raises(ValueError, match="more than one parameter group"):
        ShardedAdamW([{"params": [lin.weight]}, {"params": [lin.weight]}])


def test_named_parameters_are_named_in_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="'weight'.*appears twice"):
        ShardedAdamW([("weight", lin.weight), ("weight", lin.weight)])


def test_integer_parameters_are_rejected():
    """Complex parameters are supported (tests/test_regressions.py); integers are not, as in
    torch AdamW."""
    with pytest.raises(ValueError, match="floating-point"):
        ShardedAdamW([torch.zeros(3, dtype=torch.int64)])


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    for overlap in (True, False):  # raised in backward's hook, or in step() without hooks
        opt = ShardedAdamW(emb.parameters(), overlap_comm=overlap)
        with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter .*shape \(10, 3\)"):
            emb(torch.tensor([1, 2])).sum().backward()
            opt.step()
        emb.zero_grad()


def test_attach_needs_ddp():
    model = nn.Linear(2, 2)
    opt = ShardedAdamW(model.parameters())
    with pytest.raises(TypeError, match="DistributedDataParallel model, got Linear"):
        opt.attach(model)


def test_fused_and_foreach_together_are_rejected():
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        ShardedAdamW(nn.Linear(2, 2).parameters(), fused=True, foreach=True)


def test_frozen_parameters_get_no_state():
    model = nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    opt = ShardedAdamW(model.parameters())
    assert model.bias not in opt.state and model.weight in opt.state


def _distributed_checks(rank: int, world: int) -> dict:
    out: dict = {}
    model = Big()
    P = sum(p.numel() for p in model.parameters())
    opt = ShardedAdamW(model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    out["state_bytes"], out["expected"] = state, 8 * P / world
    out["allocated"] = opt.memory()["state_allocated_bytes"]

    # ranks disagree on a shape: every rank must raise, naming the parameter
    shapes = [(4, 5), (5, 4)] if rank == 0 else [(4, 5), (5, 3)]
    params = [(f"p{i}", nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]
    try:
        ShardedAdamW(params)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)

    # ranks disagree on the number of parameters
    n = 3 if rank == world - 1 else 2
    try:
        ShardedAdamW([nn.Parameter(torch.zeros(3)) for _ in range(n)])
        out["count"] = None
    except ValueError as e:
        out["count"] = str(e)

    # attach to a DDP whose parameters are not the optimizer's
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    try:
        ShardedAdamW(a.parameters()).attach(DDP(b))
        out["foreign"] = None
    except ValueError as e:
        out["foreign"] = str(e)
    return out


@pytest.fixture(scope="module", params=(2, 3, 4), ids=lambda w: f"W{w}")
def checks(request):
    return request.param, distributed.run(_distributed_checks, request.param)


def test_optimizer_state_bytes_are_8P_over_W_within_1_percent(checks):
    w, per_rank = checks
    for rank, r in enumerate(per_rank):
        assert abs(r["state_bytes"] - r["expected"]) <= 0.01 * r["expected"], (w, rank, r)
        assert abs(r["allocated"] - r["expected"]) <= 0.01 * r["expected"], (w, rank, r)


def test_ranks_with_different_parameters_fail_on_every_rank_naming_the_first_mismatch(checks):
    w, per_rank = checks
    for r in per_rank:
        assert r["mismatch"] is not None
        assert "parameter #1" in r["mismatch"] and "'p1'" in r["mismatch"]
        assert "shape (5, 4)" in r["mismatch"] and "shape (5, 3)" in r["mismatch"]
        assert r["count"] is not None and f"3 on rank {w - 1}" in r["count"]


def test_attach_to_a_ddp_with_other_parameters_names_the_parameter(checks):
    _, per_rank = checks
    for r in per_rank:
        assert r["foreign"] is not None and "'weight'" in r["foreign"]


def test_bf16_weights_loaded_after_construction_reseed_the_fp32_masters():
    """model.load_state_dict after the optimizer exists: the next step starts from the loaded
    weights, exactly as an optimizer built after the load would."""
    torch.manual_seed(0)
    model, other = nn.Linear(5, 3).bfloat16(), nn.Linear(5, 3).bfloat16()
    opt = ShardedAdamW(model.parameters())
    model.load_state_dict(other.state_dict())
    ref = nn.Linear(5, 3).bfloat16()
    ref.load_state_dict(other.state_dict())
    ref_opt = ShardedAdamW(ref.parameters())
    x = torch.randn(4, 5).bfloat16()
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).float().sum().backward()
            o.step()
            o.zero_grad()
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)


def test_model_to_after_construction_keeps_training_the_same_parameters():
    """``model.to("cpu:0")`` gives parameters new storage; the optimizer follows them."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = ShardedAdamW(model.parameters()), torch.optim.AdamW(ref.parameters())
    model.to(torch.device("cpu", 0))
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (ref, ref_opt)):
        m(x).sum().backward()
        o.step()
    assert torch.equal(model.weight, ref.weight)
    with pytest.raises(RuntimeError, match="changed from torch.float32 on cpu to torch.float64"):
        model.double()
        model(x.double()).sum().backward()
        opt.step()


def test_parameters_off_the_current_cuda_device_are_named_with_the_fix(monkeypatch):
    """Where a script moved the model with ``.to(f"cuda:{r}")`` but never called
    ``torch.cuda.set_device`` (current device stubbed: this machine may have no GPU)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    check = optimizer_module.current_device_mismatch
    problem = check(torch.device("cuda", 1))
    assert problem is not None
    assert "cuda:1" in problem and "cuda:0" in problem and "torch.cuda.set_device(1)" in problem
    assert check(torch.device("cuda", 0)) is None
    assert check(torch.device("cpu")) is None


def _wrong_cuda_device(rank: int, world: int) -> str | None:
    """Rank 1 is told, by the real check under a stubbed current device (cuda:0), that its
    parameters sit on cuda:1; the others are fine. Returns this rank's construction error."""
    real = optimizer_module.current_device_mismatch
    stubs = contextlib.ExitStack()
    if rank == 1:
        stubs.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        stubs.enter_context(
            mock.patch.object(
                optimizer_module,
                "current_device_mismatch",
                lambda device: real(torch.device("cuda", 1)),
            )
        )
    with stubs:
        try:
            ShardedAdamW(nn.Linear(3, 3).parameters())
        except RuntimeError as e:
            return str(e)
    return None


def test_a_rank_off_its_current_cuda_device_fails_on_every_rank_naming_it():
    for message in distributed.run(_wrong_cuda_device, 2, timeout=120):
        assert message is not None, "construction went on with a rank on the wrong device"
        assert "rank 1" in message and "cuda:1" in message and "cuda:0" in message
        assert "torch.cuda.set_device" in message
