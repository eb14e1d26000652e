"""Issue 7: hybrid sharding over a 2-D DeviceMesh ("replicate", "shard") at W = 4 as 2 x 2.

Gradients are reduce-scattered inside a shard group and the shard is then all-reduced across
the replicate group, so each element's four contributions are summed as (a + b) + (c + d),
where DDP's ring sums them in another order: results match DDP + torch AdamW to ``REL_TOL``
rather than bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import Big, TinyLM, batch, compare, loss_fn, param_groups

REL_TOL = 1e-6


def _hybrid(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out: dict = {}
    for mode in ("standalone", "attach"):
        torch.manual_seed(0)
        ref_model = TinyLM()
        model = copy.deepcopy(ref_model)
        ref = DDP(ref_model)
        ref_opt = torch.optim.AdamW(param_groups(ref_model))
        opt = ShardedAdamW(param_groups(model), process_group=mesh)
        net = model
        if mode == "attach":
            net = DDP(model)
            opt.attach(net)
        for step in range(15):
            x, y = batch(step, rank)
            for m, o in ((ref, ref_opt), (net, opt)):
                loss_fn(m(x), y).backward()
                o.step()
                o.zero_grad()
        out[mode] = {
            "params": compare(ref_model, model),
            "comm": opt.comm_stats(),
            "padded": sum(b.layout.padded_numel for b in opt.buckets),
            "shard_numel": sum(b.layout.shard_numel for b in opt.buckets),
            "n_params": len(opt.owned_params()),
        }
    big = Big()
    P = sum(p.numel() for p in big.parameters())
    opt = ShardedAdamW(big.parameters(), process_group=mesh)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    out["memory"] = {"state": state, "expected": 8 * P / 2}
    try:
        ShardedAdamW(TinyLM().parameters(), process_group=init_device_mesh("cpu", (2, 2)))
        out["unnamed"] = None
    except ValueError as e:
        out["unnamed"] = str(e)
    try:
        ShardedAdamW(TinyLM().parameters(), process_group=init_device_mesh("cpu", (1, 2, 2)))
        out["3-D"] = None
    except ValueError as e:
        out["3-D"] = str(e)
    flat = ShardedAdamW(TinyLM().parameters(), process_group=init_device_mesh("cpu", (4,)))
    out["1-D shards over"] = flat.memory()["world_size"]
    return out


@pytest.fixture(scope="module", params=distributed.PATHS)
def results(request):
    return distributed.run(_hybrid, 4, data_path=request.param)


@pytest.mark.parametrize("mode", ["standalone", "attach"])
def test_2x2_mesh_matches_ddp_adamw(results, mode):
    for rank, r in enumerate(results):
        for name, v in r[mode]["params"].items():
            assert v["rel"] <= REL_TOL, (rank, mode, name, v)


def test_2x2_mesh_state_is_8P_over_shard_size(results):
    for r in results:
        m = r["memory"]
        assert abs(m["state"] - m["expected"]) <= 0.01 * m["expected"], m


@pytest.mark.parametrize("mode", ["standalone", "attach"])
def test_only_the_shard_crosses_the_replicate_group(results, mode):
    for r in results:
        c = r[mode]
        # reduce-scatter and all-gather inside the shard group move the padded bucket; the
        # all-reduce across replicas moves only this rank's shard (counted as RS + AG: 2x)
        assert c["comm"]["reduce_scatter_bytes"] == 4 * c["padded"]
        assert c["comm"]["all_gather_bytes"] == 4 * c["padded"]
        flags = c["comm"]["all_reduce_bytes"] - 2 * 4 * c["shard_numel"]
        # plus the small agreement per step (non-finite flag, and standalone which
        # parameters had gradients), all-reduced in both groups
        assert 0 <= flags <= 2 * 2 * 4 * (1 + c["n_params"])


def test_a_mesh_without_dim_names_is_refused(results):
    for r in results:
        assert r["unnamed"] is not None and "('replicate', 'shard')" in r["unnamed"]


def test_a_1d_mesh_shards_over_all_its_ranks_and_a_3d_mesh_is_refused(results):
    for r in results:
        assert r["1-D shards over"] == 4
        assert "must be 1-D or 2-D, got 3-D" in r["3-D"]
