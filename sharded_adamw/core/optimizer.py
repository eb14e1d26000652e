"""``ShardedAdamW``: AdamW whose state (and gradients) are split across data-parallel ranks.

The parameters live in the buckets' flat buffers (``bucket.py``, ``layout.py``): each rank
owns one contiguous shard of every bucket. The data path of one training step, in order:

1. gradient -> reduce-scatter: each bucket's gradients are averaged across ranks and each rank
   receives only its shard (``ShardBucket.reduce_scatter``). Standalone, this is launched from
   gradient hooks during backward as buckets fill; attached to DDP, DDP's comm hook does it.
2. shard update: torch's own AdamW runs in place on the owned shards, one call per run of a
   param group's buckets (``_update_and_gather``).
3. all-gather -> parameter: each run of buckets is all-gathered in place as soon as it is
   updated, so the parameters, views of the buckets, are whole again (``ParamGather``); with
   ``overlap_param_gather`` the next forward waits for each bucket as it reaches the modules
   that use it.

``step()`` reads in exactly that order.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.utils.clip_grad as clip_grad_module
from torch.optim import Optimizer
from torch.optim.optimizer import _to_scalar

from . import param_grads
from .agreement import StepAgreement, check_finite
from .bucket import LOW_PRECISION, ShardBucket, as_real, real_dtype
from .clipping import scale_by_norm, total_norm
from .collectives import Comm, CommStats
from .layout import align_elements, plan_buckets
from .param_gather import ParamGather
from .reducer import FullGradReducer, HookReducer, Reducer
from .registry import live_optimizers, optimizer_built
from .state_formats import BLOCK, MIN_QUANTIZED_NUMEL, STATE_DTYPES
from .state_server import StateServer, state_entries
from .update import Run, Steps, plan_runs, update_run

logger = logging.getLogger("sharded_adamw")

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# torch.optim.AdamW's param groups carry ``decoupled_weight_decay`` from torch 2.7 on (AdamW
# became Adam with that flag); before, they do not, and a state dict must match either way.
TORCH_ADAMW_HAS_DECOUPLED_KEY = (
    "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters
)
# Param-group keys that say how this job runs the update rather than where training is: a
# load keeps the loading optimizer's values, which match where construction put the step
# tensors (on the parameters' device for fused, on the CPU otherwise).
# Keys an old ``torch.optim.AdamW`` state dict may lack, and the value torch then gives them
# (``Adam.__setstate__``).
OLD_GROUP_DEFAULTS = {"amsgrad": False, "maximize": False}
RUNTIME_KEYS = ("params", "foreach", "fused", "capturable", "differentiable")


class ShardedAdamW(Optimizer):
    """AdamW with its state sharded across the data-parallel ranks (ZeRO-1/2).

    Arguments up to ``fused`` mean what they mean for ``torch.optim.AdamW`` and have its
    defaults. The rest:

    - ``process_group``: the ranks to shard over; default the whole world. A 2-D
      ``DeviceMesh`` with dims ``("replicate", "shard")`` shards within ``shard`` and
      replicates across ``replicate``.
    - ``bucket_cap_mb``: size of a communication bucket (DDP's name and unit).
    - ``overlap_comm``: launch reduce-scatters during backward and all-gathers as buckets are
      updated (DeepSpeed's name). Off, everything is communicated inside ``step()``; results
      are bitwise the same.
    - ``master_weights``: for bf16/fp16 parameters, keep sharded fp32 master weights and fp32
      state; off, the state has the parameter dtype, like ``torch.optim.AdamW``.
    - ``reduce_dtype``: dtype the gradients are averaged in (FSDP2's name); default the dtype
      of the update (fp32 with master weights).
    - ``skip_nonfinite``: skip the whole step on every rank when any rank's gradient holds a
      NaN or inf (counted in ``skipped_steps``).
    - ``gather_buffers``: reduce-scatter inputs staged at once, each in a reusable buffer of
      the largest bucket's size (memory: that many buckets of gradients in the reduce dtype).
      The all-gathers need no buffer: they land in the parameters.
    - ``state_dict_timeout``: seconds ``state_dict()`` waits for another rank's shards
      before it raises naming that rank (see ``state_server``).
    - ``overlap_param_gather``: return from ``step()`` with the parameter all-gathers in
      flight and wait for each bucket in the next forward, before the first module that
      reads it (Megatron-LM's name). Results are bitwise the same. Reading ``p.data`` by hand
      between ``step()`` and the next forward needs ``sync_params()`` first; see
      ``param_gather``.
    - ``full_grads``: keep ``p.grad`` as the averaged gradient after backward, as under DDP +
      ``torch.optim.AdamW``, for code that reads or changes it before ``step()`` (ZeRO-1:
      gradients are all-reduced, DDP's communication and gradient memory; the state stays
      sharded). Bitwise equal to DDP + AdamW. A parameter that got no gradient on this rank
      gets the average too (zeros where no rank had one), as DDP gives it.

    The parameters become views of the optimizer's flat buckets at construction (their values
    are kept): ``p.data`` is replaced, ``p`` itself is not.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        process_group=None,
        bucket_cap_mb: float = 25.0,
        overlap_comm: bool = True,
        master_weights: bool = True,
        reduce_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = True,
        gather_buffers: int = 2,
        state_dict_timeout: float = 300.0,
        overlap_param_gather: bool = False,
        full_grads: bool = False,
        state_dtype: torch.dtype = torch.float32,
        master_remainders: bool = False,
    ):
        betas = _check_args(lr, betas, eps, weight_decay, foreach, capturable, differentiable)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if gather_buffers < 1:
            raise ValueError(f"Invalid gather_buffers: {gather_buffers} (must be >= 1)")
        if not bucket_cap_mb > 0:
            raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb} (must be > 0)")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype} (must be one of torch.float32, "
                "torch.bfloat16, torch.int8)"
            )
        self._config = dict(  # what a deep copy is rebuilt with (``__deepcopy__``)
            process_group=process_group,
            bucket_cap_mb=bucket_cap_mb,
            overlap_comm=overlap_comm,
            master_weights=master_weights,
            reduce_dtype=reduce_dtype,
            skip_nonfinite=skip_nonfinite,
            gather_buffers=gather_buffers,
            state_dict_timeout=state_dict_timeout,
            overlap_param_gather=overlap_param_gather,
            full_grads=full_grads,
            state_dtype=state_dtype,
            master_remainders=master_remainders,
        )
        self.comm = Comm(process_group)
        self._bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._master_weights = master_weights
        self._state_dtype = state_dtype
        self._remainders = master_remainders
        self._reduce_dtype = reduce_dtype
        self.skip_nonfinite = skip_nonfinite
        self._skipped_on_host = 0
        self._skipped_on_device: torch.Tensor | None = None  # fused: counted on the device
        self._absent_on_device: torch.Tensor | None = None  # fused: agreed, not read back
        self._scaler_checked = False  # ShardedGradScaler checked the shards for this step
        self._step_supports_amp_scaling = True  # GradScaler hands its scale to step()
        self._buckets: list[ShardBucket] = []
        # the backward side; replaced by a DDP-driven one at ``attach()``
        if full_grads and self.comm.replicate_group is not None:
            raise ValueError(
                "ShardedAdamW(full_grads=True) averages gradients over the shard group only; "
                "it does not support a 2-D (replicate, shard) mesh"
            )
        self.full_grads = full_grads
        kind = FullGradReducer if full_grads else HookReducer
        self._reducer: Reducer = kind(
            self._buckets, self.comm, gather_buffers, overlap_comm, self.param_name
        )
        self._slot: dict[torch.nn.Parameter, tuple[ShardBucket, int]] = {}
        self._names: dict[torch.nn.Parameter, str] = {}
        # (group index, parameter) of parameters without buckets yet: frozen or on the meta
        # device when their group was added (``_build_deferred``)
        self._deferred: list[tuple[int, torch.nn.Parameter]] = []
        self._meta_warned = False
        self._superseded = False  # a newer ShardedAdamW took the parameters (``_hand_over``)
        self._object_device = torch.device("cpu")
        self._agreement = StepAgreement(self.comm)
        self._last_stats = CommStats()
        self._gather = ParamGather(self._buckets, self.comm, overlap_param_gather)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
        )
        if TORCH_ADAMW_HAS_DECOUPLED_KEY:  # param_groups keep torch AdamW's keys exactly
            defaults["decoupled_weight_decay"] = True
        super().__init__(params, defaults)
        self._server = (
            StateServer(self, self.comm, ShardBucket.state_buffers, state_dict_timeout)
            if self.comm.distributed
            else None
        )
        optimizer_built(self)
        if self.comm.global_rank == 0:
            logger.info(
                "ShardedAdamW: world size %d (x%d replicas), %d buckets, %d elements owned "
                "per rank, %.1f MiB state per rank, bucket cap %.1f MiB",
                self.comm.world_size,
                self.comm.replicas,
                len(self._buckets),
                sum(b.layout.shard_numel for b in self._buckets),
                self.memory()["state_bytes"] / 2**20,
                bucket_cap_mb,
            )

    # ---- copies ------------------------------------------------------------------------------

    _CTOR_DEFAULTS = (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "foreach",
        "fused",
    )

    def _rebuilt(self, param_groups: list, state_dict: dict, config: dict) -> ShardedAdamW:
        new = type(self).__new__(type(self))
        new.__init__(param_groups, **{k: self.defaults[k] for k in self._CTOR_DEFAULTS}, **config)
        new.load_state_dict(state_dict)
        new.skipped_steps = self.skipped_steps
        return new

    def __deepcopy__(self, memo: dict) -> ShardedAdamW:
        """A new ``ShardedAdamW`` over deep copies of the parameters, with this one's options,
        hyperparameters and state, as ``copy.deepcopy`` of a ``torch.optim.AdamW`` gives.
        Built like any ``ShardedAdamW``: with a process group, every rank must copy (the same
        group serves both). Hooks are not copied (nor are they by torch)."""
        self.sync_params()
        groups = copy.deepcopy(self.param_groups, memo)
        new = self._rebuilt(groups, copy.deepcopy(self.state_dict(), memo), self._config)
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict:
        """Pickling: parameters, hyperparameters, options and the state in ``state_dict()``
        form; ``__setstate__`` rebuilds the buckets over the default process group of the
        process that unpickles (every rank must then unpickle, as for any construction). An
        explicit process group cannot be pickled: save ``state_dict()`` instead (or
        ``save_checkpoint``)."""
        if self._config["process_group"] is not None:
            raise TypeError(
                "ShardedAdamW over an explicit process group or mesh cannot be pickled (process "
                "groups cannot); save opt.state_dict() or use sharded_adamw.save_checkpoint"
            )
        config = dict(self._config)
        return {
            "param_groups": self.param_groups,
            "defaults": self.defaults,
            "state_dict": self.state_dict(),
            "config": config,
            "skipped_steps": self.skipped_steps,
        }

    def __setstate__(self, state: dict) -> None:
        self.defaults = state["defaults"]
        self.__init__(
            state["param_groups"],
            **{k: self.defaults[k] for k in self._CTOR_DEFAULTS},
            **state["config"],
        )
        self.load_state_dict(state["state_dict"])
        self.skipped_steps = state["skipped_steps"]

    # ---- construction ----------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._build_group(len(self.param_groups) - 1, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _build_group(self, gi: int, group: dict) -> None:
        _check_hyperparams(group, gi)
        params = group["params"]
        names = group.get("param_names") or [None] * len(params)
        seen = set()
        for j, (p, name) in enumerate(zip(params, names)):
            label = _label(gi, j, name, p)
            if p in seen:
                raise ValueError(f"ShardedAdamW: {label} appears twice in the parameter list")
            seen.add(p)
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"ShardedAdamW needs floating-point parameters: {label}")
            if p.layout != torch.strided:
                raise ValueError(f"ShardedAdamW needs dense (strided) parameters: {label}")
            if not p.is_meta and not _non_overlapping(p):
                raise ValueError(
                    f"ShardedAdamW needs parameters whose elements do not share memory: {label} "
                    f"has strides {p.stride()} (an expanded view); pass a contiguous copy"
                )
            if name is not None:
                self._names[p] = name
        self._check_same_on_every_rank(gi, params, names)
        self._deferred += [(gi, p) for p in params if _deferred(p)]
        self._build_buckets(gi, [p for p in params if not _deferred(p) and p.numel() > 0])

    def build_deferred(self, with_state: Iterable[torch.Tensor] = ()) -> list[ShardBucket]:
        """Buckets for the deferred parameters that can now step: frozen ones since unfrozen
        (``requires_grad_()``; torch AdamW steps them once they have a gradient) and meta ones
        since materialised (``module.to_empty``), built from their current values, with fresh
        state; and frozen ones in ``with_state`` (a load gives them state, which torch keeps
        for a frozen parameter). Every rank must toggle ``requires_grad`` alike (as DDP
        requires)."""
        load = {id(p) for p in with_state}
        ready = [
            (gi, p)
            for gi, p in self._deferred
            if (not _deferred(p) or (id(p) in load and not p.is_meta)) and p.numel() > 0
        ]
        if not ready:
            return []
        ids = {id(p) for _, p in ready}
        self._deferred = [(gi, p) for gi, p in self._deferred if id(p) not in ids]
        first = len(self._buckets)
        for gi in sorted({gi for gi, _ in ready}):
            self._build_buckets(gi, [p for g, p in ready if g == gi])
        return self._buckets[first:]

    def _build_buckets(self, gi: int, trainable: list[torch.nn.Parameter]) -> None:
        for other in live_optimizers():
            if other is not self:
                taken = [p for p in trainable if other.owns(p)]
                if taken:
                    other._hand_over(taken[0])
        group = self.param_groups[gi]
        comm = self.comm
        rdtype = lambda p: (
            self._reduce_dtype
            or (  # noqa: E731
                torch.float32
                if real_dtype(p.dtype) in LOW_PRECISION and self._master_weights
                else real_dtype(p.dtype)
            )
        )

        # int8 state: parameters of at least MIN_QUANTIZED_NUMEL elements with fp32 updates
        # fill buckets of their own, whose parameters and shards start at whole blocks
        def quantized(p: torch.nn.Parameter) -> bool:
            dtype = real_dtype(p.dtype)
            fp32 = dtype == torch.float32 or (dtype in LOW_PRECISION and self._master_weights)
            big = as_real(p).numel() >= MIN_QUANTIZED_NUMEL
            return self._state_dtype == torch.int8 and fp32 and big

        backward = list(reversed(list(enumerate(trainable))))  # last parameters first
        order = [
            (j, (gi, real_dtype(p.dtype), p.device, q), as_real(p).numel(), rdtype(p).itemsize)
            for q in (True, False)
            for j, p in backward
            if quantized(p) == q
        ]

        def align(key: tuple) -> int:
            a = align_elements(key[2].type, key[1].itemsize)
            return math.lcm(a, BLOCK) if key[3] else a

        for layout in plan_buckets(
            order, comm.world_size, comm.rank, self._bucket_cap_bytes, align
        ):
            members = [trainable[s.index] for s in layout.slots]
            bucket = ShardBucket(
                layout,
                members,
                group,
                comm.rank,
                self._master_weights,
                self._reduce_dtype,
                torch.int8 if layout.key[3] else _unquantized(self._state_dtype),
                self._remainders,
            )
            for i, p in enumerate(members):
                self._slot[p] = (bucket, i)
                self.state[p] = bucket.state_of(i)
            self._buckets.append(bucket)
            self._reducer.added([bucket])
        self._gather.added()

    def _hand_over(self, p: torch.Tensor) -> None:
        """A newer ``ShardedAdamW`` takes ``p`` (one of ours): stop reducing gradients (our
        gradient hooks would take ``p.grad`` before its own) and refuse to step from now on,
        as our buckets no longer hold the parameters. ``state_dict()`` keeps working, so the
        usual rebuild-and-load (``new.load_state_dict(old.state_dict())``) works. Attached to
        a DDP model, whose comm hook cannot be replaced, the newer optimizer is refused."""
        if self._reducer.model is not None:
            raise ValueError(
                f"ShardedAdamW: {self.param_name(p)} is already optimized by a ShardedAdamW "
                "attached to a DistributedDataParallel model, whose comm hook cannot be replaced; "
                "load "
                "the new settings into that optimizer (load_state_dict, param_groups) instead"
            )
        self.sync_params()
        self._reducer.close()
        self._superseded = True

    def _check_same_on_every_rank(self, gi: int, params: list, names: list) -> None:
        """Every rank must pass the same parameters, on its current CUDA device if on CUDA;
        the first problem is raised on every rank, so that none waits in a later collective.

        The agreement runs on the parameters' device: NCCL's ``all_gather_object`` would use
        ``torch.cuda.current_device()``, cuda:0 on every rank that skipped ``set_device``."""
        mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for p, n in zip(params, names)]
        device = next(
            (p.device for p in params if p.device.type not in ("cpu", "meta")), torch.device("cpu")
        )
        if device.type == "cpu" and self.comm.backend_on(device) == "nccl":  # no CPU tensors
            device = torch.device("cuda", torch.cuda.current_device())
        self._object_device = device  # for later small agreements (the state server's)
        wrong = current_device_mismatch(device)
        gathered = self.comm.all_gather_object((self.comm.global_rank, wrong, mine), device)
        for rank, problem, _ in gathered:
            if problem is not None:
                raise RuntimeError(f"ShardedAdamW: rank {rank}: {problem}")
        every = [theirs for _, _, theirs in gathered]
        ref = every[0]
        for rank, theirs in enumerate(every):
            if theirs == ref:
                continue
            for j, (a, b) in enumerate(zip(ref, theirs)):
                if a != b:
                    raise ValueError(
                        f"ShardedAdamW: ranks passed different parameters: group {gi}, "
                        f"parameter #{j}: rank 0 has {_describe(a)}, rank {rank} has {_describe(b)}"
                    )
            raise ValueError(
                f"ShardedAdamW: ranks passed different parameters: group {gi} has "
                f"{len(ref)} parameters on rank 0 and {len(theirs)} on rank {rank}"
            )

    def attach(self, model: torch.nn.Module) -> None:
        """Make ``model`` (a ``DistributedDataParallel``) reduce-scatter gradients into this
        optimizer's shards during backward, instead of all-reducing them: the backward side
        becomes DDP-driven (``integrations.ddp.DDPReducer``) for good."""
        from ..integrations.ddp import DDPFullGradReducer, DDPReducer, check_attachable

        if self._reducer.model is model:
            return
        self.build_deferred()  # parameters materialised (to_empty) since the optimizer was built
        if self._reducer.model is not None:
            raise RuntimeError(
                "ShardedAdamW.attach(): this optimizer is already attached to a model"
            )
        trainable, names = check_attachable(self, model)
        for p, n in names.items():
            self._names.setdefault(p, n)
        self._reducer.close()
        if self.full_grads:  # DDP's own all-reduce into p.grad, as for torch AdamW
            self._reducer = DDPFullGradReducer(self._reducer, model)
        else:
            self._reducer = DDPReducer(self._reducer, model, trainable)
        self._gather.watch(model.module)

    # ---- internal interface ----------------------------------------------------------------
    # What this package's integrations, checkpointing, tools and tests use from an optimizer.
    # Users need none of it; nothing outside this module reads the optimizer's private fields.

    @property
    def buckets(self) -> tuple[ShardBucket, ...]:
        """The buckets, in construction order (the reduce-scatter order)."""
        return tuple(self._buckets)

    @property
    def attached_model(self) -> torch.nn.Module | None:
        """The ``DistributedDataParallel`` model this optimizer is attached to, or None."""
        return self._reducer.model

    @property
    def object_device(self) -> torch.device:
        """The device small agreements between the ranks run on (the parameters' device, or
        the current CUDA device under NCCL)."""
        return self._object_device

    def owns(self, p: torch.Tensor) -> bool:
        """Whether ``p`` lives in one of this optimizer's buckets."""
        return p in self._slot

    def owned_params(self) -> list[torch.nn.Parameter]:
        """The parameters that live in this optimizer's buckets."""
        return list(self._slot)

    def slot_of(self, p: torch.Tensor) -> tuple[ShardBucket, int]:
        """``(bucket, index)`` of parameter ``p`` (which this optimizer owns)."""
        return self._slot[p]

    def gradient_shards(self) -> list[torch.Tensor]:
        """The averaged gradient's shards that hold a gradient this step, once every
        reduction has finished (collective, when one is still to launch)."""
        self.finish_reduction()
        return self._reducer.shards()

    def unscale_gradients(self, inv_scale: torch.Tensor) -> torch.Tensor:
        """``GradScaler.unscale_`` on the shards (``ShardedGradScaler``): multiply every
        gradient shard by ``inv_scale`` and return 1.0 where any rank's held a NaN or inf
        (agreed by one all-reduce), 0.0 otherwise. The step that follows then trusts the
        scaler's flag instead of refusing a stock ``GradScaler``'s."""
        self.finish_reduction()
        found = check_finite(self._reducer.shards(), self._buckets[0].device, inv_scale)
        if self.comm.distributed:
            self.comm.all_reduce_(found, "max")
        self._scaler_checked = True
        return found

    @property
    def params_in_flight(self) -> bool:
        """Whether parameter all-gathers launched by the last step are still unwaited
        (``overlap_param_gather``)."""
        return self._gather.in_flight

    @property
    def state_server(self) -> StateServer | None:
        """The thread that serves this rank's shards to ``state_dict()`` callers on other
        ranks (None on one process)."""
        return self._server

    def staging_buffers(self) -> list[torch.Tensor]:
        """The reusable reduce-scatter staging buffers allocated so far."""
        return [t for ts in self._reducer.pool.buffers.values() for t in ts]

    # ---- gradients -> reduce-scatter (``reducer.py``) ------------------------------------

    def finish_reduction(self) -> None:
        """Make sure every bucket's gradient shard is reduced and complete."""
        self._reducer.finish()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally in ``p.grad``; the next backward outside the context
        (or ``step()``) communicates once. With ``attach()``, use ``ddp_model.no_sync()``."""
        old, self._reducer.no_sync = self._reducer.no_sync, True
        try:
            yield
        finally:
            self._reducer.no_sync = old

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the averaged gradient by its norm over all shards; returns that norm.

        ``torch.nn.utils.clip_grad_norm_``'s contract, computed on the reduced shards: each
        rank contributes the norm of its shards, one all-reduce (in float64) combines them,
        every rank gets the same total and scales only what it owns. As in torch, the total
        and the clip coefficient have the gradients' dtype. Collective. (Importing
        ``sharded_adamw`` routes ``torch.nn.utils.clip_grad_norm_`` on this optimizer's
        parameters here; see ``clip``.)
        """
        if self.full_grads:  # p.grad is the averaged gradient: torch's own function
            return clip_grad_module.clip_grad_norm_(
                self.owned_params(), max_norm, norm_type, error_if_nonfinite
            )
        norm = total_norm(self, norm_type, error_if_nonfinite)
        scale_by_norm(self, max_norm, norm)
        return norm

    def grad_norms(
        self,
        params: Iterable[torch.Tensor] | None = None,
        norm_type: float = 2.0,
        unitwise: bool = False,
    ) -> list[torch.Tensor]:
        """The norm of each parameter's averaged gradient (default: every parameter this
        optimizer owns, in ``owned_params()`` order), as ``p.grad.norm(norm_type)`` would be
        under ``torch.optim.AdamW``; ``unitwise``: per output row for ``ndim > 1`` (adaptive
        gradient clipping's ``unitwise_norm``). Collective: every rank must call it, with the
        same parameters (see ``param_grads``)."""
        params = self.owned_params() if params is None else list(params)
        return param_grads.grad_norms(self, params, norm_type, unitwise)

    def scale_grads_(
        self, params: Iterable[torch.Tensor], factors: Iterable[torch.Tensor | float]
    ) -> None:
        """Multiply each parameter's averaged gradient by its factor (a scalar, or one per
        output row shaped like ``grad_norms(..., unitwise=True)``'s result): what
        ``p.grad.mul_(factor)`` does under ``torch.optim.AdamW``."""
        param_grads.scale_grads_(self, list(params), list(factors))

    def gathered_grads(self) -> contextlib.AbstractContextManager:
        """``with opt.gathered_grads():`` code that reads or changes ``p.grad`` between
        backward and ``step()`` (a framework hook, a logger) sees every parameter's averaged
        gradient there, bit for bit; what it leaves in ``p.grad`` goes back into the shards.
        Collective on entry (one all-reduce per bucket); holds the full gradients while it
        lasts (see ``param_grads``)."""
        return param_grads.gathered_grads(self)

    def full_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """Parameter ``p``'s whole averaged gradient (a new tensor shaped like ``p``), what
        ``p.grad`` holds after backward under DDP + ``torch.optim.AdamW``; None where its
        bucket got no gradient this step. Collective: one all-reduce of ``p``'s size, which
        every rank must call for the same parameters in the same order."""
        return param_grads.full_grad(self, p)

    # ---- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One step, in the order of the data path:

        1. finish the reduction: every gradient shard holds the averaged gradient;
        2. agree over the ranks, in one small collective, whether to skip the step (a NaN or
           inf anywhere) and which parameters had a gradient;
        3. update the owned shards in place, run by run, and
        4. launch each run's parameter all-gathers as soon as it is updated."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._prepare():
            return loss
        self._reducer.finish()  # 1
        present = self._reducer.presence()
        skip, on_device = self._agree(present)  # 2 (writes the agreed presence into present)
        if skip:
            self._skipped_on_host += 1
            if self.comm.global_rank == 0:
                logger.warning(
                    "ShardedAdamW: non-finite gradient, step skipped on every rank "
                    "(%d skipped so far)",
                    self.skipped_steps,
                )
        else:
            for run in self._plan(present, on_device):
                update_run(run)  # 3
                self._gather.launch(run.buckets)  # 4
            self._gather.finish()
        self._reducer.consumed(present)
        self._last_stats = self.comm.reset_stats()
        return loss

    def _prepare(self) -> bool:
        """Before the data path: buckets for the parameters unfrozen or materialised since
        (``build_deferred``), parameters given new storage re-adopted, and the checks that
        must raise before any collective. False when there is nothing to step."""
        new = self.build_deferred()
        if any(p.is_meta for _, p in self._deferred) and not self._meta_warned:
            self._meta_warned = True
            warnings.warn(
                "ShardedAdamW: parameters on the meta device do not train. module.to_empty() "
                "gives a module new parameter tensors, so an optimizer (this one or "
                "torch.optim.AdamW) built before it keeps the old meta ones: build the optimizer "
                "after materialising the model",
                stacklevel=4,
            )
        if not self._buckets:
            return False
        self.comm.check_still_alone()
        if self._superseded:
            raise RuntimeError(
                "ShardedAdamW: a ShardedAdamW built later over the same parameters has taken "
                "them over (they live in its buckets now); step that one"
            )
        self.sync_params()
        for b in self._buckets:
            if not b.adopted():  # given new storage (``model.double().float()``, ``p.data =``)
                b.adopt()
        if new:
            self._reducer.adopt_new(new)
        for _, p in self._deferred:
            if p.grad is not None:
                raise RuntimeError(
                    f"ShardedAdamW: {self.param_name(p)} has a gradient but "
                    + ("is on the meta device" if p.is_meta else "requires_grad=False")
                    + "; materialise it (module.to_empty) or unfreeze it (requires_grad_())"
                )
        return True

    def _agree(
        self, present: list[list[bool]]
    ) -> tuple[bool, tuple[torch.Tensor, torch.Tensor | None] | None]:
        """Step 2: ``(skip, on_device)``. Whether any rank's gradient holds a NaN or inf
        (checked on the shards, or taken from ``GradScaler``'s handshake), and which
        parameters had a gradient on some rank, written into ``present``; both agreed in one
        all-reduce (``StepAgreement``). With fused AdamW and no scaler the agreement stays
        on the device (``on_device``: the flags fused AdamW takes as ``found_inf``), so the
        host never waits for the backward, as with GradScaler and fused optimizers.

        The handshake: ``GradScaler.step`` hands its scale (``grad_scale``) or, after
        ``unscale_``, its verdict (``found_inf``) to an optimizer with
        ``_step_supports_amp_scaling``; only ``ShardedGradScaler`` computes that verdict on the
        shards (``unscale_gradients``), so a stock scaler's is refused."""
        scaler_found = getattr(self, "found_inf", None)  # set by GradScaler.step
        if scaler_found is not None and not (self._scaler_checked or self.full_grads):
            raise RuntimeError(
                "ShardedAdamW: torch.amp.GradScaler unscales and checks p.grad, which after a "
                "reduce-scatter is not the averaged gradient; use sharded_adamw.ShardedGradScaler"
            )
        self._scaler_checked = False
        grad_scale = getattr(self, "grad_scale", None)
        inv = None if grad_scale is None else grad_scale.double().reciprocal().float()
        device = self._buckets[0].device
        found = None
        if self.skip_nonfinite or inv is not None:
            found = check_finite(self._reducer.shards(), device, inv)
        if scaler_found is not None:  # already agreed by ShardedGradScaler
            scaler_found = scaler_found.to(device).reshape(1)
            found = scaler_found if found is None else found + scaler_found
        needs = self._reducer.needs_agreement
        on_device = None
        if scaler_found is None and inv is None and all(g["fused"] for g in self.param_groups):
            on_device = self._agreement.on_device(needs, present, found, device)
            skip = False
        else:
            skip = self._agreement.skip(needs, present, found, device)
        self._absent_on_device = None if on_device is None else on_device[1]
        return skip, on_device

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient. Where the skip is decided on the device
        (fused), reading this waits for the device."""
        on_device = 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())
        return self._skipped_on_host + on_device

    @skipped_steps.setter
    def skipped_steps(self, n: int) -> None:
        self._skipped_on_host, self._skipped_on_device = n, None

    def _plan(
        self, present: list[list[bool]], on_device: tuple[torch.Tensor, torch.Tensor | None] | None
    ) -> Iterator[Run]:
        """Step 3's runs (``update.plan_runs``), in forward order (``ParamGather.begin``): the
        buckets where some parameter steps, their masters re-seeded from parameters written
        since the last step. ``on_device`` (fused only, ``StepAgreement.on_device``): the
        agreed flags, never read here; the skip flag goes to fused AdamW as ``found_inf``,
        and the steps it skips are counted on the device."""
        with self._state_lock():  # a state_dict() being served finishes first
            if self._server is not None:
                self._server.updates_started += 1
        found_inf, absent = on_device or (None, None)
        if found_inf is not None:
            if self._skipped_on_device is None:
                self._skipped_on_device = torch.zeros((), device=found_inf.device)
            self._skipped_on_device += found_inf
        steps: dict[ShardBucket, Steps] = {}
        k = 0
        for b, bp in zip(self._buckets, present):  # each bucket's part of the agreed flags
            n = len(b.params)
            steps[b] = Steps(bp, found_inf, None if absent is None else absent[k : k + n])
            k += n
        order = [
            b
            for b in self._gather.begin(self._object_device)
            if any(steps[b].present) or absent is not None  # another rank may have had one
        ]
        for b in order:
            b.sync_masters()
            if b.group["amsgrad"]:
                b.add_max_exp_avg_sq()
        return plan_runs(order, steps, self._bucket_cap_bytes // 4)

    def sync_params(self) -> None:
        """Wait for the parameter all-gathers still in flight (``overlap_param_gather``).

        Forward, ``model.state_dict()``, ``model.load_state_dict()`` and this optimizer's own
        methods wait by themselves; call this before reading ``p.data`` by hand between
        ``step()`` and the next forward (an EMA of the weights, for instance). A no-op when
        nothing is in flight."""
        self._gather.wait_all()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``p.grad`` and the shards). Waits for gradient reductions in
        flight, which belong to the discarded batch; not for parameter all-gathers: it reads
        no parameter, and the usual ``step(); zero_grad()`` would otherwise wait for them
        before the forward they should hide behind."""
        self._reducer.wait()
        super().zero_grad(set_to_none=set_to_none)
        self._reducer.zero_grad(set_to_none, self._absent_on_device)
        self._absent_on_device = None

    # ---- state dicts -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``torch.optim.AdamW.state_dict()``'s format, full-shape tensors on CPU.

        Not a collective: any subset of ranks may call it, at any point between steps (one rank
        alone, as in ``if rank == 0: torch.save(opt.state_dict())``, or all of them). The other
        ranks' shards come from their serving threads (``state_server``), as of the last
        completed step. The caller holds the result plus one shard; the other ranks hold
        nothing extra. Low-precision parameters add their fp32 master weights under
        ``master_param``.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self.sync_params()
        index: dict = {}  # a parameter listed twice keeps its first index, as in torch
        groups = []
        start = 0
        for g in self.param_groups:
            index.update((p, j) for j, p in enumerate(g["params"], start) if p not in index)
            packed = {k: v for k, v in g.items() if k != "params"}
            groups.append({**packed, "params": [index[p] for p in g["params"]]})
            start += len(g["params"])
        entries = state_entries(self._buckets, ShardBucket.state_buffers, self._server)
        state = {index[p]: entry for p, entry in entries.items()}
        # entries keyed by something else than a parameter pass through, as in torch
        state.update((k, v) for k, v in self.state.items() if not isinstance(k, torch.Tensor))
        state_dict = {"state": state, "param_groups": groups}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Accepted for ``ZeroRedundancyOptimizer`` compatibility; does nothing.

        ``state_dict()`` works on any rank without a collective first, so the usual
        ``opt.consolidate_state_dict(to=0)`` on every rank and ``state_dict()`` on rank ``to``
        give the full state there (as do ``state_dict()`` calls on other ranks)."""
        if not 0 <= to < max(self.comm.dp_size, 1):
            raise ValueError(f"consolidate_state_dict(to={to}): no such rank")

    def _state_lock(self) -> contextlib.AbstractContextManager:
        """The lock that keeps a served ``state_dict()`` and a state change apart."""
        return self._server.lock if self._server is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def state_load(self) -> Iterator[None]:
        """Around a load that every rank makes (``load_state_dict``, ``load_checkpoint``):
        the state changes under the served-state lock and the load is counted, so that a
        ``state_dict()`` caller that has finished its load is answered by a rank only after
        that rank has finished its own (a server waits for the caller's count of loads),
        never with the state from before it. A server that has loaded more than the caller
        still answers: a load every rank makes changes nothing the caller could be behind
        on but that load itself (accelerate's ``prepare`` loads what it has just saved)."""
        with self._state_lock():
            yield
            if self._server is not None:
                self._server.loads += 1

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in ``torch.optim.AdamW``'s format, saved at any world size.

        Hyperparameters are loaded; how the update runs (``RUNTIME_KEYS``: ``fused``,
        ``foreach``, ``capturable``, ``differentiable``) stays as this optimizer was built,
        which is what its step tensors' device was chosen for. Copying them would hand CPU
        step tensors to the fused CUDA kernel after loading ``AdamW(fused=True)``'s state
        (pytorch/pytorch#124133), or CUDA step tensors to the for-loop and foreach paths.

        Everything is checked before anything is changed: a mismatch raises and leaves the
        optimizer as it was. ``register_load_state_dict_pre_hook`` and ``_post_hook`` hooks
        run as for any ``torch.optim.Optimizer``.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        by_id: dict = {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {gi} has {len(sg['params'])} "
                    f"parameters, the optimizer's has {len(g['params'])}"
                )
            by_id.update(zip(sg["params"], g["params"]))
        state = state_dict["state"]
        for pid, entry in state.items():
            if pid not in by_id:  # kept as is (``_load_entries``), as torch does
                continue
            p = by_id[pid]
            for key in (*STATE_KEYS, "master_param"):
                if key in entry and tuple(entry[key].shape) != tuple(p.shape):
                    raise ValueError(
                        f"loaded state dict's {key} for {self.param_name(p)} has shape "
                        f"{tuple(entry[key].shape)}, the parameter has {tuple(p.shape)}"
                    )
        entries = {p: state[pid] for pid, p in by_id.items() if pid in state}
        self.sync_params()
        self.build_deferred(with_state=entries)
        with self.state_load():
            self._load_entries(entries, saved_groups)
            for k, v in state.items():
                if k not in by_id:
                    self.state[k] = v
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_entries(self, entries: dict, saved_groups: list) -> None:
        for g, sg in zip(self.param_groups, saved_groups):
            g.update({k: v for k, v in sg.items() if k not in RUNTIME_KEYS})
            for k, v in OLD_GROUP_DEFAULTS.items():  # a state dict older than the key
                if k not in sg:
                    g[k] = v
        for b in self._buckets:
            if b.group["amsgrad"]:
                b.add_max_exp_avg_sq()
            b.load_steps([float(entries.get(p, {}).get("step", 0)) for p in b.params])
            bufs = b.state_buffers()
            for i, (p, slot) in enumerate(zip(b.params, b.layout.slots)):
                entry = entries.get(p, {})
                for key, buf in bufs.items():
                    view = b.owned(buf, i)
                    if key in entry:
                        view.copy_(as_real(entry[key]).reshape(-1)[slot.start : slot.end])
                    elif key == "master_param":
                        view.copy_(b.param_owned(i))
                    else:
                        view.zero_()
            b.store_buffers(bufs)  # bf16 and int8 state: rounded, quantized
            for i, p in enumerate(b.params):
                self.state[p] = b.state_of(i)

    # ---- reports ----------------------------------------------------------------------------

    def comm_stats(self) -> dict:
        """Bytes and calls of each collective during the last completed step (its backward
        included)."""
        return self._last_stats.as_dict()

    def memory(self) -> dict:
        """This rank's bytes: optimizer state (as held in ``opt.state``), allocated state
        buffers (padding included), gradient shards, and parameters."""
        nbytes = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
        state = sum(nbytes(t) for s in self.state.values() for t in s.values())
        alloc = sum(
            sum(store.nbytes() for store in b.stores().values()) + nbytes(b.steps)
            for b in self._buckets
        )
        return {
            "state_bytes": state,
            "state_allocated_bytes": alloc,
            "grad_shard_bytes": sum(nbytes(b.grad) for b in self._buckets),
            "param_bytes": sum(nbytes(p) for g in self.param_groups for p in g["params"]),
            "world_size": self.comm.world_size,
            "replicas": self.comm.replicas,
        }

    def param_name(self, p: torch.Tensor) -> str:
        if p in self._names:
            return repr(self._names[p])
        for gi, g in enumerate(self.param_groups):
            for j, q in enumerate(g["params"]):
                if q is p:
                    return _label(gi, j, None, p)
        return f"parameter of shape {tuple(p.shape)}"


def _unquantized(state_dtype: torch.dtype) -> torch.dtype:
    """The state dtype of a bucket too small to quantize: fp32 under int8 state."""
    return torch.float32 if state_dtype == torch.int8 else state_dtype


def _check_args(lr, betas, eps, weight_decay, foreach, capturable, differentiable) -> tuple:
    """``torch.optim.AdamW``'s constructor checks, in its order (before the parameter list is
    looked at), and its betas as stored (``_to_scalar``). Also what cannot run sharded."""
    if differentiable:
        raise ValueError(
            "ShardedAdamW does not support differentiable=True: autograd through a step whose "
            "update is split over ranks and re-assembled by a collective is out of scope; use "
            "torch.optim.AdamW(differentiable=True) for higher-order optimisation"
        )
    if capturable:
        raise ValueError(
            "ShardedAdamW does not support capturable=True: its step runs collectives and "
            "host-side bucket planning that a CUDA graph cannot capture"
        )
    if isinstance(lr, torch.Tensor):
        if foreach:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    if not (all(tensors) or not any(tensors)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            if foreach:
                raise ValueError(
                    f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                )
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    return tuple(_to_scalar(b) for b in betas)


def _non_overlapping(p: torch.Tensor) -> bool:
    """Whether no two elements of ``p`` share memory (no zero or overlapping strides)."""
    dims = sorted((st, n) for st, n in zip(p.stride(), p.shape) if n > 1)
    span = 1
    for stride, n in dims:
        if stride < span:
            return False
        span = stride * n
    return True


def _deferred(p: torch.Tensor) -> bool:
    """Whether ``p`` gets its bucket later: frozen, or on the meta device (no storage)."""
    return not p.requires_grad or p.is_meta


def _check_hyperparams(group: dict, gi: int) -> None:
    """torch.optim.AdamW's checks, per group, naming the group."""
    lr, eps, (b1, b2), wd = group["lr"], group["eps"], group["betas"], group["weight_decay"]
    where = f" (param group {gi})" if gi else ""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element{where}")
    if isinstance(lr, torch.Tensor) and group["foreach"]:
        raise ValueError(
            f"lr as a Tensor is not supported for capturable=False and foreach=True{where}"
        )
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {b1}{where}")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {b2}{where}")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}{where}")
    if math.isnan(float(lr)):
        raise ValueError(f"Invalid learning rate: {lr}{where}")


def _label(gi: int, j: int, name: str | None, p: torch.Tensor) -> str:
    base = f"parameter #{j} of group {gi} (shape {tuple(p.shape)}, {p.dtype})"
    return f"{name!r}: {base}" if name else base


def _describe(entry: tuple) -> str:
    name, shape, dtype, requires_grad = entry
    label = f"{name!r} " if name else ""
    return f"{label}shape {shape} {dtype}" + ("" if requires_grad else " (frozen)")


def current_device_mismatch(device: torch.device) -> str | None:
    """What is wrong if ``device`` (where a rank's parameters are) is a CUDA device other than
    the current one, else None. NCCL runs barriers, object collectives and DDP's setup on the
    current device: a model moved with ``.to(f"cuda:{r}")`` but no ``torch.cuda.set_device``
    leaves every rank on cuda:0 (a duplicate-GPU error or a hang)."""
    if device.type != "cuda":
        return None
    current = torch.cuda.current_device()
    if device.index is None or device.index == current:
        return None
    return (
        f"its parameters are on {device} but its current CUDA device is cuda:{current}; call "
        f"torch.cuda.set_device({device.index}) (usually torch.cuda.set_device(local_rank)) "
        "before building the model and the optimizer"
    )
