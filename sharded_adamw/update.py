"""The AdamW update on flat local tensors, computed by torch's own implementation.

AdamW is elementwise, so running ``torch.optim.adam.adam`` on a flat slice that cuts through
parameters gives the same bits as running it on the whole parameters, provided the gradient has
the same bits, the step count and hyperparameters are the same, and the same implementation
family (for-loop, foreach or fused) runs on both sides (see NOTES.md). Delegating keeps us
exact and lets us inherit torch's fixes.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam


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
    adam(
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
        decoupled_weight_decay=True,
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )
