"""Issue 15: checkpoints that move between DDP + AdamW, FSDP2 and ShardedAdamW.

``save_checkpoint`` writes, and ``load_checkpoint`` reads, the layout of
``torch.distributed.checkpoint.state_dict.get_state_dict`` saved with
``dcp.save({"model": model_sd, "optim": optim_sd})``. The torch side here is exactly that
convention (``_torch_save`` / ``_torch_load``), nothing of ours.

Every run reads the same global batch of ``GLOBAL`` samples per step, split evenly over its
ranks, so runs at different world sizes follow the same trajectory up to the order in which
gradients are summed. Claims:

- Right after a load the state is bitwise the state that was saved, in either direction
  (DCP only moves bytes), and fp32 master weights land on the other side's fp32 parameters.
- Continuing at the same world size (DDP W=2 -> ShardedAdamW W=2) is bitwise.
- Continuing at another world size (W=2 <-> W=3) or under FSDP2 agrees to ``RTOL``
  (measured: about 1e-6, see the README), because the averaged gradient is summed in
  another order; under bf16 compute at another world size the local bf16 gradients differ
  in rounding, and FSDP2's fp32 parameters agree with our masters to ``BF16_RTOL`` (measured
  1.5e-3 after 3 steps at lr 1e-2).
- Each rank's boxes go to that rank's file, and the keys equal those torch writes.
- Checkpoints of sharded-adamw 0.1 (``optim/<name>/exp_avg``, 1-D) load bitwise; the fixtures
  in tests/data/checkpoint_v1 were written at W=2 by the code of commit 2bec986.

One spawn of 3 processes plays every world size (subgroups for W=2).
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW
from sharded_adamw.checkpointing.boxes import flat_range_boxes
from sharded_adamw.checkpointing.checkpoint import (
    CheckpointError,
    _no_dist,
    load_checkpoint,
    save_checkpoint,
)

from . import distributed
from .models import VOCAB, TinyLM, loss_fn, param_groups

K, STEPS, GLOBAL = 3, 6, 12
RTOL, BF16_RTOL = 1e-6, 5e-3
DATA = Path(__file__).parent / "data" / "checkpoint_v1"

# FSDP2 runs on CPU only where torch's CPU stream records events (torch 2.6 has no such
# method, so ``fully_shard`` fails there in its first forward): the FSDP2 legs need it.
FSDP2_ON_CPU = hasattr(torch.cpu.current_stream(), "record_event")
FSDP2_SKIP = "FSDP2 on CPU needs torch.cpu.Stream.record_event (torch 2.6 lacks it)"


def _global_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (GLOBAL, 5), generator=g)
    rows = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    return x[rows], torch.roll(x, 1, dims=1)[rows]


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int):
    for step in steps:
        x, y = _global_batch(step, rank, world)
        loss_fn(net(x).float(), y).backward()
        opt.step()
        opt.zero_grad()


def _torch_save(path: Path, net: nn.Module, opt: torch.optim.Optimizer, group) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, process_group=group)


def _torch_load(path: Path, net: nn.Module, opt: torch.optim.Optimizer, group) -> None:
    model_sd, optim_sd = get_state_dict(net, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, process_group=group)
    set_state_dict(net, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _params(opt: torch.optim.Optimizer) -> list:
    return [p for g in opt.param_groups for p in g["params"]]


def _state_differs(opt: torch.optim.Optimizer, expected: dict, masters: bool = False) -> list:
    """Keys where ``opt``'s state (torch AdamW over DDP or FSDP2 parameters) differs bitwise
    from ``expected`` (a full ``state_dict()``); with ``masters``, the fp32 parameters are
    compared with the saved ``master_param``."""
    out = [] if expected["state"] else ["nothing to compare"]
    for i, p in enumerate(_params(opt)):
        if i not in expected["state"]:
            continue
        mine = {k: _full(v) for k, v in opt.state[p].items()}
        if masters:
            mine["master_param"] = _full(p.detach())
        for k, t in expected["state"][i].items():
            if not torch.equal(mine.get(k, torch.empty(0)), t):
                out.append(f"{i}/{k}")
    return out


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference over the parameters, relative to the parameter's largest value."""
    return max(
        ((x.double() - y.double()).abs().max() / y.double().abs().max()).item()
        for x, y in zip(a, b)
    )


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [_full(p.detach()).float() for p in model.parameters()]


