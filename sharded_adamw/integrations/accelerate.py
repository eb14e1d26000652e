"""Hugging Face accelerate support: a script that swaps ``torch.optim.AdamW`` for
``ShardedAdamW`` needs no other change.

accelerate does three things that are wrong for sharded gradients, and ``install()`` fixes
each where it happens:

- ``prepare()`` wraps the model in DDP, which would all-reduce full gradients that
  ``ShardedAdamW`` then reduces again: a prepared ``ShardedAdamW`` is attached to the prepared
  DDP model over the same parameters, so DDP reduce-scatters instead.
- ``clip_grad_norm_()`` runs ``torch.nn.utils.clip_grad_norm_`` on ``p.grad``, which after a
  reduce-scatter is not the averaged gradient: for the parameters of a ``ShardedAdamW`` it
  calls ``ShardedAdamW.clip_grad_norm_`` (after unscaling, as accelerate does).
- fp16 mixed precision uses ``torch.amp.GradScaler``, which reads ``p.grad``: it is replaced by
  a ``ShardedGradScaler`` with the same state.

``sharded_adamw`` calls ``install_when_imported()`` on import, so this happens whether
accelerate is imported before or after it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from torch.nn.parallel import DistributedDataParallel

from ..core.optimizer import ShardedAdamW
from .amp import ShardedGradScaler


def _unwrap(obj):
    while hasattr(obj, "optimizer") and not isinstance(obj, ShardedAdamW):
        obj = obj.optimizer
    return obj


def _trainable(params) -> set[int]:
    return {id(p) for p in params if p.requires_grad}


def install() -> None:
    """Patch ``accelerate.Accelerator`` (idempotent)."""
    from accelerate import Accelerator

    if getattr(Accelerator, "_sharded_adamw", False):
        return
    prepare, clip = Accelerator.prepare, Accelerator.clip_grad_norm_

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

    Accelerator.prepare = patched_prepare
    Accelerator.clip_grad_norm_ = patched_clip
    Accelerator._sharded_adamw = True


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``install()`` right after ``import accelerate`` finishes."""

    def find_spec(self, name, path, target=None):
        if name != "accelerate":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module) -> None:
            exec_module(module)
            install()

        spec.loader.exec_module = exec_then_install
        return spec


def install_when_imported() -> None:
    """``install()`` now if accelerate is imported, else as soon as it is (if installed)."""
    if "accelerate" in sys.modules:
        install()
    elif importlib.util.find_spec("accelerate") is not None:
        if not any(isinstance(f, _InstallAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _InstallAfterImport())
