"""The all-gathers that bring updated parameters back, and (``overlap_param_gather``) where
they are waited for: in the next forward, bucket by bucket, as the modules that read them run.

``step()`` updates the owned shards run by run in the order forward first uses the buckets
(learnt from the first forward with ``overlap_param_gather``; otherwise, and for buckets
forward never reached, the reverse of the bucket order, which is the parameters' order), and
launches each run's in-place all-gathers as soon as it is updated, so they travel while the
next run updates. Without ``overlap_param_gather`` the step waits for them all before it
returns.

With it, the step returns with the all-gathers in flight, and nothing may read a parameter
before its bucket's all-gather is done. A global forward pre-hook (one per optimizer, every
module) waits, before a module runs, for the buckets of the module's own parameters and every
bucket launched before them; a module whose forward order differs from the bucket order thus
waits for exactly what it reads. Every module that holds one of the parameters also gets
``state_dict`` and ``load_state_dict`` pre-hooks that wait for all of them; they are
registered the first time a forward reaches any module containing it (the root module is the
first). The optimizer's own entry points that read or write parameters or state (``step``,
``state_dict``, ``load_state_dict``, checkpoint save and load) wait first as well;
``zero_grad`` touches gradients only and does not wait, so ``step(); zero_grad()`` keeps the
all-gathers behind the next forward. A compiled module
(``torch.compile``) waits for all of them before it runs: its inner modules' hooks do not run
one by one. A module compiled in place (``model.compile()``) runs its hooks inside the
graph; its root calls out to an eager wait for all of them (``_wait_before_compiled``).

Anything else that reads ``p.data`` by hand between ``step()`` and the next forward (an EMA of
the weights, ``parameters_to_vector``, a custom logger) must call ``opt.sync_params()`` first.
"""

from __future__ import annotations

import weakref

import torch
from torch.autograd.profiler import record_function

from .bucket import ShardBucket
from .collectives import Comm, Handle

_ALL = 1 << 62  # a module that waits for every bucket


