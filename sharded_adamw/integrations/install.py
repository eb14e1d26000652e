"""What ``sharded_adamw`` changes outside itself, when, and how to keep it from doing so.

Importing ``sharded_adamw`` (or any of its modules) changes nothing in torch, in other
libraries or in ``sys.meta_path``. The FIRST ``ShardedAdamW(...)`` construction calls
``install()`` (``sharded_adamw/__init__.py`` subscribes ``on_optimizer_built`` to the core's
``registry.on_optimizer_built``; the core itself knows nothing of this), which installs three
things, all so that a script written for ``torch.optim.AdamW`` trains correctly with no other
change:

- torch's clipping functions ``clip_grad_norm_``, ``clip_grads_with_norm_``,
  ``clip_grad_value_`` and ``get_total_norm``, in ``torch.nn.utils`` and
  ``torch.nn.utils.clip_grad``, are wrapped (``clip.py``): after the reduce-scatter the
  averaged gradient lives only in the optimizer's shards, and torch's functions, given the
  parameters of a ``ShardedAdamW``, would clip ``p.grad`` (``None``, or the local unreduced
  gradient) in silence. Calls on other parameters run torch's code unchanged.
- ``DistributedDataParallel.__init__`` is wrapped (``autoattach.py``): a DDP model over the
  parameters of a ``ShardedAdamW`` would all-reduce what the optimizer reduce-scatters again,
  so the two are paired (``opt.attach(model)``) whichever is built first. DDP models built
  before the install, even before ``import sharded_adamw``, are found by one pass over the
  garbage collector's objects (``autoattach.record_existing``): Python keeps no list of a
  class's instances, so this pass, linear in the size of the heap, is the one way to see
  them; it runs once per install and only when a default process group exists (no DDP model
  can exist without one). Torch's warnings from DDP's constructor still name the user's line.
- timm's ``adaptive_clip_grad`` (``timm.py``), where timm binds it, at once if timm is
  imported, else right after ``timm.utils.clip_grad`` is: adaptive gradient clipping reads
  and rescales ``p.grad`` per row, and on a ``ShardedAdamW``'s parameters runs on the shards.
- ``accelerate.Accelerator.prepare`` and ``clip_grad_norm_`` are wrapped (``accelerate.py``):
  at once if accelerate is imported, else right after ``import accelerate`` (a finder at the
  head of ``sys.meta_path`` that removes itself when it fires).

Each wrapper keeps the signature and metadata of the function it wraps (``functools.wraps``).
``install()`` is idempotent; ``uninstall()`` puts back torch's (and accelerate's) originals
where the attribute still holds our wrapper (a wrapper someone set on top of ours is left in
place, with ours inside it) and removes the finder.

Opting out: set ``SHARDED_ADAMW_PATCH_TORCH=0`` (or ``false``/``no``/``off``) in the environment
before the first ``ShardedAdamW`` is built, or call
``sharded_adamw.integrations.install.disable()`` before it (after it, ``disable()`` and
``uninstall()`` are the same: torch's originals come back). Nothing is installed then, or
again, until ``install()`` is called. Without the integrations, call ``opt.attach(ddp_model)``
after wrapping the model in DDP, and ``opt.clip_grad_norm_(max_norm)`` instead of torch's
clipping functions, which clip ``p.grad`` (the others, routed without being installed:
``sharded_adamw.integrations.clip.routed("clip_grad_value_")``). accelerate is then left
as it is: its ``prepare`` wraps the model in DDP without attaching, and its clipping clips
``p.grad``.

Known limit: a reference taken with ``from torch.nn.utils import clip_grad_norm_`` (or any of
the four) BEFORE the first ``ShardedAdamW`` is built holds torch's own, unrouted function,
which clips nothing on a ``ShardedAdamW``'s parameters (unless it was built with
``full_grads=True``); the install warns, naming each module outside torch that holds such a
reference. Call the function through its module (``torch.nn.utils.clip_grad_norm_(...)``),
import it after building the optimizer, or call ``opt.clip_grad_norm_(max_norm)``. The same
goes for a reference to ``Accelerator.prepare`` taken before the install; DDP's constructor is
wrapped on the class, so ``DDP(...)`` is always seen.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.nn.utils
import torch.nn.utils.clip_grad as clip_grad_module
from torch.nn.parallel import DistributedDataParallel

from . import accelerate as accelerate_support
from . import autoattach, clip
from . import timm as timm_support

if TYPE_CHECKING:
    from ..core.optimizer import ShardedAdamW

ENV = "SHARDED_ADAMW_PATCH_TORCH"
"""The environment variable that turns the install off: ``0``, ``false``, ``no`` or ``off``."""
_OFF = {"0", "false", "no", "off"}

_lock = threading.RLock()
# (owner, attribute, original, our replacement), in the order set
_patches: list[tuple[object, str, Callable, Callable]] = []
_installed = False
_disabled = False
_finders: list[_AfterImport] = []


def installed() -> bool:
    """Whether the integrations are installed now."""
    return _installed


def _turned_off_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in _OFF


def on_optimizer_built(opt: ShardedAdamW) -> None:
    """At the end of every ``ShardedAdamW`` construction: install on the first one (unless
    turned off), then pair ``opt`` with a DDP model already built over its parameters."""
    if not _installed and not _disabled and not _turned_off_by_env():
        _install(stacklevel=6)  # warnings name the line that built the optimizer
    if _installed:
        autoattach.pair_recorded(opt)


def _patch(owner: object, name: str, wrap: Callable[[Callable], Callable], made: dict) -> None:
    """Set ``owner.name`` to ``wrap(owner.name)``, remembering the original for
    ``uninstall()``. ``made`` maps an original to its wrapper, so that one function reachable
    under two names (``torch.nn.utils.clip_grad_norm_`` is ``clip_grad.clip_grad_norm_``)
    gets one wrapper and stays one object."""
    original = vars(owner).get(name)
    if original is None or any(original is p[3] for p in _patches):
        return
    if id(original) not in made:
        made[id(original)] = wrap(original)
    setattr(owner, name, made[id(original)])
    _patches.append((owner, name, original, made[id(original)]))


def install() -> None:
    """Install the integrations now (idempotent): torch's clipping functions routed, DDP's
    constructor wrapped and the DDP models alive now recorded, accelerate patched now or on its
    import. Also undoes a ``disable()``."""
    _install(stacklevel=4)


def _install(stacklevel: int) -> None:
    """``install()``, with the ``stacklevel`` of its warning (counted from the function that
    issues it) that names the caller's line."""
    global _installed, _disabled
    with _lock:
        _disabled = False
        if _installed:
            return
        made: dict = {}
        for module in (torch.nn.utils, clip_grad_module):
            for name, route in clip.ROUTES.items():
                _patch(module, name, route, made)
        _warn_stale_references({id(p[2]): p[1] for p in _patches}, stacklevel)
        _patch(DistributedDataParallel, "__init__", autoattach.recording_init, made)
        _installed = True
        autoattach.record_existing()
        for module, patch in (("accelerate", _patch_accelerate), (TIMM_CLIP, _patch_timm)):
            if module in sys.modules:
                patch()
            elif _findable(module.partition(".")[0]):
                _finders.append(_AfterImport(module, patch))
                sys.meta_path.insert(0, _finders[-1])


