"""The non-finite check of ``skip_nonfinite`` (``agreement.check_finite``), in one process:
a single NaN, +inf or -inf anywhere in any gradient skips the step, and finite gradients as
large as the dtype allows do not (a norm of the shard would overflow on them)."""

import pytest
import torch

from sharded_adamw import ShardedAdamW


def _step_with(
    value: float, where: int, dtype: torch.dtype = torch.float32, fused: bool = False
) -> bool:
    """Whether a step whose gradients are all 1e-3 except ``value`` at flat position
    ``where`` of the second parameter changed the parameters."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (7, 1000, 33)]
    opt = ShardedAdamW(params, lr=0.1, bucket_cap_mb=0.001, fused=fused)  # several buckets
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    params[1].grad.view(-1)[where] = value
    opt.step()
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.mark.parametrize("fused", [False, True], ids=["decided on host", "fused, on device"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 517, 999])
def test_one_nonfinite_element_skips_the_step(value, where, fused):
    assert not _step_with(value, where, fused=fused)


def test_fused_skip_on_device_keeps_steps_and_state_like_a_step_not_taken():
    """fused: the agreed flag goes to fused AdamW as ``found_inf``; a skipped step leaves
    parameters, state and step counts as if it was never taken, and is counted."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n)) for n in (7, 1000, 33)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = ShardedAdamW(ours, lr=0.1, bucket_cap_mb=0.001, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, fused=True)
    for step in range(4):
        for params, o in ((ours, opt), (ref, ref_opt)):
            for p in params:
                p.grad = torch.full_like(p, 1e-3 * (step + 1))
            if step == 1:
                params[2].grad[5] = float("nan")
                if o is ref_opt:
                    continue  # the reference does not take that step
            o.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    sd, ref_sd = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for k in ref_sd:
        assert sd[k]["step"].item() == ref_sd[k]["step"].item() == 3
        assert torch.equal(sd[k]["exp_avg_sq"], ref_sd[k]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_largest_finite_gradients_do_not_skip(dtype):
    big = torch.finfo(dtype).max
    assert _step_with(big, 3, dtype)
    assert _step_with(-big, 998, dtype)


def test_without_the_check_a_nonfinite_gradient_is_applied():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = ShardedAdamW([p], lr=0.1, skip_nonfinite=False)
    p.grad = torch.ones(10)
    p.grad[4] = float("nan")
    opt.step()
    assert p.detach().isnan().tolist() == [i == 4 for i in range(10)]