def _is_compiled(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule"


@torch.compiler.disable
def _wait_before_compiled(ref: weakref.ref, module: torch.nn.Module) -> None:
    """Before a module compiled in place (``model.compile()``) runs: wait for every
    all-gather in flight. Such a module runs its forward hooks inside the compiled graph, where
    a plain hook is traced once and never waits; this function is excluded from compilation
    (one graph break, at the start of the root module), so it runs on every call."""
    me = ref()
    if me is not None:
        me.watch(module)
        me.wait_all()


class ParamGather:
    """The parameter all-gathers of one optimizer, in forward order, and their waits."""

    def __init__(self, buckets: list[ShardBucket], comm: Comm, overlap: bool):
        self.buckets = buckets
        self.comm = comm
        self.overlap = overlap
        self.order: list[ShardBucket] = []  # forward order, learnt from the first forward
        self._learning = True
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._position: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._seen: weakref.WeakSet = weakref.WeakSet()  # modules given state-dict hooks
        self._pending: dict[ShardBucket, Handle] = {}
        self._launched: list[ShardBucket] = []
        self._next = 0  # the first launched bucket not yet waited for
        self._index: dict[ShardBucket, int] = {}
        if overlap:  # one global hook; it removes itself once this object is gone
            ref = weakref.ref(self)

            def pre_forward(module, args):
                if torch.compiler.is_compiling():
                    # Traced into a graph. Only the root of a ``model.compile()`` module
                    # calls out, to a function Dynamo leaves eager: it runs every call.
                    if getattr(module, "_compiled_call_impl", None) is not None:
                        _wait_before_compiled(ref, module)
                    return
                me = ref()
                if me is None:
                    hook.remove()
                else:
                    me.before_forward(module)

            hook = torch.nn.modules.module.register_module_forward_pre_hook(pre_forward)

    def added(self) -> None:
        """Take in buckets added since (``add_param_group``); after the forward order is
        known, new buckets go last."""
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        if not self._learning:
            self.order += [b for b in reversed(self.buckets) if b not in self._index]
            self._index = {b: i for i, b in enumerate(self.order)}
        self._position = weakref.WeakKeyDictionary()  # recomputed with the new parameters

    def begin(self, object_device: torch.device) -> list[ShardBucket]:
        """Start a step's all-gathers: wait for the last step's, fix the forward order (at the
        first step) and return the buckets in it; ``launch`` them as they are updated.

        The order is agreed at the first step: every rank takes shard rank 0's. Each rank
        learnt it from its own first forward, and a module unused on one rank (a skipped
        branch, an expert without tokens) would otherwise launch that rank's all-gathers in
        another order than its peers' (mismatched collectives). A rank whose forward order
        differs still waits correctly: a module waits for everything up to its position."""
        self.wait_all()
        if self._learning:
            self._learning = False
            seen = set(self.order)
            self.order += [b for b in reversed(self.buckets) if b not in seen]
            if self.comm.distributed and self.overlap:
                mine = [self.buckets.index(b) for b in self.order]
                first = self.comm.all_gather_object(mine, object_device)[0]
                self.order = [self.buckets[i] for i in first]
            self._index = {b: i for i, b in enumerate(self.order)}
        self._launched = []
        self._next = 0
        return self.order

    def launch(self, buckets: list[ShardBucket]) -> None:
        """All-gather ``buckets`` (updated, in forward order) in place."""
        with record_function("sharded_adamw.all_gather"):
            for b in buckets:
                handle = self.comm.all_gather_params(b.flat, async_op=True)
                self._pending[b] = handle.and_then(b.copy_out) if b.outside else handle
                self._launched.append(b)

    def finish(self) -> None:
        """End the step's all-gathers: wait for them unless ``overlap_param_gather``."""
        if not self.overlap:
            self.wait_all()

    @property
    def in_flight(self) -> bool:
        """Whether some all-gather launched by the last step is still unwaited."""
        return bool(self._pending)

    def wait_all(self) -> None:
        """Wait for every all-gather in flight (``ShardedAdamW.sync_params``)."""
        if self._pending:
            with record_function("sharded_adamw.all_gather_wait"):
                self._wait_through(_ALL)

    def _wait_through(self, position: int) -> None:
        """Wait for the launched buckets up to forward position ``position``, in order."""
        launched = self._launched
        while self._next < len(launched) and self._index[launched[self._next]] <= position:
            handle = self._pending.pop(launched[self._next])
            self._next += 1
            handle.wait()

    def before_forward(self, module: torch.nn.Module) -> None:
        """The global forward pre-hook: wait for the buckets ``module`` reads."""
        position = self._position.get(module)
        if position is None:
            position = self._learn(module)
        if self._pending and position >= 0:
            with record_function("sharded_adamw.param_gather_wait"):
                self._wait_through(position)

    def watch(self, module: torch.nn.Module) -> None:
        """Give every submodule of ``module`` that holds one of the parameters ``state_dict``
        and ``load_state_dict`` pre-hooks that wait for the all-gathers in flight (once per
        module; only with ``overlap_param_gather``). Done for the first module each forward
        reaches, and by ``attach`` for the DDP model's module before any forward."""
        if not self.overlap:
            return
        ref = weakref.ref(self)

        def wait(*args) -> None:
            me = ref()
            if me is not None:
                me.wait_all()

        for m in module.modules():
            if m not in self._seen:
                self._seen.add(m)
                if any(p in self._bucket_of for p in m.parameters(recurse=False)):
                    m.register_state_dict_pre_hook(wait)
                    m._register_load_state_dict_pre_hook(wait)

    def _learn(self, module: torch.nn.Module) -> int:
        """Where in the forward order ``module``'s own parameters are (-1: it has none of
        ours); the first time a module is met, its bucket joins the order, and it is
        watched (``watch``)."""
        self.watch(module)
        if _is_compiled(module):
            self._position[module] = _ALL
            return _ALL
        mine = [
            self._bucket_of[p] for p in module.parameters(recurse=False) if p in self._bucket_of
        ]
        if not mine:
            self._position[module] = -1
            return -1
        if self._learning:
            self.order += [b for b in dict.fromkeys(mine) if b not in self.order]
        position = max(self.order.index(b) for b in mine)
        self._position[module] = position
        return position
