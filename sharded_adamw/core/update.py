"""The AdamW update on flat local tensors, computed by torch's own implementation.

AdamW is elementwise, so running ``torch.optim.adam.adam`` on a flat slice that cuts through
parameters gives the same bits as running it on the whole parameters, provided the gradient has
the same bits, the step count and hyperparameters are the same, and the same implementation
family (for-loop, foreach or fused) runs on both sides (docs/numerics.md). Delegating keeps us
exact and lets us inherit torch's fixes.

Older torch (2.6 among them) keeps AdamW in its own function, ``torch.optim.adamw.adamw``;
later releases compute it in ``adam`` with ``decoupled_weight_decay=True``. The one that
``torch.optim.AdamW`` of the installed torch calls is used.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.optim.adam import adam

if "decoupled_weight_decay" in inspect.signature(adam).parameters:
    _adamw = functools.partial(adam, decoupled_weight_decay=True)
else:  # older torch
    from torch.optim.adamw import adamw as _adamw


def adamw_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    group: dict,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step on lists of matching flat tensors with ``group``'s hyperparameters.

    ``steps`` holds one step-count tensor per entry and is incremented in place, as in torch.
    """
    beta1, beta2 = group["betas"]
    _adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        foreach=group["foreach"],
        fused=group["fused"],
        grad_scale=grad_scale,
        found_inf=found_inf,
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )
