"""Issue 14: at most one device-to-host synchronisation per training step (the agreed skip
flag and parameter presence, read back from one small all-reduce), none at all with
``skip_nonfinite=False``, no grad scaler and presence known without asking the peers.

How syncs are counted on a CPU-only machine, where no real sync can be observed: every
Python-level call that would make the host wait for the device, or build a tensor from Python
data (a host-to-device copy on an accelerator), is patched to count for the duration of the
real step, on this thread only (the state servers' threads do not count):
``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``nonzero``, ``__bool__``, ``__float__``,
``__int__``, ``torch.equal``, ``torch.tensor`` and ``torch.as_tensor``. No dispatch mode is
used: under a ``TorchDispatchMode`` an in-place foreach op on views does not bump the base's
version counter, so a re-read keyed on a version counter (the step-count mirror's) would be
hidden from the count, as it once was.

One exemption, and only in the unfused runs: reads of the optimizer's own step-count
tensors. Outside ``fused``, torch keeps them on the CPU whatever the parameters' device, and
``torch.optim.AdamW`` reads each with ``.item()`` to compute the bias corrections: a host
read, not a sync, for ``torch.optim.AdamW`` as much as for us. The fused runs keep the step
counts where the parameters are, as on a GPU, and count everything.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sharded_adamw import ShardedAdamW, ShardedGradScaler

from . import distributed
from .models import TinyLM, batch, loss_fn, param_groups

STEPS = 4
TENSOR_READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__float__", "__int__")
TORCH_CALLS = ("equal", "tensor", "as_tensor")
SCENARIOS = {  # name: (attached, optimizer options, bf16 parameters, scaler, unused branch)
    "attached": (True, {}, False, False, False),
    "attached, skip_nonfinite=False": (True, {"skip_nonfinite": False}, False, False, False),
    "attached, fused": (True, {"fused": True}, False, False, False),
    "attached, ShardedGradScaler": (True, {}, False, True, False),
    "standalone": (False, {}, False, False, False),
    "standalone, skip_nonfinite=False": (False, {"skip_nonfinite": False}, False, False, False),
    "standalone, unused parameters": (False, {}, False, False, True),
    "standalone, fused": (False, {"fused": True}, False, False, False),
    "standalone, fused, unused parameters": (False, {"fused": True}, False, False, True),
    "standalone, bf16 master weights": (False, {}, True, False, False),
    "standalone, bf16, ShardedGradScaler": (False, {}, True, True, False),
    "attached, bf16 master weights": (True, {}, True, False, False),
}


class HostSyncs:
    """Counts, per call name, the host syncs of the code run inside ``reads_counted`` on this
    thread (see the module docstring); reads of tensors whose storage is in ``exempt`` do not
    count."""

    def __init__(self, exempt: set[int]):
        self.exempt = exempt
        self.counts: Counter[str] = Counter()

    @contextlib.contextmanager
    def reads_counted(self) -> Iterator[None]:
        me = threading.get_ident()
        patched = [(torch.Tensor, name) for name in TENSOR_READS]
        patched += [(torch, name) for name in TORCH_CALLS]
        originals = {(owner, name): getattr(owner, name) for owner, name in patched}

        def counting(owner, name: str):
            original = originals[(owner, name)]

            def call(*a, **k):
                if threading.get_ident() == me:
                    tensors = [t for t in a if isinstance(t, torch.Tensor)]
                    if (
                        owner is torch
                        and name in ("tensor", "as_tensor")
                        or not all(t.untyped_storage().data_ptr() in self.exempt for t in tensors)
                    ):
                        self.counts[name] += 1
                return original(*a, **k)

            return call

        for owner, name in patched:
            setattr(owner, name, counting(owner, name))
        try:
            yield
        finally:
            for (owner, name), original in originals.items():
                setattr(owner, name, original)


def _step_tensors_on_host(opt: ShardedAdamW) -> set[int]:
    """Storages of the step counts that torch keeps on the CPU by design (not fused)."""
    return {
        b.steps.untyped_storage().data_ptr()
        for b in opt.buckets
        if not b.group["fused"] and b.steps.device.type == "cpu"
    }


def _count(rank: int, name: str) -> list[dict[str, int]]:
    """Train ``STEPS`` steps of scenario ``name``; host syncs per step, backward included."""
    attached, options, bf16, use_scaler, unused = SCENARIOS[name]
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16) if bf16 else TinyLM()
    opt = ShardedAdamW(param_groups(model), **options)
    net = DDP(model) if attached else model
    if attached:
        opt.attach(net)
    scaler = ShardedGradScaler("cpu", init_scale=2.0**8) if use_scaler else None
    per_step = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss = loss_fn(net(x, use_branch=not (unused and step % 2)).float(), y)
        counter = HostSyncs(_step_tensors_on_host(opt))
        with counter.reads_counted():
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        opt.zero_grad()
        per_step.append(dict(counter.counts))
    assert opt.skipped_steps == 0
    return per_step


def _all(rank: int, world_size: int) -> dict[str, list[dict[str, int]]]:
    return {name: _count(rank, name) for name in SCENARIOS}


@pytest.fixture(scope="module")
def counts() -> dict[str, list[dict[str, int]]]:
    return distributed.run(_all, 2)[0]


@pytest.mark.parametrize("name", [n for n in SCENARIOS if "skip_nonfinite=False" not in n])
def test_at_most_one_host_sync_per_step(counts, name):
    """The skip flag (and, where the peers must agree on it, which parameters had a
    gradient) comes back in one read of one small all-reduce: at most one sync per step."""
    per_step = [sum(c.values()) for c in counts[name]]
    assert max(per_step) <= 1, f"{name}: syncs per step {counts[name]}"


def test_no_host_sync_without_nonfinite_check_or_scaler_when_attached(counts):
    """Attached to a DDP that reduces every parameter, with ``skip_nonfinite=False`` and no
    scaler, there is nothing to agree on: the step never waits for the device."""
    assert counts["attached, skip_nonfinite=False"] == [{}] * STEPS


@pytest.mark.parametrize(
    "name", ["attached, fused", "standalone, fused", "standalone, fused, unused parameters"]
)
def test_no_host_sync_at_all_on_the_fused_path(counts, name):
    """fused: the agreed flags stay on the device: the non-finite flag goes to fused AdamW as
    ``found_inf``, and a parameter this rank had no gradient for steps in a call of its own,
    skipped on the device where no rank had one. The step never waits for the device."""
    assert counts[name] == [{}] * STEPS


def test_standalone_without_nonfinite_check_agrees_on_presence_only(counts):
    """Standalone, some parameter may have had no gradient on some rank: presence is agreed
    in the one small all-reduce, still at most one sync."""
    per_step = [sum(c.values()) for c in counts["standalone, skip_nonfinite=False"]]
    assert max(per_step) <= 1, counts["standalone, skip_nonfinite=False"]


def test_a_step_count_written_through_opt_state_is_seen():
    """The uniform-step shortcut reads a host mirror of the step counts; a write through
    ``opt.state[p]["step"]`` (as checkpoint loaders make) must reach the next update, bitwise
    as ``torch.optim.AdamW`` with the same write."""
    torch.manual_seed(0)
    model = TinyLM()
    ref = TinyLM()
    ref.load_state_dict(model.state_dict())
    opt = ShardedAdamW(param_groups(model))
    ref_opt = torch.optim.AdamW(param_groups(ref))
    for step in range(3):
        for net, o in ((model, opt), (ref, ref_opt)):
            x, y = batch(step, 0)
            loss_fn(net(x), y).backward()
            o.step()
            o.zero_grad()
            if step == 0:
                o.state[net.up.weight]["step"].fill_(7.0)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert opt.state[model.up.weight]["step"].item() == 9.0