def _sharded(seed: int, group, dtype=torch.float32) -> tuple[nn.Module, ShardedAdamW]:
    torch.manual_seed(seed)
    model = TinyLM().to(dtype)
    return model, ShardedAdamW(param_groups(model), process_group=group)


def _ddp(seed: int, group) -> tuple[nn.Module, DDP, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, DDP(model, process_group=group), torch.optim.AdamW(param_groups(model))


def _fsdp(seed: int, group, mp: MixedPrecisionPolicy | None = None):
    torch.manual_seed(seed)
    model = TinyLM()
    fully_shard(
        model, mesh=DeviceMesh.from_group(group, "cpu"), mp_policy=mp or MixedPrecisionPolicy()
    )
    return model, torch.optim.AdamW(param_groups(model))


def _interop(rank: int, world: int, tmp: str) -> dict:
    tmp_path = Path(tmp)
    pair = dist.new_group([0, 1])
    out: dict = {}

    def share(name: str, obj) -> object:
        """``obj`` from rank 0, on every rank (through a file; small)."""
        if rank == 0:
            torch.save(obj, tmp_path / f"{name}.pt")
        dist.barrier()
        return torch.load(tmp_path / f"{name}.pt")

    # -- DDP + AdamW at W=2 writes with DCP alone; ShardedAdamW at W=3 and W=2 resume --
    path = tmp_path / "from_ddp"
    saved = reference = None
    if rank < 2:
        model, net, adamw = _ddp(0, pair)
        _train(net, adamw, range(K), rank, 2)
        _torch_save(path, net, adamw, pair)
        saved = copy.deepcopy(adamw.state_dict())  # torch's holds live tensors
        _train(net, adamw, range(K, STEPS), rank, 2)
        reference = _weights(model)
    saved, reference = share("ddp_saved", saved), share("ddp_reference", reference)
    model, opt = _sharded(1, None)
    out["extra from torch"] = load_checkpoint(path, model, opt)
    out["ddp2->ours3 loaded"] = _state_differs_ours(opt, saved)
    _train(model, opt, range(K, STEPS), rank, 3)
    out["ddp2->ours3 rel"] = _rel(_weights(model), reference)
    if rank < 2:
        model, net, opt = _attached(1, pair)
        load_checkpoint(path, net, opt)
        _train(net, opt, range(K, STEPS), rank, 2)
        out["ddp2->ours2 equal"] = [torch.equal(a, b) for a, b in zip(_weights(model), reference)]
    dist.barrier()

    # -- ShardedAdamW at W=3 writes; DDP + AdamW and FSDP2 at W=2 resume through torch alone --
    path = tmp_path / "from_ours"
    model, opt = _sharded(0, None)
    _train(model, opt, range(K), rank, 3)
    save_checkpoint(path, model, opt, extra={"step": K})
    saved = opt.state_dict()
    _train(model, opt, range(K, STEPS), rank, 3)
    reference = _weights(model)
    model, opt = _sharded(1, None)
    out["extra from ours"] = load_checkpoint(path, model, opt)
    if rank < 2:
        model, net, adamw = _ddp(1, pair)
        _torch_load(path, net, adamw, pair)
        out["ours3->ddp2 loaded"] = _state_differs(adamw, saved)
        _train(net, adamw, range(K, STEPS), rank, 2)
        out["ours3->ddp2 rel"] = _rel(_weights(model), reference)
    if rank < 2 and FSDP2_ON_CPU:
        model, adamw = _fsdp(1, pair)
        _torch_load(path, model, adamw, pair)
        out["ours3->fsdp2 loaded"] = _state_differs(adamw, saved)
        _train(model, adamw, range(K, STEPS), rank, 2)
        out["ours3->fsdp2 rel"] = _rel(_weights(model), reference)
    dist.barrier()

    # -- bf16 parameters with fp32 masters at W=3 -> fp32 DDP and FSDP2 (bf16 compute) at W=2 --
    path = tmp_path / "from_ours_bf16"
    model, opt = _sharded(0, None, torch.bfloat16)
    _train(model, opt, range(K), rank, 3)
    save_checkpoint(path, model, opt)
    saved = opt.state_dict()
    _train(model, opt, range(K, STEPS), rank, 3)
    masters = {i: s["master_param"] for i, s in opt.state_dict()["state"].items()}
    if rank < 2:
        model, net, adamw = _ddp(1, pair)
        _torch_load(path, net, adamw, pair)
        out["bf16 ours3->ddp2 loaded"] = _state_differs(adamw, saved, masters=True)
    if rank < 2 and FSDP2_ON_CPU:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model, adamw = _fsdp(1, pair, mp)
        _torch_load(path, model, adamw, pair)
        out["bf16 ours3->fsdp2 loaded"] = _state_differs(adamw, saved, masters=True)
        _train(model, adamw, range(K, STEPS), rank, 2)
        fp32 = [_full(p.detach()) for p in _params(adamw)]
        out["bf16 ours3->fsdp2 rel"] = _rel([fp32[i] for i in masters], list(masters.values()))
    model, opt = _sharded(1, None, torch.bfloat16)
    load_checkpoint(path, model, opt)
    out["bf16 ours3->ours3 loaded"] = _state_differs_ours(opt, saved)

    # -- checkpoints of sharded-adamw 0.1, written at W=2, at W=3 --
    for name, (dtype, amsgrad) in V1.items():
        model, opt = _v1_target(dtype, amsgrad, None)
        expected = torch.load(DATA / f"{name}.pt")
        out[f"v1 {name} extra"] = load_checkpoint(DATA / name, model, opt)
        out[f"v1 {name} loaded"] = _state_differs_ours(opt, expected["opt"]) + [
            k for k, v in model.state_dict().items() if not torch.equal(v, expected["model"][k])
        ]
    return out


def _attached(seed: int, group) -> tuple[nn.Module, DDP, ShardedAdamW]:
    model, opt = _sharded(seed, group)
    net = DDP(model, process_group=group)
    opt.attach(net)
    return model, net, opt


def _state_differs_ours(opt: ShardedAdamW, expected: dict) -> list:
    """Keys where ``opt.state_dict()`` (collective) differs bitwise from ``expected``."""
    got = opt.state_dict()
    if not expected["state"]:
        return ["nothing to compare"]
    return [
        f"{i}/{k}"
        for i, entry in expected["state"].items()
        for k, t in entry.items()
        if not torch.equal(got["state"].get(i, {}).get(k, torch.empty(0)), t)
    ] + (["param_groups"] if got["param_groups"] != expected["param_groups"] else [])


V1 = {"fp32_amsgrad": (torch.float32, True), "bf16_master": (torch.bfloat16, False)}


def _v1_target(dtype: torch.dtype, amsgrad: bool, group) -> tuple[nn.Module, ShardedAdamW]:
    torch.manual_seed(5)
    model = TinyLM().to(dtype)
    return model, ShardedAdamW(param_groups(model), amsgrad=amsgrad, process_group=group)


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("interop")
    return tmp, distributed.run(_interop, 3, str(tmp), timeout=150)


def test_ddp_checkpoint_written_by_dcp_alone_loads_into_sharded_adamw_bitwise(interop):
    for rank, r in enumerate(interop[1]):
        assert r["ddp2->ours3 loaded"] == [], f"rank {rank}: {r['ddp2->ours3 loaded']}"
        assert r["extra from torch"] == {}


def test_ddp_checkpoint_continues_bitwise_at_the_same_world_size(interop):
    for rank, r in enumerate(interop[1][:2]):
        assert all(r["ddp2->ours2 equal"]), f"rank {rank}: {r['ddp2->ours2 equal']}"


def test_ddp_checkpoint_continues_at_another_world_size_to_the_ddp_run(interop):
    for rank, r in enumerate(interop[1]):
        assert r["ddp2->ours3 rel"] <= RTOL, f"rank {rank}: {r['ddp2->ours3 rel']}"


@pytest.mark.parametrize("to", ["ddp2", "fsdp2"])
def test_sharded_adamw_checkpoint_loads_into_torch_bitwise_and_continues(interop, to):
    if to == "fsdp2" and not FSDP2_ON_CPU:
        pytest.skip(FSDP2_SKIP)
    for rank, r in enumerate(interop[1][:2]):
        assert r[f"ours3->{to} loaded"] == [], f"rank {rank}: {r[f'ours3->{to} loaded']}"
        assert r[f"ours3->{to} rel"] <= RTOL, f"rank {rank}: {r[f'ours3->{to} rel']}"
    assert all(r["extra from ours"] == {"step": K} for r in interop[1])


@pytest.mark.parametrize("to", ["ddp2", "fsdp2"])
def test_fp32_master_weights_become_the_fp32_parameters_of_the_other_side(interop, to):
    if to == "fsdp2" and not FSDP2_ON_CPU:
        pytest.skip(FSDP2_SKIP)
    for rank, r in enumerate(interop[1][:2]):
        assert r[f"bf16 ours3->{to} loaded"] == [], f"rank {rank}: {r[f'bf16 ours3->{to} loaded']}"
    for r in interop[1]:
        assert r["bf16 ours3->ours3 loaded"] == []


@pytest.mark.skipif(not FSDP2_ON_CPU, reason=FSDP2_SKIP)
def test_bf16_training_continues_under_fsdp2_mixed_precision(interop):
    for rank, r in enumerate(interop[1][:2]):
        assert r["bf16 ours3->fsdp2 rel"] <= BF16_RTOL, f"rank {rank}: {r['bf16 ours3->fsdp2 rel']}"


@pytest.mark.parametrize("name", V1)
def test_checkpoint_of_version_0_1_loads_at_another_world_size_bitwise(interop, name):
    for rank, r in enumerate(interop[1]):
        assert r[f"v1 {name} loaded"] == [], f"rank {rank}: {r[f'v1 {name} loaded']}"
        assert r[f"v1 {name} extra"] == {"step": K}


@pytest.mark.parametrize("name", V1)
def test_checkpoint_of_version_0_1_loads_in_a_single_process(name):
    model, opt = _v1_target(*V1[name], None)
    expected = torch.load(DATA / f"{name}.pt")
    assert load_checkpoint(DATA / name, model, opt) == {"step": K}
    assert _state_differs_ours(opt, expected["opt"]) == []
    assert all(torch.equal(v, expected["model"][k]) for k, v in model.state_dict().items())


def _metadata(path: Path):
    return FileSystemReader(path).read_metadata()


def test_keys_and_layout_are_those_torch_writes(interop):
    """Same keys, same nesting (DCP's planner data), same shapes and dtypes as the
    checkpoint DDP + AdamW wrote, plus our one ``sharded_adamw`` entry."""
    ours, theirs = _metadata(interop[0] / "from_ours"), _metadata(interop[0] / "from_ddp")
    assert sorted(ours.state_dict_metadata) == sorted(
        [*theirs.state_dict_metadata, "sharded_adamw"]
    )
    assert ours.planner_data == {**theirs.planner_data, "sharded_adamw": ("sharded_adamw",)}
    for key, md in theirs.state_dict_metadata.items():
        if hasattr(md, "size"):
            assert ours.state_dict_metadata[key].size == md.size, key
            assert ours.state_dict_metadata[key].properties.dtype == md.properties.dtype, key


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_param_groups_are_those_torch_writes(interop):
    groups = {}
    for which in ("from_ours", "from_ddp"):
        path = interop[0] / which
        keys = [k for k in _metadata(path).state_dict_metadata if k.startswith("optim.param_")]
        read = dict.fromkeys(keys, "")
        dcp.load(read, checkpoint_id=path, **_no_dist(dcp.load, False))
        groups[which] = read
    assert groups["from_ours"] == groups["from_ddp"]
    assert groups["from_ours"]["optim.param_groups.1.params"][0] == "frozen_scale"


def test_each_rank_wrote_exactly_the_boxes_of_its_owned_range(interop):
    """Each rank's pieces of a state tensor are the boxes of one contiguous flat range, and
    the ranks' ranges partition the tensor in rank order (``layout.py``)."""
    md = _metadata(interop[0] / "from_ours")
    model = TinyLM()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pieces: dict = {}
    for index, info in md.storage_data.items():
        fqn = index.fqn
        if not fqn.startswith("optim.state.") or fqn.endswith(".step"):
            continue
        rank = int(info.relative_path.split("_")[2])  # __<rank>_0.distcp
        chunk = next(c for c in md.state_dict_metadata[fqn].chunks if c.offsets == index.offset)
        pieces.setdefault(fqn, {}).setdefault(rank, []).append(chunk)
    checked = 0
    for fqn, by_rank in pieces.items():
        shape = shapes[fqn[len("optim.state.") :].rpartition(".")[0]]
        strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
        ends = 0
        for rank in sorted(by_rank):
            flat = sorted(
                (sum(o * s for o, s in zip(c.offsets, strides)), math.prod(c.sizes), c)
                for c in by_rank[rank]
            )
            start, end = flat[0][0], flat[-1][0] + flat[-1][1]
            assert start == ends, (fqn, rank)  # the ranks' ranges follow each other
            boxes = [(b.offsets, b.sizes) for b in flat_range_boxes(shape, start, end)]
            assert sorted(boxes) == sorted((tuple(c.offsets), tuple(c.sizes)) for *_, c in flat)
            ends = end
            checked += 1
        assert ends == math.prod(shape), fqn
    assert checked > len(pieces)  # some tensors are split over ranks


def test_torch_written_checkpoint_with_a_cut_file_raises_and_changes_nothing(interop, tmp_path):
    bad = tmp_path / "cut"
    shutil.copytree(interop[0] / "from_ddp", bad)
    f = bad / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    model, opt = _sharded(3, None)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match="reading checkpoint .*cut failed"):
        load_checkpoint(bad, model, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(int(s["step"]) == 0 for s in opt.state.values())


def test_torch_written_checkpoint_of_another_model_names_the_parameter(interop):
    model = TinyLM(hidden=31)
    opt = ShardedAdamW(param_groups(model))
    with pytest.raises(CheckpointError, match="optimizer state 'exp_avg' of parameter 'up.weight'"):
        load_checkpoint(interop[0] / "from_ddp", model, opt)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_parameters_without_state_in_a_torch_checkpoint_start_fresh(tmp_path):
    """torch creates AdamW state at a parameter's first update: the branch, unused in the
    one step, has none in the checkpoint, and starts at step 0 here too."""
    torch.manual_seed(0)
    model = TinyLM()
    adamw = torch.optim.AdamW(param_groups(model))
    x, y = _global_batch(0, 0, 1)
    loss_fn(model(x, use_branch=False), y).backward()
    adamw.step()
    model_sd, optim_sd = get_state_dict(model, adamw)
    assert "branch.weight" not in optim_sd["state"]
    dcp.save(
        {"model": model_sd, "optim": optim_sd},
        checkpoint_id=tmp_path,
        **_no_dist(dcp.save, False),
    )
    target, opt = _sharded(3, None)
    _train(target, opt, range(1), 0, 1)  # state to be reset
    assert load_checkpoint(tmp_path, target, opt) == {}
    assert _state_differs_ours(opt, adamw.state_dict()) == []
    branch = opt.state[target.branch.weight]
    assert int(branch["step"]) == 0 and not branch["exp_avg"].any()
