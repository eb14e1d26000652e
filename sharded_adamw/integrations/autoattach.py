"""Automatic ``attach()``: a DDP model and a ``ShardedAdamW`` over its parameters find each other.

A standalone ``ShardedAdamW`` over the parameters of a DDP model would reduce-scatter what DDP
has already all-reduced: twice the communication, no ZeRO-2 saving, and the average taken
twice. So every DDP model is recorded and paired with the optimizers in either order: when an
optimizer optimizes exactly the model's trainable parameters it is attached at once (DDP built
before the optimizer: at the optimizer's construction; after it, as nanoGPT-style scripts do:
at the end of DDP's constructor, before any backward); when they only overlap, or the model
already has a comm hook, a warning names the fix.

DDP models are recorded from two sources, both set up by ``install.py`` at the first
``ShardedAdamW`` construction, never on import: ``record_existing()`` finds the ones built
before then, ``recording_init()`` wraps DDP's constructor to catch the ones built after.
"""

import functools
import gc
import itertools
import logging
import sys
import warnings
import weakref
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..core import registry

if TYPE_CHECKING:
    from ..core.optimizer import ShardedAdamW

logger = logging.getLogger("sharded_adamw")
_models: weakref.WeakSet = weakref.WeakSet()
_warned: weakref.WeakSet = weakref.WeakSet()  # optimizers already warned about a DDP model


def _trainable(model: DistributedDataParallel) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad and p.numel() > 0}


def _pair(opt: "ShardedAdamW", model: DistributedDataParallel, stacklevel: int) -> None:
    """Attach ``opt`` to ``model`` if it optimizes exactly the model's trainable parameters;
    warn if they only overlap (or the attach is refused), at ``stacklevel`` from here."""
    if opt.attached_model is not None or opt in _warned:
        return
    opt.build_deferred()
    trainable = _trainable(model)
    mine = {id(p) for p in opt.owned_params()}
    if not trainable & mine:
        return
    if trainable == mine:
        try:
            opt.attach(model)
            if opt.comm.global_rank == 0:  # once, like the construction line
                logger.info(
                    "ShardedAdamW: attached to the DistributedDataParallel model over its "
                    "parameters (%d tensors)",
                    len(mine),
                )
            return
        except (RuntimeError, ValueError) as e:
            reason = f"attaching it automatically failed: {e}"
    else:
        reason = (
            f"the optimizer has {len(mine)} parameter tensors, the model "
            f"{len(trainable)} trainable ones, {len(trainable & mine)} shared"
        )
    _warned.add(opt)
    warnings.warn(
        "ShardedAdamW: parameters of this optimizer are also reduced by a "
        "DistributedDataParallel model it is not attached to, so every gradient is reduced "
        "twice (DDP's all-reduce, then the optimizer's reduce-scatter) and ZeRO-2 saves "
        f"nothing; {reason}. Fix: opt.attach(ddp_model) with one ShardedAdamW over all of the "
        "model's trainable parameters, or do not wrap the model in DDP",
        stacklevel=stacklevel,
    )


def pair_recorded(opt: "ShardedAdamW") -> None:
    """A DDP model built before the optimizer: find it among the recorded ones. Called at the
    end of the optimizer's construction through ``install.on_optimizer_built``; warnings name
    the line that built the optimizer (this function, the callback, ``optimizer_built`` and
    ``ShardedAdamW.__init__`` are the four frames above it)."""
    models = [m for m in list(_models) if opt.attached_model is None]
    mine = {id(p) for p in opt.owned_params()}
    exact = [m for m in models if _trainable(m) == mine]
    if len(exact) > 1:  # two live wrappers of one model: which one trains is not ours to guess
        warnings.warn(
            f"ShardedAdamW: {len(exact)} DistributedDataParallel models wrap this optimizer's "
            "parameters; call opt.attach(ddp_model) on the one you train",
            stacklevel=5,
        )
        _warned.add(opt)
        return
    for model in models:
        _pair(opt, model, stacklevel=6)


def record_existing() -> int:
    """Record the DDP models that already exist (built before DDP's constructor was wrapped,
    even before ``sharded_adamw`` was imported); returns how many were found.

    Python keeps no list of a class's instances, DDP registers itself nowhere that can be read
    back, and a parameter does not know the modules that hold it, so the only complete answer
    is a walk over the garbage collector's objects: ``gc.get_objects()``, the ``type()`` of
    each, and the DDP subclasses among the distinct types (by their ``__mro__``: ``isinstance``
    could run an object's own ``__class__`` property, ``issubclass`` DDP's ABC machinery on
    every type). The passes over the heap run in C (``map``, ``set``, ``compress``); it is
    linear in the heap, runs once per install, and is skipped when no default process group
    exists, as DDP cannot have been built then.
    """
    if not dist.is_available() or not dist.is_initialized():
        return 0
    objects = gc.get_objects()
    types = list(map(type, objects))
    kinds = {t for t in set(types) if DistributedDataParallel in t.__mro__}
    found = list(itertools.compress(objects, map(kinds.__contains__, types))) if kinds else []
    del objects, types
    for model in found:
        _models.add(model)
    return len(found)


def recording_init(init):
    """DDP's constructor, then the model recorded and paired with the live optimizers.

    ``functools.wraps`` keeps the signature and metadata. Torch's own warnings inside the
    constructor name the line that called it (``stacklevel=2``), which would now be this
    wrapper: they are recorded and issued again at the caller's line, through the filters in
    force there, as if the wrapper were not on the stack. Recording uses
    ``warnings.catch_warnings``, with its two known costs: it is process-wide (a warning
    another thread issues meanwhile is recorded and issued again too, at its own location),
    and entering it resets the "once per location" memory of the ``default`` action, so a
    warning already shown may show once more after each DDP construction.
    """

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # the real filters apply when issued again
                init(self, *args, **kwargs)
        finally:  # also when the constructor raises, as the warnings came first
            if caught:
                _reissue(caught, __init__.__code__.co_filename, sys._getframe(1))
        _models.add(self)
        for opt in registry.live_optimizers():
            _pair(opt, self, stacklevel=3)  # the line that built the DDP model

    return __init__


def _module_globals(filename: str) -> dict | None:
    """The globals of the loaded module whose source is ``filename``, if any."""
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == filename:
            return vars(module)
    return None


def _reissue(caught: list, wrapper_file: str, caller) -> None:
    """Issue the recorded warnings again, each where ``warnings.warn`` would have put it
    without the wrapper: those located in the wrapper's file at ``caller``'s line, the others
    where they were. The module name, ``__warningregistry__`` and source lines come from the
    location's globals, as ``warnings.warn`` takes them."""
    for w in caught:
        if w.filename == wrapper_file:
            filename, lineno, globs = caller.f_code.co_filename, caller.f_lineno, caller.f_globals
        else:
            filename, lineno, globs = w.filename, w.lineno, _module_globals(w.filename)
        warnings.warn_explicit(
            w.message,
            w.category,
            filename,
            lineno,
            module=globs.get("__name__", "<string>") if globs is not None else None,
            registry=globs.setdefault("__warningregistry__", {}) if globs is not None else None,
            module_globals=globs,
            source=w.source,
        )
