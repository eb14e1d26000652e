"""PyTorch Lightning support: ``Trainer(strategy=ShardedDDPStrategy())`` is the one change.

Lightning ships as two packages with the same code under two names: the unified ``lightning``
(``lightning.pytorch``) and ``pytorch_lightning``. A Trainer accepts only a strategy derived
from its own package's ``Strategy``, so there is one strategy class per package, each built
from that package's ``DDPStrategy`` by the same code (``_strategy_class``):

- ``ShardedDDPStrategy`` for ``lightning.pytorch.Trainer`` (``import lightning.pytorch as pl``);
- ``PLShardedDDPStrategy`` for ``pytorch_lightning.Trainer`` (``import pytorch_lightning as pl``).

Each is built, importing its package, on first access (``from sharded_adamw.integrations.
lightning import PLShardedDDPStrategy``): this module imports neither package, so either
one alone is enough, and nothing else in ``sharded_adamw`` imports this module.

Lightning's own ``"ddp"`` strategy does three things that are wrong for ``ShardedAdamW``, and
the strategy (a ``DDPStrategy``) fixes each through Lightning's extension points:

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
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch.optim import Optimizer

from ..core.optimizer import ShardedAdamW
from .amp import ShardedGradScaler

if TYPE_CHECKING:
    import lightning.pytorch
    import pytorch_lightning

# public name -> (the package whose Trainer takes it, the pip distribution that installs it)
STRATEGIES = {
    "ShardedDDPStrategy": ("lightning.pytorch", "lightning"),
    "PLShardedDDPStrategy": ("pytorch_lightning", "pytorch-lightning"),
}
# the names of the installed packages (found without importing them), for ``import *``
__all__ = [
    name
    for name, (package, _) in STRATEGIES.items()
    if importlib.util.find_spec(package.partition(".")[0]) is not None
]


class _Lightning(NamedTuple):
    """The classes of one Lightning package that the strategy uses."""

    DDPStrategy: type
    LightningOptimizer: type
    MixedPrecision: type
    GradClipAlgorithmType: type
    MisconfigurationException: type
    Callback: type
    call: object  # the package's trainer.call module (its hook dispatch)
    is_overridden: object

    @classmethod
    def load(cls, package: str) -> _Lightning:
        def get(module: str, name: str) -> type:
            return getattr(importlib.import_module(f"{package}.{module}"), name)

        return cls(
            get("strategies", "DDPStrategy"),
            get("core.optimizer", "LightningOptimizer"),
            get("plugins.precision", "MixedPrecision"),
            get("utilities", "GradClipAlgorithmType"),
            get("utilities.exceptions", "MisconfigurationException"),
            get("callbacks", "Callback"),
            importlib.import_module(f"{package}.trainer.call"),
            get("utilities.model_helpers", "is_overridden"),
        )


def _sharded(optimizer: Optimizer, pl: _Lightning) -> ShardedAdamW | None:
    """The ``ShardedAdamW`` behind ``optimizer`` (or its ``LightningOptimizer``), or None."""
    if isinstance(optimizer, pl.LightningOptimizer):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, ShardedAdamW) else None


def _route_clipping(plugin, pl: _Lightning) -> None:
    """Make ``plugin.clip_gradients`` clip a ``ShardedAdamW`` on its reduced gradient shards.

    Every clip in Lightning (``gradient_clip_val``, ``LightningModule.clip_gradients`` in
    manual optimization, ``configure_gradient_clipping``) ends in this method of the precision
    plugin. Other optimizers keep the plugin's own behaviour.
    """
    if getattr(plugin, "_sharded_adamw_clip", False):
        return
    clip_gradients = plugin.clip_gradients
    algorithms = pl.GradClipAlgorithmType

    def sharded_clip_gradients(
        optimizer: Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm=algorithms.NORM,
    ) -> None:
        opt = _sharded(optimizer, pl)
        if opt is None or clip_val <= 0:
            return clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:  # MixedPrecision leaves unscaling to an optimizer like ours
            scaler.unscale_(opt)
        if gradient_clip_algorithm == algorithms.VALUE:
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_value_(params, clip_val)  # routed to the shards, exact
        else:
            opt.clip_grad_norm_(clip_val)
        return None

    plugin.clip_gradients = sharded_clip_gradients
    plugin._sharded_adamw_clip = True


def _gather_for_hooks(plugin, pl: _Lightning) -> None:
    """Make ``on_before_optimizer_step`` hooks see the averaged gradient in ``p.grad``.

    Lightning's documented place to read gradients (``grad_norm(self, 2)`` for per-layer
    norms, custom callbacks) is that hook, which the precision plugin calls after backward
    and before clipping (``Precision._after_closure``). Where the LightningModule or a
    callback overrides it, the hooks run inside ``ShardedAdamW.gathered_grads()`` (one
    all-reduce per bucket, the full gradients while the hooks run; changes they make to
    ``p.grad`` reach the step), then the plugin clips the shards as usual. Where nothing
    overrides it, nothing is gathered."""
    if getattr(plugin, "_sharded_adamw_hooks", False):
        return
    after_closure = plugin._after_closure

    def sharded_after_closure(model, optimizer) -> None:
        opt = _sharded(optimizer, pl)
        trainer = model.trainer
        readers = pl.is_overridden("on_before_optimizer_step", model) or any(
            pl.is_overridden("on_before_optimizer_step", c, parent=pl.Callback)
            for c in trainer.callbacks
        )
        if opt is None or not readers:
            return after_closure(model, optimizer)
        with opt.gathered_grads():
            pl.call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
            pl.call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        plugin._clip_gradients(
            model,
            optimizer,
            trainer.gradient_clip_val,
            gradient_clip_algorithm=trainer.gradient_clip_algorithm,
        )
        return None

    plugin._after_closure = sharded_after_closure
    plugin._sharded_adamw_hooks = True


@functools.cache
def _strategy_class(name: str) -> type:
    """The strategy class ``name`` of ``STRATEGIES``, built on its package's ``DDPStrategy``;
    one class per name, so ``isinstance`` and pickling see the same class every time."""
    package, distribution = STRATEGIES[name]
    try:
        pl = _Lightning.load(package)
    except ModuleNotFoundError as e:
        if e.name not in (package, package.partition(".")[0]):
            raise  # the package is there, something it imports is not
        raise ModuleNotFoundError(
            f"{name} is the ShardedAdamW strategy for {package}.Trainer, and {package} is "
            f"not installed: pip install {distribution}",
            name=e.name,
        ) from e

    class Strategy(pl.DDPStrategy):
        __doc__ = f"""``{package}`` ``DDPStrategy`` for ``ShardedAdamW``: attaches it to the DDP
        model and clips, scales and checkpoints its sharded gradients and state correctly.
        Takes ``DDPStrategy``'s arguments; ``{package}.Trainer(strategy={name}(),
        accelerator=..., devices=...)``."""

        def setup(self, trainer: lightning.pytorch.Trainer | pytorch_lightning.Trainer) -> None:
            """DDP setup, then attach each ``ShardedAdamW`` to the DDP model before the first
            backward, and route the precision plugin's clipping and loss scaling to the
            shards."""
            super().setup(trainer)
            sharded = [o for o in (_sharded(o, pl) for o in self.optimizers) if o is not None]
            if not sharded:
                return
            if self._ddp_comm_hook is not None:
                raise pl.MisconfigurationException(
                    f"{name}: ddp_comm_hook cannot be combined with ShardedAdamW, whose "
                    "attach() registers its own reduce-scatter hook"
                )
            for opt in sharded:
                if opt.attached_model is None:
                    opt.attach(self.model)
            plugin = self.precision_plugin
            if isinstance(plugin, pl.MixedPrecision) and plugin.scaler is not None:
                if not isinstance(plugin.scaler, ShardedGradScaler):
                    scaler = ShardedGradScaler(plugin.scaler._device)
                    scaler.load_state_dict(plugin.scaler.state_dict())
                    plugin.scaler = scaler
            _route_clipping(plugin, pl)
            _gather_for_hooks(plugin, pl)

    Strategy.__name__ = Strategy.__qualname__ = name
    Strategy.__module__ = __name__
    return Strategy


def __getattr__(name: str) -> type:
    """``ShardedDDPStrategy`` and ``PLShardedDDPStrategy``, each built on first access."""
    if name in STRATEGIES:
        return _strategy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *STRATEGIES})
