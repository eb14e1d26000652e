"""Hugging Face accelerate support: a script that swaps ``torch.optim.AdamW`` for
``ShardedAdamW`` needs no other change.

accelerate does three things that are wrong for sharded gradients, and the ``WRAPPERS`` of
``Accelerator``'s methods fix each where it happens:

- ``prepare()`` wraps the model in DDP, which would all-reduce full gradients that
  ``ShardedAdamW`` then reduces again: a prepared ``ShardedAdamW`` is attached to the prepared
  DDP model over the same parameters, so DDP reduce-scatters instead.
- ``clip_grad_norm_()`` runs ``torch.nn.utils.clip_grad_norm_`` on ``p.grad``, which after a
  reduce-scatter is not the averaged gradient: for the parameters of a ``ShardedAdamW`` it
  calls ``ShardedAdamW.clip_grad_norm_`` (after unscaling, as accelerate does).
- fp16 mixed precision uses ``torch.amp.GradScaler``, which reads ``p.grad``: it is replaced by
  a ``ShardedGradScaler`` with the same state.

``install.py`` sets them on ``Accelerator`` when the first ``ShardedAdamW`` is
built if accelerate is imported by then, else right after ``import accelerate``, so this
happens whatever the import order; nothing changes on ``import sharded_adamw``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch.nn.parallel import DistributedDataParallel

from ..core.optimizer import ShardedAdamW
from .amp import ShardedGradScaler


def _unwrap(obj):
    while hasattr(obj, "optimizer") and not isinstance(obj, ShardedAdamW):
        obj = obj.optimizer
    return obj


def _trainable(params) -> set[int]:
    return {id(p) for p in params if p.requires_grad}


def _wrap_prepare(prepare: Callable) -> Callable:
    @functools.wraps(prepare)
    def patched_prepare(self, *args, **kwargs):
        out = prepare(self, *args, **kwargs)
        objs = out if isinstance(out, tuple) else (out,)
        models = [o for o in objs if isinstance(o, DistributedDataParallel)]
        for acc_opt in (o for o in objs if isinstance(_unwrap(o), ShardedAdamW)):
            opt = _unwrap(acc_opt)
            if opt.attached_model is None:
                for model in models:
                    if _trainable(model.parameters()) == {id(p) for p in opt.owned_params()}:
                        opt.attach(model)
                        break
            if self.scaler is not None and not isinstance(self.scaler, ShardedGradScaler):
                scaler = ShardedGradScaler(self.scaler._device)
                scaler.load_state_dict(self.scaler.state_dict())
                self.scaler = scaler
            if hasattr(acc_opt, "scaler"):
                acc_opt.scaler = self.scaler
        return out

    return patched_prepare


def _wrap_clip_grad_norm_(clip: Callable) -> Callable:
    @functools.wraps(clip)
    def patched_clip(self, parameters, max_norm, norm_type=2):
        params = list(parameters)
        for acc_opt in self._optimizers:
            opt = _unwrap(acc_opt)
            if isinstance(opt, ShardedAdamW) and _trainable(params) == {
                id(p) for p in opt.owned_params()
            }:
                self.unscale_gradients()
                return opt.clip_grad_norm_(max_norm, norm_type)
        return clip(self, params, max_norm, norm_type)

    return patched_clip


WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "prepare": _wrap_prepare,
    "clip_grad_norm_": _wrap_clip_grad_norm_,
}
"""``accelerate.Accelerator``'s methods that change and, for each, what wraps accelerate's own
(``functools.wraps`` keeps its signature and metadata). ``install.py`` applies them."""
