"""PyTorch Lightning support: ``Trainer(strategy=ShardedDDPStrategy())`` is the one change.

Lightning's own ``"ddp"`` strategy does three things that are wrong for ``ShardedAdamW``, and
``ShardedDDPStrategy`` (a ``DDPStrategy``) fixes each through Lightning's extension points:

- The model is wrapped in DDP, which all-reduces full gradients that a standalone
  ``ShardedAdamW`` would reduce again: after ``configure_optimizers`` each ``ShardedAdamW`` is
  attached to the DDP model (``ShardedAdamW.attach``), so DDP reduce-scatters instead.
- ``gradient_clip_val`` runs ``torch.nn.utils.clip_grad_norm_`` on ``p.grad`` from the
  precision plugin, and after a reduce-scatter ``p.grad`` is not the averaged gradient: the
  strategy's precision plugin clips a ``ShardedAdamW`` with ``ShardedAdamW.clip_grad_norm_``
  (``"norm"``) or clamps the shards (``"value"``), after unscaling under fp16.
- fp16 mixed precision uses ``torch.amp.GradScaler``, which reads ``p.grad``: it is replaced by
  a ``ShardedGradScaler`` with the same state.

Checkpoints need nothing of their own: Lightning's ``optimizer_state`` treats an optimizer
with ``consolidate_state_dict`` as sharded and calls ``state_dict()`` on global rank 0 only
(not a collective for ``ShardedAdamW``), rank 0 writes the full ``torch.optim.AdamW``-format
state, and on resume every rank reads the file and ``load_state_dict`` keeps its own slice.

This module imports Lightning; nothing else in the package imports this module.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from ..core.optimizer import ShardedAdamW
from .amp import ShardedGradScaler

__all__ = ["ShardedDDPStrategy"]


def _sharded(optimizer: Optimizer | LightningOptimizer) -> ShardedAdamW | None:
    """The ``ShardedAdamW`` behind ``optimizer``, or None."""
    if isinstance(optimizer, LightningOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, ShardedAdamW) else None


def _route_clipping(plugin: Precision) -> None:
    """Make ``plugin.clip_gradients`` clip a ``ShardedAdamW`` on its reduced gradient shards.

    Every clip in Lightning (``gradient_clip_val``, ``LightningModule.clip_gradients`` in
    manual optimization, ``configure_gradient_clipping``) ends in this method of the precision
    plugin. Other optimizers keep the plugin's own behaviour.
    """
    if getattr(plugin, "_sharded_adamw_clip", False):
        return
    clip_gradients = plugin.clip_gradients

    def sharded_clip_gradients(
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        opt = _sharded(optimizer)
        if opt is None or clip_val <= 0:
            return clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:  # MixedPrecision leaves unscaling to an optimizer like ours
            scaler.unscale_(opt)
        if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_value_(params, clip_val)  # routed to the shards, exact
        else:
            opt.clip_grad_norm_(clip_val)
        return None

    plugin.clip_gradients = sharded_clip_gradients
    plugin._sharded_adamw_clip = True


class ShardedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` for ``ShardedAdamW``: attaches it to the DDP model and clips, scales
    and checkpoints its sharded gradients and state correctly. Takes ``DDPStrategy``'s
    arguments; ``Trainer(strategy=ShardedDDPStrategy(), accelerator=..., devices=...)``."""

    def setup(self, trainer: pl.Trainer) -> None:
        """DDP setup, then attach each ``ShardedAdamW`` to the DDP model before the first
        backward, and route the precision plugin's clipping and loss scaling to the shards."""
        super().setup(trainer)
        sharded = [opt for opt in map(_sharded, self.optimizers) if opt is not None]
        if not sharded:
            return
        if self._ddp_comm_hook is not None:
            raise MisconfigurationException(
                "ShardedDDPStrategy: ddp_comm_hook cannot be combined with ShardedAdamW, whose "
                "attach() registers its own reduce-scatter hook"
            )
        for opt in sharded:
            if opt.attached_model is None:
                opt.attach(self.model)
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            if not isinstance(plugin.scaler, ShardedGradScaler):
                scaler = ShardedGradScaler(plugin.scaler._device)
                scaler.load_state_dict(plugin.scaler.state_dict())
                plugin.scaler = scaler
        _route_clipping(plugin)
