"""``ShardedGradScaler``: ``torch.amp.GradScaler`` for gradients that live in shards.

``GradScaler`` unscales and checks ``p.grad``. After a reduce-scatter, ``p.grad`` is either
gone (standalone, ZeRO-2) or this rank's local, unreduced gradient (attached to DDP), so the
stock scaler would unscale the wrong tensors and decide on a rank-local overflow flag, letting
the loss scale drift apart between ranks. This subclass does the same work on the optimizer's
reduced gradient shards and combines the overflow flag over all ranks with one all-reduce, so
every rank skips the same steps and keeps the same scale. For other optimizers it behaves
exactly like ``torch.amp.GradScaler``.
"""

from __future__ import annotations

import torch

from ..core.optimizer import ShardedAdamW


class ShardedGradScaler(torch.amp.GradScaler):
    """Drop-in ``torch.amp.GradScaler`` that understands ``ShardedAdamW``."""

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        if not isinstance(optimizer, ShardedAdamW) or optimizer.full_grads:  # p.grad is it
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        found = optimizer.unscale_gradients(inv_scale)
        found_inf.copy_(found.reshape(found_inf.shape).to(found_inf.device))
        return {found_inf.device: found_inf}
