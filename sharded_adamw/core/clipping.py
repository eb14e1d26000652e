"""Norms and clipping of the averaged gradient where it lives: in the optimizer's shards.

``torch.nn.utils.clip_grad_norm_``'s formulas, computed over the reduced shards: each rank
contributes what it owns, one all-reduce of a scalar combines it, every rank gets the same
result and scales only its own elements. ``ShardedAdamW.clip_grad_norm_`` and the routing of
torch's clipping functions (``integrations/clip.py``) both land here.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .optimizer import ShardedAdamW


@torch.no_grad()
def total_norm(opt: ShardedAdamW, norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
    """The norm of the averaged gradient over all of ``opt``'s shards (collective: one
    all-reduce of a scalar, in float64; every rank gets the same value). As in torch, it has
    the gradients' dtype (the shards' dtype, promoted across groups), so fp64 gradients are
    clipped to fp64 precision."""
    norm_type = float(norm_type)
    shards = opt.gradient_shards()
    device = opt.buckets[0].device if opt.buckets else torch.device("cpu")
    if not shards:
        return torch.zeros((), device=device)
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in shards))
    norms = torch.stack([torch.linalg.vector_norm(s, norm_type).double() for s in shards])
    if math.isinf(norm_type):
        local = norms.max().reshape(1)
        total = opt.comm.all_reduce_(local, "max", shard_only=True)[0].to(dtype)
    else:
        local = norms.pow(norm_type).sum().reshape(1)
        total = opt.comm.all_reduce_(local, "sum", shard_only=True)[0]
        total = total.pow(1.0 / norm_type).to(dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    total._sharded_adamw_norm = True  # clip_grads_with_norm_ accepts only norms made here
    return total


@torch.no_grad()
def scale_by_norm(opt: ShardedAdamW, max_norm: float, norm: torch.Tensor) -> None:
    """Scale ``opt``'s gradient shards as ``clip_grads_with_norm_`` scales ``p.grad``."""
    shards = opt.gradient_shards()
    if shards:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(shards, coef.to(shards[0].device))


@torch.no_grad()
def clamp_values(opt: ShardedAdamW, clip_value: float) -> None:
    """Clamp ``opt``'s gradient shards to ``[-clip_value, clip_value]``, elementwise."""
    shards = opt.gradient_shards()
    if shards:
        torch._foreach_clamp_min_(shards, -float(clip_value))
        torch._foreach_clamp_max_(shards, float(clip_value))
