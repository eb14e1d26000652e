"""The CUDA path: construction, attach to DDP, standalone, bf16 masters, fused, clipping, a
``state_dict`` round trip with torch AdamW, a sharded checkpoint, int8 state and remainder
masters, over NCCL at W = 1 (and W = 2 where two GPUs exist).

The same scenario bodies also run on the CPU over gloo at W = 1 and 2, so that their logic is
checked on every machine. The CUDA runs are skipped, not passed, where torch sees no GPU; the
skip reason says so. On the CPU the claims are bitwise, fused included (it runs on each parameter's
owned part: torch's fused CPU kernel rounds a tensor's tail apart from its body). On CUDA (not yet
run on a GPU when this was written) they are held to ``CUDA_REL_TOL`` and bitwise equality is not
asserted, since cuBLAS and the foreach kernels there have not been checked for it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW, load_checkpoint, save_checkpoint

from . import distributed
from .models import MasterReference, TinyLM, batch, compare, loss_fn, param_groups

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_cuda = pytest.mark.skipif(
    GPUS < 1, reason="CUDA test: torch.cuda.is_available() is False on this machine"
)
needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"CUDA test at W = 2: needs 2 GPUs, torch sees {GPUS}"
)
SETUPS = [
    pytest.param(("cpu", "gloo", 1), id="cpu-gloo-W1"),
    pytest.param(("cpu", "gloo", 2), id="cpu-gloo-W2"),
    pytest.param(("cuda", "nccl", 1), id="cuda-nccl-W1", marks=needs_cuda),
    pytest.param(("cuda", "nccl", 2), id="cuda-nccl-W2", marks=[needs_cuda, needs_two_gpus]),
]
STEPS = 6
CUDA_REL_TOL = 1e-5


def _agree(a: nn.Module, b: nn.Module) -> dict:
    """Whether every parameter of ``b`` is bitwise ``a``'s, and the worst relative difference."""
    diffs = compare(a, b).values()
    return {"equal": all(d["equal"] for d in diffs), "rel": max(d["rel"] for d in diffs)}


def _train(net, opt, device, rank, steps, start=0, clip=None) -> list[float]:
    """``steps`` steps on the per-rank batches; returns the norms ``clip()`` reported."""
    norms = []
    for step in range(start, start + steps):
        x, y = (t.to(device) for t in batch(step, rank))
        loss_fn(net(x), y).backward()
        if clip is not None:
            norms.append(clip().item())
        opt.step()
        opt.zero_grad()
    return norms


def _pair(device: torch.device, attach: bool = True, **kwargs) -> tuple:
    """DDP + torch AdamW and ShardedAdamW (attached or standalone) from the same weights."""
    torch.manual_seed(0)
    ref_model = TinyLM().to(device)
    model = copy.deepcopy(ref_model)
    ids = [device.index] if device.type == "cuda" else None
    ref = DDP(ref_model, device_ids=ids)
    ref_opt = torch.optim.AdamW(param_groups(ref_model), **kwargs)
    opt = ShardedAdamW(param_groups(model), **kwargs)
    net = model
    if attach:
        net = DDP(model, device_ids=ids)
        opt.attach(net)
    return ref_model, ref, ref_opt, model, net, opt


def _scenarios(rank: int, world: int, device_type: str, ckpt: str) -> dict:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    out: dict = {}
    for name, attach, kwargs in (
        ("attach", True, {}),
        ("standalone", False, {}),
        ("fused", True, {"fused": True}),
    ):
        ref_model, ref, ref_opt, model, net, opt = _pair(device, attach, **kwargs)
        _train(ref, ref_opt, device, rank, STEPS)
        _train(net, opt, device, rank, STEPS)
        out[name] = _agree(ref_model, model)
        out[name]["devices"] = {str(b.device) for b in opt.buckets}
        out[name]["step_devices"] = {str(b.steps.device) for b in opt.buckets}

        if name == "attach":  # state_dict both ways with torch AdamW, then 3 more steps
            mine, theirs = opt.state_dict(), ref_opt.state_dict()
            out["state_dict_equal"] = all(
                torch.equal(mine["state"][i][k].cpu(), v.cpu())
                for i, entry in theirs["state"].items()
                for k, v in entry.items()
            )
            out["state_dict_rel"] = max(
                ((mine["state"][i][k].cpu() - v.cpu()).abs().max() / v.abs().max()).item()
                for i, entry in theirs["state"].items()
                for k, v in entry.items()
                if k != "step"
            )
            model2 = copy.deepcopy(ref_model)
            net2 = DDP(model2, device_ids=[device.index] if device.type == "cuda" else None)
            opt2 = ShardedAdamW(param_groups(model2))
            opt2.attach(net2)
            opt2.load_state_dict(theirs)
            _train(ref, ref_opt, device, rank, 3, start=STEPS)
            _train(net2, opt2, device, rank, 3, start=STEPS)
            out["resumed_from_torch"] = _agree(ref_model, model2)

            # sharded checkpoint: save, load into a fresh model and optimizer, go on alike
            save_checkpoint(ckpt, net2, opt2, extra={"step": STEPS + 3})
            torch.manual_seed(1)
            model3 = TinyLM().to(device)
            net3 = DDP(model3, device_ids=[device.index] if device.type == "cuda" else None)
            opt3 = ShardedAdamW(param_groups(model3))
            opt3.attach(net3)
            extra = load_checkpoint(ckpt, net3, opt3)
            out["checkpoint_extra"] = extra
            _train(net2, opt2, device, rank, 2, start=STEPS + 3)
            _train(net3, opt3, device, rank, 2, start=STEPS + 3)
            out["checkpoint"] = _agree(model2, model3)

        if name == "fused":  # torch AdamW(fused=True)'s state into a default ShardedAdamW
            model4 = copy.deepcopy(ref_model)
            net4 = DDP(model4, device_ids=[device.index] if device.type == "cuda" else None)
            opt4 = ShardedAdamW(param_groups(model4))
            opt4.attach(net4)
            opt4.load_state_dict(ref_opt.state_dict())
            _train(ref, ref_opt, device, rank, 2, start=STEPS)
            _train(net4, opt4, device, rank, 2, start=STEPS)
            out["fused_into_default"] = _agree(ref_model, model4)
            out["fused_into_default"]["fused"] = {g["fused"] for g in opt4.param_groups}
            out["fused_into_default"]["step_devices"] = {str(b.steps.device) for b in opt4.buckets}

    ref_model, ref, ref_opt, model, net, opt = _pair(device)
    want = _train(
        ref,
        ref_opt,
        device,
        rank,
        STEPS,
        clip=lambda: nn.utils.clip_grad_norm_(ref.parameters(), 0.05),
    )
    got = _train(net, opt, device, rank, STEPS, clip=lambda: opt.clip_grad_norm_(0.05))
    out["clip"] = _agree(ref_model, model)
    out["clip"]["norms"] = list(zip(want, got))

    torch.manual_seed(0)
    master_ref = MasterReference(TinyLM().to(device, torch.bfloat16))
    model = copy.deepcopy(master_ref.model)
    opt = ShardedAdamW(param_groups(model))
    for step in range(STEPS):
        x, y = (t.to(device) for t in batch(step, rank))
        loss_fn(master_ref.model(x), y).backward()
        master_ref.step()
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    masters = master_ref.masters()
    pairs = [
        (opt.state[p]["master_param"], masters[id(q)].detach().reshape(-1)[s.start : s.end])
        for p, q in zip(model.parameters(), master_ref.model.parameters())
        if opt.owns(p)
        for s in [opt.slot_of(p)[0].layout.slots[opt.slot_of(p)[1]]]
    ]
    out["bf16"] = {
        "equal": all(torch.equal(a, b) for a, b in pairs),
        "rel": max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs if b.numel()),
        "master_dtypes": {str(a.dtype) for a, _ in pairs},
        "params_are_cast_masters": all(
            torch.equal(p, masters[id(q)].detach().to(torch.bfloat16))
            for p, q in zip(model.parameters(), master_ref.model.parameters())
            if p.requires_grad
        ),
    }

    # smaller state on the parameters' device: int8 codes there (compiled kernels on CUDA),
    # training close to fp32 state; remainder masters bitwise the fp32 masters
    for dtype, options in (
        (torch.float32, {"state_dtype": torch.int8}),
        (torch.bfloat16, {"master_remainders": True}),
    ):
        torch.manual_seed(0)
        base = TinyLM(dim=64, hidden=96).to(device, dtype)  # 6,144-element matrices
        pair = []
        for kw in ({}, options):
            model = copy.deepcopy(base)
            opt = ShardedAdamW(param_groups(model), **kw)
            _train(model, opt, device, rank, STEPS)
            pair.append((model, opt))
        (plain, _), (small, small_opt) = pair
        key = "int8" if "state_dtype" in options else "remainders"
        out[key] = _agree(plain, small)
        stored = "exp_avg_codes" if key == "int8" else "master_param_low"
        out[key]["stored_on"] = {
            str(small_opt.state[p][stored].device)
            for p in small.parameters()
            if stored in small_opt.state.get(p, {})
        }

    if device.type == "cuda" and world > 1:  # model moved to cuda:rank without set_device
        torch.cuda.set_device(0)
        try:
            ShardedAdamW(nn.Linear(3, 3).to(device).parameters())
            out["wrong_device"] = None
        except RuntimeError as e:
            out["wrong_device"] = str(e)
        finally:
            torch.cuda.set_device(rank)
    return out