def uninstall() -> None:
    """Put back torch's and accelerate's originals, remove the import finder, and install
    nothing at later ``ShardedAdamW`` constructions (until ``install()``). Idempotent."""
    global _installed, _disabled
    with _lock:
        _disabled = True
        for owner, name, original, ours in reversed(_patches):
            if vars(owner).get(name) is ours:
                setattr(owner, name, original)
        _patches.clear()
        for finder in _finders:
            finder.remove()
        _finders.clear()
        _installed = False


def disable() -> None:
    """Leave torch untouched: called before the first ``ShardedAdamW``, nothing is ever
    installed; after, the same as ``uninstall()``. Then call ``opt.attach(ddp_model)`` and
    ``opt.clip_grad_norm_(max_norm)`` yourself."""
    uninstall()


def _warn_stale_references(originals: dict[int, str], stacklevel: int) -> None:
    """Warn about each module outside torch that holds one of torch's clipping functions
    (``originals``: id -> name) under a global name, taken before the install with ``from
    torch.nn.utils import ...``: calls through it are not routed, and on a ``ShardedAdamW``'s
    parameters would clip nothing in silence."""
    stale = []
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "torch" or not issubclass(type(module), types.ModuleType):
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        stale += [f"{module_name}.{k}" for k, v in items if id(v) in originals]
    if stale:
        warnings.warn(
            f"ShardedAdamW: {', '.join(sorted(stale))} hold(s) torch's own clipping function, "
            "taken before the first ShardedAdamW was built, so calls through it are not routed "
            "to the optimizer's sharded gradient and clip nothing on its parameters: call "
            "torch.nn.utils.clip_grad_norm_(...) through the module, import it after building "
            "the optimizer, or call opt.clip_grad_norm_(max_norm)",
            stacklevel=stacklevel,
        )


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


TIMM_CLIP = "timm.utils.clip_grad"
"""The last of timm's modules that binds ``adaptive_clip_grad``: patched once it has run."""


def _patch_timm() -> None:
    """Route timm's ``adaptive_clip_grad`` wherever timm binds it, if still installed."""
    with _lock:
        if not _installed:
            return
        made: dict = {}
        for name in timm_support.MODULES:
            module = sys.modules.get(name)
            if module is not None:
                _patch(module, "adaptive_clip_grad", timm_support.route_adaptive_clip_grad, made)


def _patch_accelerate() -> None:
    """Wrap ``accelerate.Accelerator``'s methods, if still installed."""
    with _lock:
        if not _installed:
            return
        try:
            from accelerate import Accelerator
        except ImportError:
            return
        made: dict = {}
        for name, wrap in accelerate_support.WRAPPERS.items():
            _patch(Accelerator, name, wrap, made)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then()`` right after ``import <name>`` has run the module. It finds nothing
    itself: at the first lookup of ``name`` it removes itself from ``sys.meta_path``, asks the
    other finders, and wraps the loader's ``exec_module`` for this one import."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name = name
        self.then = then

    def remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        self.remove()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then(module) -> None:
            try:
                exec_module(module)
            finally:
                vars(loader).pop("exec_module", None)
            self.then()

        loader.exec_module = exec_then
        return spec
