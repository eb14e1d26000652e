"""Which collectives carry the data path, whichever way the process group was created.

``init_process_group()`` without a backend (what a plain torchrun script often writes) makes
a group whose ``dist.get_backend`` reads "undefined": gloo moves its CPU tensors and NCCL its
CUDA ones. The gloo paths (an in-place all-reduce of the bucket instead of gloo's
reduce-scatter, which clones its input; one broadcast per shard instead of gloo's slower
all-gather) must be taken there exactly as under ``init_process_group("gloo")``, with the
same bits. Before the backend was read per device, such a group fell back to gloo's
reduce-scatter and all-gather.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups

GLOO_PATH = {"allreduce_", "broadcast_"}  # what the data path may dispatch on gloo


class C10dOps(TorchDispatchMode):
    """Counts the ``c10d`` ops (every torch.distributed collective) dispatched while active."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _train(rank: int, world: int) -> dict:
    out = {}
    for mode in ("standalone", "attach"):
        torch.manual_seed(0)
        model = TinyLM()
        net = DDP(model) if mode == "attach" else model
        opt = ShardedAdamW(param_groups(model))
        if mode == "attach":
            opt.attach(net)
        ops: Counter = Counter()
        for step in range(3):
            x, y = batch(step, rank)
            with C10dOps(ops):
                loss_fn(net(x), y).backward()
                opt.step()
                opt.zero_grad()
        out[mode] = {
            "ops": dict(ops),
            "backend": opt.comm.backend_on(torch.device("cpu")),
            "params": [p.detach().numpy().tobytes() for p in model.parameters()],
        }
    return out


@pytest.fixture(scope="module")
def runs() -> dict:
    return {b: distributed.run(_train, 2, backend=b) for b in ("gloo", None)}


@pytest.mark.parametrize("backend", ["gloo", None])
@pytest.mark.parametrize("mode", ["standalone", "attach"])
def test_cpu_tensors_take_the_gloo_path(runs, backend, mode):
    for rank in runs[backend]:
        r = rank[mode]
        assert r["backend"] == "gloo"
        assert set(r["ops"]) == GLOO_PATH, r["ops"]


@pytest.mark.parametrize("mode", ["standalone", "attach"])
def test_an_undefined_backend_gives_the_same_bits(runs, mode):
    for named, undefined in zip(runs["gloo"], runs[None]):
        assert named[mode]["params"] == undefined[mode]["params"]  # the same bytes