@pytest.fixture(scope="module", params=SETUPS)
def setup(request, tmp_path_factory):
    device_type, backend, world = request.param
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "latest")
    per_rank = distributed.run(_scenarios, world, device_type, ckpt, backend=backend, timeout=300)
    return device_type, world, per_rank


def _holds(device_type: str, r: dict) -> bool:
    """Bitwise on the CPU; within ``CUDA_REL_TOL`` on CUDA (see the module docstring)."""
    return r["equal"] if device_type == "cpu" else r["rel"] <= CUDA_REL_TOL


@pytest.mark.parametrize("scenario", ["attach", "standalone", "fused"])
def test_training_matches_ddp_torch_adamw_on_the_parameters_device(setup, scenario):
    device_type, world, per_rank = setup
    for rank, r in enumerate(per_rank):
        # fused runs on each parameter's owned part (its tail is the parameter's own, which the
        # CPU kernel rounds apart from its vector body): bitwise on the CPU too
        assert _holds(device_type, r[scenario]), (rank, r[scenario])
        want = "cpu" if device_type == "cpu" else f"cuda:{rank}"
        assert r[scenario]["devices"] == {want}, r[scenario]
        steps = want if scenario == "fused" else "cpu"  # where torch AdamW keeps them
        assert r[scenario]["step_devices"] == {steps}, r[scenario]


def test_clip_grad_norm_matches_torch_clip_on_ddp_gradients(setup):
    _, _, per_rank = setup
    for r in per_rank:
        for want, got in r["clip"]["norms"]:
            assert want > 0.05 and abs(got - want) <= 1e-6 * want, (want, got)
        assert r["clip"]["rel"] <= 1e-5, r["clip"]


def test_bf16_fp32_masters_match_an_fp32_master_reference(setup):
    device_type, _, per_rank = setup
    for r in per_rank:
        assert r["bf16"]["master_dtypes"] == {"torch.float32"}
        assert _holds(device_type, r["bf16"]), r["bf16"]
        assert r["bf16"]["params_are_cast_masters"]


def test_state_dict_is_torch_adamw_s_and_torch_s_loads_and_goes_on(setup):
    device_type, _, per_rank = setup
    for r in per_rank:
        if device_type == "cpu":
            assert r["state_dict_equal"]
        assert r["state_dict_rel"] <= CUDA_REL_TOL
        assert _holds(device_type, r["resumed_from_torch"]), r["resumed_from_torch"]


def test_torch_fused_state_dict_loads_into_a_default_optimizer_and_steps(setup):
    """Before the fix, CUDA raised here: CPU step tensors in the fused kernel (#124133)."""
    _, _, per_rank = setup
    for r in per_rank:
        assert r["fused_into_default"]["fused"] == {None}
        assert r["fused_into_default"]["step_devices"] == {"cpu"}
        # fused and the default implementation differ in the last bits (docs/numerics.md)
        assert r["fused_into_default"]["rel"] <= CUDA_REL_TOL, r["fused_into_default"]


def test_sharded_checkpoint_resumes_bitwise(setup):
    _, _, per_rank = setup
    for r in per_rank:
        assert r["checkpoint_extra"] == {"step": STEPS + 3}
        assert r["checkpoint"]["equal"], r["checkpoint"]


def test_smaller_state_lives_on_the_device_and_trains(setup):
    """int8 state within 10% of fp32 state after six steps (max difference over max value of
    each parameter: 5.1% measured on the CPU; the codes' resolution, not a bound of the
    method), its codes on the parameters' device; remainders bitwise the fp32 masters on the
    CPU, within ``CUDA_REL_TOL`` on CUDA."""
    device_type, _, per_rank = setup
    for rank, r in enumerate(per_rank):
        want = "cpu" if device_type == "cpu" else f"cuda:{rank}"
        assert r["int8"]["rel"] <= 0.1, r["int8"]
        assert r["int8"]["stored_on"] == {want}, r["int8"]
        assert _holds(device_type, r["remainders"]), r["remainders"]
        assert r["remainders"]["stored_on"] == {want}, r["remainders"]


def test_model_moved_without_set_device_fails_clearly_on_every_rank(setup):
    device_type, world, per_rank = setup
    if device_type != "cuda" or world < 2:
        pytest.skip("needs CUDA at W = 2 (shown on the CPU with a stubbed device elsewhere)")
    for r in per_rank:
        assert r["wrong_device"] is not None
        assert "rank 1" in r["wrong_device"] and "torch.cuda.set_device(1)" in r["wrong_device"]
