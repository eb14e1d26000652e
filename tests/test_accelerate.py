"""Issue 6: a script written for accelerate trains with ShardedAdamW exactly as with
torch AdamW, with no change but the optimizer class (2 CPU processes over gloo).

It uses prepare(model, optimizer, loader), backward, accumulate (2 micro-batches), gradient
clipping, bf16 mixed precision and save_state / load_state. Clipping computes the global norm
from shards in another summation order than ``torch.nn.utils.clip_grad_norm_``, so parameters
are compared to ``REL_TOL``; the norms to 1e-6 relative.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sharded_adamw import ShardedAdamW

from . import distributed
from .models import VOCAB, TinyLM, compare, loss_fn, param_groups

REL_TOL = 1e-5


def _accelerate_script(rank: int, world: int, tmp: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(0)
    ref, model = TinyLM(), None
    model = copy.deepcopy(ref)
    ref_opt = torch.optim.AdamW(param_groups(ref))
    opt = ShardedAdamW(param_groups(model))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (64, 5), generator=g)
    loader = DataLoader(TensorDataset(x, torch.roll(x, 1, dims=1)), batch_size=4)
    ref, ref_opt, model, opt, loader = acc.prepare(ref, ref_opt, model, opt, loader)
    attached = opt.optimizer.attached_model is model

    def train(batches) -> list:
        norms = []
        for xb, yb in batches:
            with acc.accumulate(ref, model):
                for m, o in ((ref, ref_opt), (model, opt)):
                    acc.backward(loss_fn(m(xb), yb))
                    if acc.sync_gradients:
                        norms.append(acc.clip_grad_norm_(m.parameters(), 0.5).item())
                    o.step()
                    o.zero_grad()
        return norms

    batches = list(loader)
    norms = train(batches[:4])
    acc.save_state(tmp)
    norms += train(batches[4:])
    after = [p.detach().clone() for p in model.parameters()]
    acc.load_state(tmp)
    train(batches[4:])
    resumed = all(torch.equal(a, p) for a, p in zip(after, model.parameters()))
    return {
        "attached": attached,
        "norms": norms,
        "params": compare(ref, model),
        "resumed_equal": resumed,
        "steps": opt.optimizer.state[opt.optimizer.owned_params()[0]]["step"].item(),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return distributed.run(_accelerate_script, 2, str(tmp_path_factory.mktemp("acc")))


def test_prepare_attaches_the_optimizer_to_the_prepared_ddp_model(results):
    assert all(r["attached"] for r in results)


def test_clip_grad_norm_reports_the_global_norm_on_every_rank(results):
    norms = [r["norms"] for r in results]
    assert norms[0] == norms[1], "ranks disagree on the norm"
    ref_norms, ours = norms[0][0::2], norms[0][1::2]
    assert len(ours) >= 4
    for want, got in zip(ref_norms, ours):
        assert abs(got - want) <= 1e-6 * want, (want, got)


def test_training_matches_torch_adamw(results):
    for r in results:
        assert r["steps"] == 4  # 8 micro-batches per rank, 2 per step (resumed at 2)
        for name, v in r["params"].items():
            assert v["rel"] <= REL_TOL, (name, v)


def test_save_state_and_load_state_resume_bitwise(results):
    assert all(r["resumed_equal"] for r in results)
