"""Per-rank memory and communication of DDP + AdamW and ShardedAdamW, by arithmetic alone.

Nothing here starts a process, runs a collective or allocates a tensor: the numbers follow from
the tensor sizes, the dtype and the mesh, so a user can size a job before having the hardware,
and tests can check the library's own counters against them.

Tensors are given in one of two forms:

- ``{numel: count}`` (or any iterable of numels), all of the estimate's ``dtype``, one param
  group, bucketed in the order given. ``even_split(P, N)`` gives ``N`` tensors holding ``P``
  elements as evenly as possible, for when only totals are known.
- a sequence of ``TensorSpec`` (numel, dtype, param group, trainable) in the model's
  registration order, as ``model_tensors(model)`` reads them from a model or its param groups
  (built on the meta device, so nothing is allocated) and ``TransformerShape.tensors()`` gives
  them for an assumed decoder-only transformer of about ``P`` parameters
  (``transformer_split``). These are bucketed as ``ShardedAdamW`` buckets them: frozen and
  empty tensors left out (the optimizer defers them), each param group on its own, its
  tensors in backward order (last registered first), a new bucket wherever the dtype changes.
  Frozen tensors still count in the ``params`` column (every rank holds them); per-parameter
  figures are per trainable parameter.

The split matters for the peak: one tensor of ``P`` elements is one bucket in flight, the whole
model, where a real model's largest bucket is a few hundred MiB.

Memory model: bytes each rank holds between steps (after ``step()``, gradients still
present), one row per setup. ``d`` is the number of ranks a tensor is sharded over
(``world_size / replicas``); every bucket of the optimizer (``layout.plan_buckets``, the
default bucket cap, counted in the reduce dtype) is padded to a multiple of ``d``, as in our
layout.

- ``ddp``: DDP + ``torch.optim.AdamW``, nothing sharded. fp32: 4 param + 4 grad + 8 state =
  16 B per parameter. bf16/fp16 ("bf16 / fp32 main grads, fp32 master"): 2 param
  + 4 fp32 main grad + 4 fp32 master + 8 fp32 state = 18 B (the usual mixed-precision recipe;
  ``torch.optim.AdamW`` alone on a bf16 model would keep bf16 state instead).
- ``attached``: ShardedAdamW attached to DDP (ZeRO-1). DDP keeps its bucket buffers, one
  full-size gradient in the parameter dtype (``p.grad`` itself is released once DDP has copied
  it into its bucket); the optimizer keeps its averaged gradient shard (update dtype) and the
  sharded state. fp32: 4 + (4 + 4/d) + 8/d = 8 + 12/d. The textbook ZeRO-1 figure is
  8 + 8/d; the 4/d more is the gradient shard the optimizer holds (``grad_shard_bytes`` in
  ``ShardedAdamW.memory()``).
- ``standalone``: ShardedAdamW without DDP (ZeRO-2): full-size gradients are released after
  their reduce-scatter. fp32: 4 + 4/d + 8/d = 4 + 12/d. bf16 with fp32 master weights:
  2 + 4/d + 12/d = 2 + 16/d.

ShardedAdamW's parameters live in its buckets (at most ``d - 1`` elements of padding per
bucket, not counted); its gradient shard and state are counted padded; its state counts
``exp_avg``, ``exp_avg_sq`` and, for bf16/fp16, the fp32 master weights (``master_weights=True``,
the default). Its options ``state_dtype`` and ``master_remainders`` (keyword arguments of
the same names here; ``estimate_state`` lists the buffers by name) keep state smaller, per
element of the padded shards: bf16 moments 2 + 2 B where the update runs in fp32; int8
moments ``2 * (1 + 4/256)`` B (codes and one fp32 scale per 256-element block) for tensors
of at least 4,096 elements with fp32 updates, which go into buckets of their own whose
tensors and shards start at whole blocks (more padding: under 256 elements per tensor and
``d * 256`` per bucket), smaller ones keeping fp32 state; bf16 masters as remainders 2.125 B
instead of 4. The DDP row keeps torch AdamW's fp32 state. Not counted: the per-tensor
``step`` counters (4 B per tensor, in host memory for both optimizers), DDP's bucket buffers
in the ``ddp`` row (counted as if ``gradient_as_bucket_view=True``; with DDP's default
another gradient-sized buffer exists), activations, and transient communication buffers.

Peak model (``estimate_peak``): the most bytes live at once during a step, above the bare model
(parameters not counted), which is what ``python -m benchmarks --peak-memory`` measures. Every
buffer it counts is named in its ``parts``:

- ``ddp`` (DDP with its default flags + ``torch.optim.AdamW``, foreach as on CUDA): ``p.grad``,
  DDP's bucket buffers (as many bytes again), the state, and foreach AdamW's one state-sized
  temporary (``exp_avg_sq.sqrt()``).
- ``attached``: DDP's bucket buffers, the gradient shard, the state, and one gradient in
  flight (the largest tensor's, released as soon as DDP has copied it); except on gloo (where
  DDP's buffers are averaged in place), the staging pool (``gather_buffers`` slots of the
  largest bucket in the reduce dtype, no more slots than buckets). The all-gathers need no
  buffer: they land in the parameters.
- ``standalone``: the gradient shard, the state, the staging pool, and the full-size
  gradients in flight: one bucket's worth while it fills, plus the largest tensor's gradient
  being produced.
- both ShardedAdamW rows: foreach AdamW's one input-sized temporary, over one run of buckets
  (at most a quarter of a bucket cap of shards, or the largest bucket's shard).

With bf16 or int8 state or remainders (where they change some bucket), the ShardedAdamW rows
count instead what is held throughout (the DDP bucket buffers attached, the gradient shard,
the state by buffer, the staging pool), plus the largest of the stretches of a step that never
overlap (``PeakEstimate.phases``): the backward's gradients in flight (attached: the largest
tensor's; standalone: the largest bucket's, held until its last gradient arrives); the update
of the largest run (``update.update_run`` reads a run's compact state out as fp32 tensors, one
per moment and one for remainder masters, all live until the run is written back, beside
foreach AdamW's one run-sized temporary). Summing the stretches, as
the fp32-state rows do, would count the gradients in flight and the update's temporaries at
once, which no longer are small next to the state. The state kernels (int8, remainders)
compiled by ``torch.compile`` (the default) allocate nothing but the read-outs; eager (no C
compiler, or
``SHARDED_ADAMW_COMPILE=0``) quantizing a moment takes 24 B per element of its bucket and
reading one 12 B more, which this model leaves out. At world size 1 the update's stretches
equal, to a few bytes, the peak torch's profiler records during ``step()`` (foreach AdamW;
the for-loop AdamW, torch's default on CPU, keeps two temporaries of the largest bucket).

Measured against it at W = 4 on a 50.4M-parameter fp32 MLP (tests/test_peak_memory.py): within
10% for the three fp32-state rows, and for the rows with int8 or bf16 state and remainders;
allocator overheads, activations and the per-tensor step counters are what is left out.

Communication model: bytes each rank sends per step, and a lower bound on the time. Ranks are
numbered node by node, ``gpus_per_node`` to a node, and a ``replicas x shard`` mesh puts a
shard group on consecutive ranks (as ``init_device_mesh`` does), so a replicate group strides
by the shard size. Every collective is a ring over its group of ``g`` ranks: a reduce-scatter
or all-gather of a ``B``-byte full buffer sends ``(g-1)/g * B`` per rank, an all-reduce twice
that. A group whose every instance lies inside one node uses the intra-node link; otherwise
the inter-node link is its bottleneck and all its bytes are charged to that link (the intra-node
hops run at the same time on a faster link). Bandwidths are per rank and per direction, in
GB/s (1e9 bytes/s), as in ``nccl-tests``' bus bandwidth. The lower bound is the busiest link's
bytes over its bandwidth (links may run in parallel); the serial time adds every collective.
Latency, overlap with compute and the few-byte all-reduce of step flags are left out.

- ``ddp``: all-reduce of the gradients over all ranks: ``2(W-1)/W * P * e`` (``e`` = DDP's
  gradient bytes: fp32 main grads for bf16/fp16, as in the memory row).
- ``flat``: reduce-scatter of the padded gradients in the reduce dtype and all-gather of the
  padded parameters in the parameter dtype, over all ``W`` ranks.
- ``hybrid``: the same inside each shard group of ``S = W / R`` ranks, plus an all-reduce
  across the ``R`` replicas of only the ``1/S`` shard (in the reduce dtype).

``counted_comm_bytes`` gives instead what ``ShardedAdamW.comm_stats()`` counts for one step,
by ``collectives.py``'s convention: a reduce-scatter counts its full input, an all-gather its
full output, an all-reduce twice its buffer.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..core.layout import BucketLayout, align_elements, plan_buckets
from ..core.state_formats import BLOCK, MIN_QUANTIZED_NUMEL

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
STATE_DTYPES = ("fp32", "bf16", "int8")  # ShardedAdamW's state_dtype, by name
STATE_TORCH_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}
SCALE_BYTES = 4  # one fp32 scale per int8 block of BLOCK elements
REMAINDER_BYTES = 2  # int16 low half of each fp32 master, plus one bit (REMAINDER_BITS)
REMAINDER_BITS = 8  # elements per byte of rounded-up bits
LOW_PRECISION = ("bf16", "fp16")  # kept with fp32 master weights and fp32 state
STEP_FLAG_BYTES = 4  # one float32 per flag in the step's all-reduce of flags
# torch's floating dtypes by name; a complex dtype is stepped as its real view (2 numbers each)
TORCH_DTYPES = {
    torch.float64: ("fp64", 1),
    torch.float32: ("fp32", 1),
    torch.bfloat16: ("bf16", 1),
    torch.float16: ("fp16", 1),
    torch.complex128: ("fp64", 2),
    torch.complex64: ("fp32", 2),
    torch.complex32: ("fp16", 2),
}


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor, as much of it as the estimate needs.

    ``dtype``: its dtype's name (``DTYPE_BYTES``), or ``None`` for the estimate's own
    ``dtype``. ``group``: the index of its param group (groups are bucketed apart).
    ``trainable``: its ``requires_grad``; ShardedAdamW defers a frozen tensor (no bucket,
    gradient or state), but every rank holds it. ``name`` only labels it."""

    numel: int
    dtype: str | None = None
    group: int = 0
    trainable: bool = True
    name: str = ""


Sizes = Mapping[int, int] | Iterable[int] | Sequence[TensorSpec]


def even_split(params: int, num_tensors: int = 1) -> dict[int, int]:
    """``{numel: count}`` of ``num_tensors`` tensors holding ``params`` elements as evenly as
    possible: ``params % num_tensors`` of them hold one element more than the others."""
    if num_tensors < 1:
        raise ValueError(f"num_tensors must be >= 1, got {num_tensors}")
    if params < num_tensors:
        raise ValueError(f"{params} parameters cannot fill {num_tensors} tensors")
    q, r = divmod(params, num_tensors)
    return {n: c for n, c in ((q + 1, r), (q, num_tensors - r)) if c}


def _sizes(sizes: Mapping[int, int] | Iterable[int]) -> dict[int, int]:
    out = dict(sizes) if isinstance(sizes, Mapping) else dict(Counter(sizes))
    if any(n < 0 or c < 0 for n, c in out.items()):
        raise ValueError(f"tensor sizes and counts must be >= 0, got {out}")
    return out


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def update_dtype(dtype: str) -> str:
    """The dtype AdamW's state and gradient shards have for parameters of ``dtype``."""
    _dtype_bytes(dtype)
    return "fp32" if dtype in LOW_PRECISION else dtype


def _update_bytes(dtype: str) -> int:
    return DTYPE_BYTES[update_dtype(dtype)]


def _state_bytes(dtype: str) -> int:
    """AdamW state per element: exp_avg, exp_avg_sq and, below fp32, the fp32 master weight."""
    ub = _update_bytes(dtype)
    return 2 * ub + (ub if dtype in LOW_PRECISION else 0)


def state_dtype_name(state_dtype: str | torch.dtype | None) -> str:
    """``ShardedAdamW``'s ``state_dtype`` by name (``"fp32"``, ``"bf16"``, ``"int8"``), from
    the name or the torch dtype; ``None`` is the default, fp32."""
    if state_dtype is None:
        return "fp32"
    if isinstance(state_dtype, torch.dtype):
        if state_dtype not in STATE_TORCH_DTYPES:
            known = ", ".join(str(t) for t in STATE_TORCH_DTYPES)
            raise ValueError(f"no state_dtype {state_dtype}; known: {known}")
        return STATE_TORCH_DTYPES[state_dtype]
    if state_dtype not in STATE_DTYPES:
        known = ", ".join(STATE_DTYPES)
        raise ValueError(f"unknown state_dtype {state_dtype!r}; known: {known}")
    return state_dtype


def shard_size(world_size: int, replicas: int = 1) -> int:
    """Ranks each tensor is sharded over: the shard dimension of a ``replicas x shard`` mesh."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if replicas < 1 or world_size % replicas:
        raise ValueError(
            f"replicas must be >= 1 and divide world_size {world_size}, got {replicas}"
        )
    return world_size // replicas


@dataclass(frozen=True)
class _Tensors:
    """Tensors with their dtypes resolved, and the order their buckets fill in."""

    specs: tuple[TensorSpec, ...]
    as_optimizer: bool  # per group, last registered first (ShardedAdamW); else as given


def _tensors(sizes: Sizes | _Tensors, dtype: str) -> _Tensors:
    """``sizes`` in one form: ``TensorSpec`` s bucketed as the optimizer does, or numels
    (``{numel: count}`` or an iterable of numels) of ``dtype`` bucketed in the order given."""
    if isinstance(sizes, _Tensors):
        return sizes
    _dtype_bytes(dtype)
    if not isinstance(sizes, Mapping):
        items = list(sizes)
        if items and all(isinstance(t, TensorSpec) for t in items):
            for t in items:
                if t.numel < 0:
                    raise ValueError(f"tensor sizes must be >= 0, got {t}")
                _dtype_bytes(t.dtype or dtype)
            resolved = tuple(
                t if t.dtype else TensorSpec(t.numel, dtype, t.group, t.trainable, t.name)
                for t in items
            )
            return _Tensors(resolved, True)
        if any(isinstance(t, TensorSpec) for t in items):
            raise TypeError("give tensors as numels or as TensorSpecs, not both")
        if any(n < 0 for n in items):
            raise ValueError(f"tensor sizes must be >= 0, got {items}")
        return _Tensors(tuple(TensorSpec(n, dtype) for n in items), False)
    counted = _sizes(sizes)
    return _Tensors(
        tuple(TensorSpec(n, dtype) for n, c in counted.items() for _ in range(c)), False
    )


def numel(sizes: Sizes) -> int:
    """Total trainable elements ``P``."""
    return sum(t.numel for t in _tensors(sizes, "fp32").specs if t.trainable)


DEFAULT_CAP_BYTES = 25 * 2**20  # ShardedAdamW's default bucket_cap_mb


@dataclass(frozen=True)
class _Plan:
    """The optimizer's buckets over some tensors at one shard size, and sums over them.

    ``state_dtype`` and ``remainders``: how the buckets keep their state (``ShardedAdamW``'s
    ``state_dtype`` by name and ``master_remainders``); int8 state also changes the buckets
    (its parameters bucketed apart, aligned to whole blocks), so it is part of the plan."""

    tensors: tuple[TensorSpec, ...]  # trainable and non-empty, in bucket order
    frozen_bytes: int  # held on every rank, never bucketed
    buckets: tuple[BucketLayout, ...]  # key: (param group, dtype, int8 state)
    reduce_dtype: str | None
    state_dtype: str = "fp32"
    remainders: bool = False

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def reduce_dtype_of(self, dtype: str) -> str:
        """The dtype a ``dtype`` bucket's gradients are reduce-scattered in."""
        return self.reduce_dtype or update_dtype(dtype)

    def reduce_bytes(self, dtype: str) -> int:
        """Bytes of an element of a ``dtype`` bucket's reduce-scatter."""
        return DTYPE_BYTES[self.reduce_dtype_of(dtype)]

    def over_tensors(self, per_element: Callable[[str], int]) -> int:
        """Bytes of the full-size (unpadded) buffers, ``per_element`` bytes per element."""
        return sum(t.numel * per_element(t.dtype) for t in self.tensors)

    def over_buckets(self, per_element: Callable[[str], int], *, padded: bool = False) -> int:
        """Bytes of every bucket's shard (or, ``padded``, its full buffer)."""
        return sum(
            (b.padded_numel if padded else b.shard_numel) * per_element(b.key[1])
            for b in self.buckets
        )

    def largest_bucket(self, per_element: Callable[[str], int], *, padded: bool = True) -> int:
        """Bytes of the largest bucket's buffer (or, not ``padded``, its shard)."""
        return max(
            (
                (b.padded_numel if padded else b.shard_numel) * per_element(b.key[1])
                for b in self.buckets
            ),
            default=0,
        )

    # ---- how the state is kept ------------------------------------------------------------

    def compact_moments(self, b: BucketLayout) -> bool:
        """Whether bucket ``b`` keeps its moments in less than the update dtype (int8
        codes, or bf16 where the update runs in fp32), read out as fp32 for the update."""
        return b.key[2] or (self.state_dtype == "bf16" and update_dtype(b.key[1]) == "fp32")

    def compact_master(self, b: BucketLayout) -> bool:
        """Whether bucket ``b`` keeps its fp32 master weights as remainders (bf16 only)."""
        return self.remainders and b.key[1] == "bf16"

    @property
    def compact(self) -> bool:
        """Whether some bucket keeps state in less than fp32 (the options change anything)."""
        return any(self.compact_moments(b) or self.compact_master(b) for b in self.buckets)

    def state_of(self, b: BucketLayout) -> dict[str, int]:
        """Bucket ``b``'s state buffers on one rank, by name: the two moments (int8 codes and
        scales, bf16, or the update dtype) and, for bf16/fp16, the master weights (fp32, or
        bf16's remainders)."""
        dt, S = b.key[1], b.shard_numel
        ud = update_dtype(dt)
        out = {}
        if b.key[2]:
            out["moments, int8 codes"] = 2 * S
            out["moments, int8 scales"] = 2 * (S // BLOCK) * SCALE_BYTES
        elif self.compact_moments(b):
            out["moments, bf16"] = 2 * DTYPE_BYTES["bf16"] * S
        else:
            out[f"moments, {ud}"] = 2 * DTYPE_BYTES[ud] * S
        if self.compact_master(b):
            out["master weights, remainders"] = REMAINDER_BYTES * S + S // REMAINDER_BITS
        elif dt in LOW_PRECISION:
            out["master weights, fp32"] = DTYPE_BYTES["fp32"] * S
        return out

    def state_parts(self) -> dict[str, int]:
        """Every bucket's state buffers on one rank, summed by name."""
        out: dict[str, int] = {}
        for b in self.buckets:
            for k, v in self.state_of(b).items():
                out[k] = out.get(k, 0) + v
        return dict(sorted(out.items(), key=lambda kv: _STATE_ORDER.index(kv[0].split(",")[0])))

    def runs(self, cap_bytes: int) -> list[list[BucketLayout]]:
        """The buckets as ``update.plan_runs`` groups them for one AdamW call each: in forward
        order (the reverse of the bucket order), consecutive buckets of one param group up
        to a quarter of the bucket cap of shard in the update dtype (a larger bucket alone);
        every parameter assumed to step."""
        runs: list[list[BucketLayout]] = []
        used, group = 0, None
        for b in reversed(self.buckets):
            size = b.shard_numel * _update_bytes(b.key[1])
            if not runs or b.key[0] != group or used + size > cap_bytes // 4:
                runs.append([])
                used = 0
            runs[-1].append(b)
            used += size
            group = b.key[0]
        return runs

    def step_phases(self, cap_bytes: int) -> dict[str, dict[str, int]]:
        """The update's temporaries, by part, at the run where they are largest: compact state
        read out as fp32 for the whole run, and foreach AdamW's one run-sized temporary (the
        compiled state kernels allocate nothing more)."""
        update: dict[str, int] = {}
        fp32 = DTYPE_BYTES["fp32"]
        for run in self.runs(cap_bytes):
            reads = {
                "moments read out as fp32": sum(
                    2 * fp32 * b.shard_numel for b in run if self.compact_moments(b)
                ),
                "masters read out as fp32": sum(
                    fp32 * b.shard_numel for b in run if self.compact_master(b)
                ),
            }
            reads = {k: v for k, v in reads.items() if v}
            foreach = sum(b.shard_numel * _update_bytes(b.key[1]) for b in run)
            here = reads | {"foreach temporary": foreach}
            if sum(here.values()) > sum(update.values()):
                update = here
        return {"update": update}


_STATE_ORDER = ("moments", "master weights")


def _plan(
    sizes: Sizes | _Tensors,
    dtype: str,
    d: int,
    *,
    reduce_dtype: str | None = None,
    cap_bytes: int = DEFAULT_CAP_BYTES,
    device: str = "cuda",
    state_dtype: str | torch.dtype | None = "fp32",
    master_remainders: bool = False,
) -> _Plan:
    """``layout.plan_buckets`` over the tensors as ``ShardedAdamW._build_buckets`` calls it:
    the cap counted in the reduce dtype, every tensor and shard aligned for its dtype on
    ``device``, a new bucket at every change of group or dtype. With int8 state, each group's
    tensors of at least ``MIN_QUANTIZED_NUMEL`` elements with fp32 updates come first, in
    buckets of their own whose tensors and shards start at whole blocks of ``BLOCK``."""
    tensors = _tensors(sizes, dtype)
    state = state_dtype_name(state_dtype)
    if reduce_dtype is not None:
        _dtype_bytes(reduce_dtype)
    live = [t for t in tensors.specs if t.trainable and t.numel]
    if tensors.as_optimizer:  # each group in turn, its tensors in backward order
        live = [t for g in sorted({t.group for t in live}) for t in live[::-1] if t.group == g]
    frozen = sum(t.numel * DTYPE_BYTES[t.dtype] for t in tensors.specs if not t.trainable)

    def quantized(t: TensorSpec) -> bool:
        fp32_update = update_dtype(t.dtype) == "fp32"
        return state == "int8" and fp32_update and t.numel >= MIN_QUANTIZED_NUMEL

    if state == "int8":  # within each group: the quantized tensors, then the others
        groups = list(dict.fromkeys(t.group for t in live))
        live = [
            t
            for g in groups
            for q in (True, False)
            for t in live
            if t.group == g and quantized(t) == q
        ]
    rb = lambda dt: DTYPE_BYTES[reduce_dtype or update_dtype(dt)]  # noqa: E731
    order = [
        (i, (t.group, t.dtype, quantized(t)), t.numel, rb(t.dtype)) for i, t in enumerate(live)
    ]

    def align(key: tuple) -> int:
        a = align_elements(device, DTYPE_BYTES[key[1]])
        return math.lcm(a, BLOCK) if key[2] else a

    buckets = plan_buckets(order, d, 0, cap_bytes, align) if order else []
    return _Plan(tuple(live), frozen, tuple(buckets), reduce_dtype, state, master_remainders)


def bucket_layouts(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    reduce_dtype: str | None = None,
    bucket_cap_mb: float = 25.0,
    device: str = "cuda",
    state_dtype: str | torch.dtype | None = "fp32",
) -> list[BucketLayout]:
    """The buckets every figure here sums over: those ShardedAdamW plans over these tensors
    (``BucketLayout`` s keyed ``(param group, dtype, int8 state)``, rank 0's view), in its
    order; ``state_dtype`` as given to the optimizer (int8 state buckets apart)."""
    d = shard_size(world_size, replicas)
    cap = int(bucket_cap_mb * 2**20)
    plan = _plan(
        sizes,
        dtype,
        d,
        reduce_dtype=reduce_dtype,
        cap_bytes=cap,
        device=device,
        state_dtype=state_dtype,
    )
    return list(plan.buckets)


def _buckets(
    sizes: Sizes,
    d: int,
    elem: int = 4,
    cap_bytes: int = DEFAULT_CAP_BYTES,
    *,
    device: str = "cuda",
    param_bytes: int = 4,
) -> list:
    """The optimizer's buckets over tensors of ``sizes`` (in the order given; ``elem``: the
    reduce dtype's bytes, which the cap counts), with the padding that aligns every tensor
    and shard of ``param_bytes`` elements on ``device`` (``layout.ALIGN_BYTES``)."""
    order = [(0, (), t.numel, elem) for t in _tensors(sizes, "fp32").specs if t.numel]
    return plan_buckets(order, d, 0, cap_bytes, align_elements(device, param_bytes))


def shard_numel(sizes: Sizes, d: int, *, device: str = "cuda", param_bytes: int = 4) -> int:
    """Elements of every rank's shard buffers: each bucket's ``ceil(span / d)`` rounded up
    to the alignment (``layout.py``; ``span`` counts the padding between tensors)."""
    return sum(b.shard_numel for b in _buckets(sizes, d, device=device, param_bytes=param_bytes))


def padded_numel(sizes: Sizes, d: int, *, device: str = "cuda", param_bytes: int = 4) -> int:
    """Elements of the full reduce-scatter input / all-gather output (padding included)."""
    return shard_numel(sizes, d, device=device, param_bytes=param_bytes) * d


def device_of(backend: str) -> str:
    """The device type whose alignment a backend's tensors get: gloo's are on the CPU."""
    return "cpu" if backend == "gloo" else "cuda"


# ---- the tensors of a model ------------------------------------------------------------------

HEAD_DIM = 128  # d_model per layer in transformer_split (LLaMA-7B: 4096 / 32, -13B: 5120 / 40)
VOCAB_SIZE = 32_000  # LLaMA's tokenizer
MLP_MULTIPLE = 256  # LLaMA rounds its SwiGLU width 8 d_model / 3 up to a multiple of this


@dataclass(frozen=True)
class TransformerShape:
    """A LLaMA-style decoder-only transformer: a token embedding; ``layers`` blocks of q, k, v
    and o projections (``d_model x d_model``), a SwiGLU MLP (gate and up ``ffn x d_model``,
    down ``d_model x ffn``) and two RMSNorm weights; a final RMSNorm; an untied LM head.
    No biases. Tensors in the order Hugging Face's ``LlamaForCausalLM`` registers them."""

    layers: int
    d_model: int
    ffn: int
    vocab: int = VOCAB_SIZE

    @property
    def numel(self) -> int:
        d, f = self.d_model, self.ffn
        return self.layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * self.vocab * d + d

    @property
    def num_tensors(self) -> int:
        return 9 * self.layers + 3

    def tensors(self, dtype: str | None = None) -> list[TensorSpec]:
        """Its parameter tensors in registration order, of ``dtype`` (``None``: the
        estimate's)."""
        d, f, v = self.d_model, self.ffn, self.vocab
        out = [TensorSpec(v * d, dtype, name="embed_tokens")]
        for i in range(self.layers):
            out += [TensorSpec(d * d, dtype, name=f"layers.{i}.{w}_proj") for w in "qkvo"]
            out += [TensorSpec(f * d, dtype, name=f"layers.{i}.{w}_proj") for w in ("gate", "up")]
            out += [TensorSpec(d * f, dtype, name=f"layers.{i}.down_proj")]
            out += [TensorSpec(d, dtype, name=f"layers.{i}.{n}") for n in ("attn_norm", "mlp_norm")]
        return out + [TensorSpec(d, dtype, name="norm"), TensorSpec(v * d, dtype, name="lm_head")]

    def describe(self) -> str:
        """One line: layers, widths, tensors and parameters."""
        return (
            f"{self.layers} layers, d_model {self.d_model:,}, MLP width {self.ffn:,}, vocab "
            f"{self.vocab:,}, untied head: {self.num_tensors:,} tensors, {self.numel:,} parameters"
        )


def _standard_shape(layers: int) -> TransformerShape:
    d = HEAD_DIM * layers
    return TransformerShape(layers, d, MLP_MULTIPLE * math.ceil(8 * d / 3 / MLP_MULTIPLE))


def transformer_split(params: int) -> TransformerShape:
    """The decoder-only transformer assumed for ``params`` parameters when only the count is
    known, so that the estimate buckets a realistic model (the peak depends on the largest
    bucket and tensor, which one ``params``-element tensor overstates many times).

    The rule, LLaMA's proportions: ``d_model = 128 * layers`` (LLaMA-7B and -13B), vocabulary
    32,000, untied head, SwiGLU. ``layers`` is the whole number whose model, with LLaMA's MLP
    width (``8 d_model / 3`` rounded up to a multiple of 256), has the count nearest
    ``params``; the MLP width is then set so that the total is ``params`` to within
    ``1.5 * d_model * layers`` elements. 7B gives LLaMA-7B's 32 layers of 4096 (291 tensors).
    Raises ``ValueError`` below the smallest such model (one layer of 128 with the whole
    vocabulary, about 8.3M parameters)."""
    layers = 1
    while _standard_shape(layers + 1).numel <= params:
        layers += 1
    layers = min((layers, layers + 1), key=lambda n: (abs(_standard_shape(n).numel - params), n))
    d = HEAD_DIM * layers
    fixed = TransformerShape(layers, d, 0).numel
    ffn = round((params - fixed) / (3 * d * layers))
    if ffn < 1:
        smallest = TransformerShape(1, HEAD_DIM, 1).numel
        raise ValueError(
            f"{params:,} parameters are fewer than the smallest transformer the rule builds "
            f"({smallest:,}: one layer of {HEAD_DIM} with a vocabulary of {VOCAB_SIZE:,})"
        )
    return TransformerShape(layers, d, ffn)


def dtype_name(dtype: torch.dtype) -> tuple[str, int]:
    """``(name, numbers per element)`` of a torch dtype the estimate knows: a complex dtype
    is stepped as its real view, two numbers of the real dtype per element."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(
            f"no estimate for {dtype}; known: {', '.join(str(t) for t in TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[dtype]


def model_tensors(
    source: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict], dtype: str | None = None
) -> list[TensorSpec]:
    """The parameter tensors ShardedAdamW would be given, in registration order: ``source``
    is a model (its ``parameters()``, one group, tied weights once), an iterable of
    parameters (one group), or a list of param groups (dicts with ``"params"``), as the
    optimizer takes them. Only shapes, dtypes and ``requires_grad`` are read, so a model
    built on the meta device (nothing allocated) does.

    ``dtype``: the dtype every tensor is estimated in, as ``model.to(dtype)`` would cast it
    (``None``: each tensor's own). Raises ``ValueError`` or ``TypeError``, naming the tensor,
    where ShardedAdamW would refuse the parameters (not floating point, given twice)."""
    if dtype is not None:
        _dtype_bytes(dtype)
    groups: list[list[tuple[str, torch.Tensor]]] = []
    if isinstance(source, torch.nn.Module):
        groups.append(list(source.named_parameters()))
    else:
        if isinstance(source, torch.Tensor | dict):
            source = [source]
        try:
            items = list(source)
        except TypeError:
            raise TypeError(
                f"expected an nn.Module, an iterable of parameters or a list of param groups, "
                f"got {type(source).__name__}"
            ) from None
        if items and all(isinstance(g, dict) for g in items):
            for gi, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"param group {gi} has no 'params'")
                ps = g["params"]
                ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
                names = g.get("param_names") or [
                    f"param group {gi}, tensor {j}" for j in range(len(ps))
                ]
                groups.append(list(zip(names, ps)))
        elif all(isinstance(p, torch.Tensor) for p in items):
            groups.append([(f"tensor {j}", p) for j, p in enumerate(items)])
        else:
            kinds = sorted({type(x).__name__ for x in items})
            raise TypeError(
                "expected an nn.Module, an iterable of parameters or a list of param groups, "
                f"got an iterable of {', '.join(kinds)}"
            )
    out: list[TensorSpec] = []
    seen: dict[int, str] = {}
    for gi, group in enumerate(groups):
        for name, p in group:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} is a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                raise ValueError(f"{name} is given twice (also as {seen[id(p)]})")
            seen[id(p)] = name
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(
                    f"ShardedAdamW needs floating-point parameters: {name} is {p.dtype}"
                )
            if dtype is not None:
                own, per = dtype, 2 if p.is_complex() else 1
            else:
                try:
                    own, per = dtype_name(p.dtype)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}; pass --dtype (dtype=) to cast it") from None
            out.append(TensorSpec(p.numel() * per, own, gi, p.requires_grad, name))
    return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds for one setup."""

    setup: str
    params: int
    grads: int
    state: int
    numel: int  # P, trainable, for per-parameter figures

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state

    @property
    def per_param(self) -> float:
        return self.total / self.numel if self.numel else 0.0


def estimate_memory(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    device: str = "cuda",
    reduce_dtype: str | None = None,
    state_dtype: str | torch.dtype | None = "fp32",
    master_remainders: bool = False,
) -> dict[str, MemoryEstimate]:
    """Per-rank bytes of ``ddp``, ``attached`` (ZeRO-1) and ``standalone`` (ZeRO-2), with
    parameters on ``device`` (its alignment sets the padding); ``reduce_dtype`` (default: the
    update dtype) is what the bucket cap counts. ``state_dtype`` and ``master_remainders``:
    ShardedAdamW's options of those names (``estimate_state`` lists the buffers); the DDP
    row keeps torch AdamW's fp32 state."""
    d = shard_size(world_size, replicas)
    plan = _plan(
        sizes,
        dtype,
        d,
        reduce_dtype=reduce_dtype,
        device=device,
        state_dtype=state_dtype,
        master_remainders=master_remainders,
    )
    P = plan.numel
    pb = lambda dt: DTYPE_BYTES[dt]  # noqa: E731
    params = plan.over_tensors(pb) + plan.frozen_bytes
    grad_shard, state = plan.over_buckets(_update_bytes), sum(plan.state_parts().values())
    return {
        "ddp": MemoryEstimate(
            "DDP + torch AdamW",
            params,
            plan.over_tensors(_update_bytes),
            plan.over_tensors(_state_bytes),
            P,
        ),
        "attached": MemoryEstimate(
            f"ShardedAdamW attached to DDP (ZeRO-1, {d}-way)",
            params,
            plan.over_tensors(pb) + grad_shard,  # DDP's bucket buffers (p.grad is released)
            state,
            P,
        ),
        "standalone": MemoryEstimate(
            f"ShardedAdamW standalone (ZeRO-2, {d}-way)", params, grad_shard, state, P
        ),
    }


@dataclass(frozen=True)
class StateEstimate:
    """ShardedAdamW's state buffers on one rank, by name, and what int8 state's block
    alignment adds to the padding of the shards."""

    parts: dict[str, int]  # bytes, e.g. "moments, int8 codes", "master weights, remainders"
    numel: int  # P, trainable
    shard_numel: int  # elements of this rank's shards, padding included
    fp32_shard_numel: int  # the same with fp32 state (the buckets int8 state changes)
    compact: bool  # whether some bucket keeps state in less than fp32

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def extra_padding(self) -> int:
        """Elements of padding per rank that int8 state's layout adds (or saves)."""
        return self.shard_numel - self.fp32_shard_numel


def estimate_state(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    device: str = "cuda",
    reduce_dtype: str | None = None,
    bucket_cap_mb: float = 25.0,
    state_dtype: str | torch.dtype | None = "fp32",
    master_remainders: bool = False,
) -> StateEstimate:
    """ShardedAdamW's state on one rank, each buffer by name, as ``opt.memory()``'s
    ``state_allocated_bytes`` counts it (less the per-tensor step counters):

    - fp32 state: ``exp_avg`` and ``exp_avg_sq`` in the update dtype, and for bf16/fp16
      parameters the fp32 master weights;
    - ``state_dtype="bf16"``: the moments in bf16 (2 B each per element) where the update
      runs in fp32;
    - ``state_dtype="int8"``: tensors of at least ``MIN_QUANTIZED_NUMEL`` elements with fp32
      updates keep each moment as one byte per element (codes) and one fp32 scale per block
      of ``BLOCK`` elements, in buckets of their own whose tensors and shards start at whole
      blocks (``extra_padding``); smaller ones keep fp32 moments;
    - ``master_remainders``: a bf16 parameter's fp32 master as its low 16 bits and a
      rounded-up bit, 2.125 B per element instead of 4.

    Every buffer is shard-sized, padding included."""
    d = shard_size(world_size, replicas)
    where = dict(reduce_dtype=reduce_dtype, cap_bytes=int(bucket_cap_mb * 2**20), device=device)
    plan = _plan(
        sizes, dtype, d, state_dtype=state_dtype, master_remainders=master_remainders, **where
    )
    fp32 = _plan(sizes, dtype, d, **where)
    return StateEstimate(
        plan.state_parts(),
        plan.numel,
        sum(b.shard_numel for b in plan.buckets),
        sum(b.shard_numel for b in fp32.buckets),
        plan.compact,
    )


@dataclass(frozen=True)
class PeakEstimate:
    """The most bytes one rank holds at once during a step, above the bare model, by part.

    ``parts``: what is counted throughout. ``phases``: stretches of the step that never
    overlap (the backward's gradients in flight, the update's temporaries), each by part;
    only the largest counts. Empty for the fp32-state rows, where every part is summed."""

    setup: str
    parts: dict[str, int]
    numel: int
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str | None:
        """The phase whose temporaries set the peak."""
        return max(self.phases, key=lambda k: sum(self.phases[k].values()), default=None)

    @property
    def total(self) -> int:
        phase = self.peak_phase
        return sum(self.parts.values()) + (sum(self.phases[phase].values()) if phase else 0)

    @property
    def per_param(self) -> float:
        return self.total / self.numel if self.numel else 0.0


def estimate_peak(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    reduce_dtype: str | None = None,
    bucket_cap_mb: float = 25.0,
    gather_buffers: int = 2,
    backend: str = "nccl",
    state_dtype: str | torch.dtype | None = "fp32",
    master_remainders: bool = False,
) -> dict[str, PeakEstimate]:
    """Peak per-rank bytes above the bare model of ``ddp``, ``attached`` and ``standalone``
    on ``backend`` (see the module docstring for what each part is). ``state_dtype`` and
    ``master_remainders``: ShardedAdamW's options; where they make some state smaller, the
    ShardedAdamW rows count the state by buffer (``estimate_state``) and the backward and
    the update as phases (``PeakEstimate.phases``)."""
    d = shard_size(world_size, replicas)
    cap = int(bucket_cap_mb * 2**20)
    plan = _plan(
        sizes,
        dtype,
        d,
        reduce_dtype=reduce_dtype,
        cap_bytes=cap,
        device=device_of(backend),
        state_dtype=state_dtype,
        master_remainders=master_remainders,
    )
    P = plan.numel
    pb = lambda dt: DTYPE_BYTES[dt]  # noqa: E731
    rb = plan.reduce_bytes
    largest = max((t.numel * pb(t.dtype) for t in plan.tensors), default=0)
    slots = min(gather_buffers, len(plan.buckets))  # as BufferPool does
    grad_shard = plan.over_buckets(_update_bytes)
    # foreach AdamW's one input-sized temporary, over one run (optimizer._runs)
    update_temp = min(grad_shard, max(cap // 4, plan.largest_bucket(_update_bytes, padded=False)))
    state = plan.over_buckets(_state_bytes)
    # on gloo a bucket reduced in its own dtype is averaged in DDP's buffer, in place
    staged = [
        b for b in plan.buckets if backend != "gloo" or plan.reduce_dtype_of(b.key[1]) != b.key[1]
    ]
    staging = {}
    if staged:
        staging["staging pool (reduce-scatter)"] = min(gather_buffers, len(staged)) * max(
            b.padded_numel * rb(b.key[1]) for b in staged
        )
    ddp = {"p.grad": plan.over_tensors(pb), "DDP bucket buffers": plan.over_tensors(pb)}
    main_grads = plan.over_tensors(lambda dt: _update_bytes(dt) if dt in LOW_PRECISION else 0)
    if main_grads:  # the fp32 master recipe of the memory rows
        ddp["fp32 main gradients"] = main_grads
    ddp |= {
        "optimizer state": plan.over_tensors(_state_bytes),
        "foreach temporary": plan.over_tensors(_update_bytes),
    }
    out = {"ddp": PeakEstimate("DDP + torch AdamW (foreach)", ddp, P)}
    attached_name = f"ShardedAdamW attached to DDP ({d}-way)"
    standalone_name = f"ShardedAdamW standalone ({d}-way)"
    if not plan.compact:
        attached = {
            "DDP bucket buffers": plan.over_tensors(pb),
            "gradient shard": grad_shard,
            "optimizer state": state,
            "gradient in flight": largest,
            "foreach temporary (one run)": update_temp,
        }
        standalone = {
            "gradient shard": grad_shard,
            "optimizer state": state,
            "staging pool (reduce-scatter)": slots * plan.largest_bucket(rb),
            "foreach temporary (one run)": update_temp,
            "gradients in flight": plan.largest_bucket(pb) + largest,
        }
        out["attached"] = PeakEstimate(attached_name, attached | staging, P)
        out["standalone"] = PeakEstimate(standalone_name, standalone, P)
        return out
    # compact state: the held buffers, then the larger of the backward and the update
    step = plan.step_phases(cap)
    held = {"gradient shard": grad_shard, **plan.state_parts()}
    bucket_grads = max((b.numel * pb(b.key[1]) for b in plan.buckets), default=0)
    out["attached"] = PeakEstimate(
        attached_name,
        {"DDP bucket buffers": plan.over_tensors(pb)} | held | staging,
        P,
        {"backward": {"gradient in flight": largest}} | step,
    )
    out["standalone"] = PeakEstimate(
        standalone_name,
        held | {"staging pool (reduce-scatter)": slots * plan.largest_bucket(rb)},
        P,
        {"backward": {"gradients in flight (largest bucket)": bucket_grads}} | step,
    )
    return out


@dataclass(frozen=True)
class Collective:
    """One ring collective per step over groups of ``group_size`` ranks."""

    kind: str  # "all-reduce", "reduce-scatter" or "all-gather"
    group_size: int
    buffer_bytes: int  # all-reduce: its buffer; reduce-scatter: full input; all-gather: full output
    link: str  # "intra" or "inter": the link that bounds it

    @property
    def wire_bytes(self) -> float:
        """Bytes each rank sends in a ring."""
        g = self.group_size
        sent = (g - 1) / g * self.buffer_bytes
        return 2 * sent if self.kind == "all-reduce" else sent

    @property
    def counted_bytes(self) -> int:
        """What ``collectives.py`` counts for it on each rank."""
        return 2 * self.buffer_bytes if self.kind == "all-reduce" else self.buffer_bytes


@dataclass(frozen=True)
class CommScheme:
    """The collectives of one training step under one way of data parallelism."""

    name: str
    collectives: tuple[Collective, ...]

    def bytes_on(self, link: str) -> float:
        """Bytes each rank sends per step over ``link`` ("intra" or "inter")."""
        return sum(c.wire_bytes for c in self.collectives if c.link == link)

    def seconds(self, intra_gbps: float, inter_gbps: float) -> tuple[float, float]:
        """``(lower_bound, serial)`` seconds per step at these per-rank bandwidths (GB/s)."""
        bw = {"intra": intra_gbps * 1e9, "inter": inter_gbps * 1e9}
        per_link = [self.bytes_on(link) / bw[link] for link in bw]
        return max(per_link), sum(per_link)


def _link(groups: Iterable[Iterable[int]], gpus_per_node: int) -> str:
    """``"intra"`` if every group's ranks share a node, else ``"inter"``."""
    for group in groups:
        if len({rank // gpus_per_node for rank in group}) > 1:
            return "inter"
    return "intra"


def comm_model(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    gpus_per_node: int = 8,
    reduce_dtype: str | None = None,
    device: str = "cuda",
    state_dtype: str | torch.dtype | None = "fp32",
) -> dict[str, CommScheme]:
    """Per-step collectives of ``ddp``, ``flat`` sharding over all ranks and, when
    ``replicas > 1``, ``hybrid`` sharding over a ``replicas x shard`` mesh. ``state_dtype``:
    ShardedAdamW's (int8 state changes the buckets, so the padding sent)."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    S = shard_size(world_size, replicas)
    W, R = world_size, replicas
    tensors = _tensors(sizes, dtype)
    where = dict(reduce_dtype=reduce_dtype, device=device, state_dtype=state_dtype)
    flat = _plan(tensors, dtype, W, **where)
    pb = lambda dt: DTYPE_BYTES[dt]  # noqa: E731
    world_link = _link([range(W)], gpus_per_node)
    schemes = {
        "ddp": CommScheme(
            f"DDP all-reduce over {W} ranks",
            (Collective("all-reduce", W, flat.over_tensors(_update_bytes), world_link),),
        ),
        "flat": CommScheme(
            f"ShardedAdamW flat, {W}-way",
            (
                Collective(
                    "reduce-scatter",
                    W,
                    flat.over_buckets(flat.reduce_bytes, padded=True),
                    world_link,
                ),
                Collective("all-gather", W, flat.over_buckets(pb, padded=True), world_link),
            ),
        ),
    }
    if R > 1:
        shard_link = _link((range(r * S, (r + 1) * S) for r in range(R)), gpus_per_node)
        replica_link = _link((range(s, W, S) for s in range(S)), gpus_per_node)
        hybrid = _plan(tensors, dtype, S, **where)
        rb = hybrid.reduce_bytes
        schemes["hybrid"] = CommScheme(
            f"ShardedAdamW hybrid, {R} replicas x {S}-way",
            (
                Collective("reduce-scatter", S, hybrid.over_buckets(rb, padded=True), shard_link),
                Collective("all-gather", S, hybrid.over_buckets(pb, padded=True), shard_link),
                Collective("all-reduce", R, hybrid.over_buckets(rb), replica_link),
            ),
        )
    return schemes


def counted_comm_bytes(
    sizes: Sizes,
    world_size: int,
    dtype: str = "fp32",
    *,
    replicas: int = 1,
    reduce_dtype: str | None = None,
    standalone: bool = True,
    skip_nonfinite: bool = True,
    backend: str = "nccl",
    state_dtype: str | torch.dtype | None = "fp32",
) -> dict[str, int]:
    """The byte counts of ``ShardedAdamW.comm_stats()`` after one ordinary step, on every rank.

    Attached on gloo with a flat group, a bucket whose reduce dtype is its parameter dtype is
    reduced by an in-place average of DDP's own (unpadded) buffers: it counts ``numel * e``
    instead of its padded reduce-scatter input. Assumes an initialised process group (without
    one, nothing is all-reduced), every trainable parameter given a gradient, and a finite
    step. Besides the gradients and parameters, ``step()`` all-reduces one float32 flag
    (non-finite gradient found) when ``skip_nonfinite``, plus, standalone, one "had a
    gradient" flag per bucketed tensor.
    """
    tensors = _tensors(sizes, dtype)
    device = device_of(backend)
    where = dict(reduce_dtype=reduce_dtype, device=device, state_dtype=state_dtype)
    schemes = comm_model(tensors, world_size, dtype, replicas=replicas, **where)
    counts = {"reduce_scatter_bytes": 0, "all_gather_bytes": 0, "all_reduce_bytes": 0}
    for c in schemes["hybrid" if replicas > 1 else "flat"].collectives:
        counts[c.kind.replace("-", "_") + "_bytes"] += c.counted_bytes
    plan = _plan(tensors, dtype, world_size, **where)
    if not standalone and backend == "gloo" and replicas == 1:
        counts["reduce_scatter_bytes"] = sum(
            b.numel * DTYPE_BYTES[dt]
            if plan.reduce_dtype_of(dt) == dt
            else b.padded_numel * plan.reduce_bytes(dt)
            for b in plan.buckets
            for dt in [b.key[1]]
        )
    if skip_nonfinite or standalone:
        flags = 1 + (len(plan.tensors) if standalone else 0)
        groups = 2 if replicas > 1 else 1  # shard group, then replicate group
        counts["all_reduce_bytes"] += 2 * flags * STEP_FLAG_BYTES * groups
    return counts


def format_bytes(n: float, base: int = 1024) -> str:
    """``n`` bytes with a binary (``base=1024``: KiB, MiB, GiB) or decimal (1000) unit."""
    units = ["KiB", "MiB", "GiB", "TiB"] if base == 1024 else ["kB", "MB", "GB", "TB"]
    if abs(n) < base:
        return f"{n:.0f} B"
    for unit in units:
        n /= base
        if abs(n) < base or unit == units[-1]:
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def format_seconds(t: float) -> str:
    """``t`` seconds in s, ms or µs with three significant digits."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-6:.3g} µs"


def markdown_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table: the first ``text_columns`` columns left-aligned, numbers right."""
    rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _dtype_label(specs: Iterable[TensorSpec]) -> str:
    """The trainable tensors' dtype, or ``mixed (bf16 x 200, fp32 x 91)``."""
    counts = Counter(t.dtype for t in specs if t.trainable)
    if len(counts) <= 1:
        return next(iter(counts), "fp32")
    return "mixed (" + ", ".join(f"{dt} x {n:,}" for dt, n in counts.most_common()) + ")"


def _sizes_for(
    params: int | None,
    num_tensors: int | None,
    tensors: Sequence[TensorSpec] | None,
    dtype: str,
) -> tuple[Sizes, str]:
    """The tensors to estimate, and the report's line saying which split was assumed: the
    model's own (``tensors``), ``num_tensors`` equal ones, or a LLaMA-style transformer of
    about ``params`` (one tensor where ``params`` is too few for it)."""
    if tensors is not None:
        return _tensors(tensors, dtype), ""
    if num_tensors is not None:
        sizes = even_split(params, num_tensors)
        split = " and ".join(f"{c:,} of {n:,} elements" for n, c in sizes.items())
        return sizes, (
            f"- Tensors: {split} (the parameters split evenly over --num-tensors {num_tensors:,})."
        )
    try:
        shape = transformer_split(params)
    except ValueError as e:
        return even_split(params, 1), (
            f"- Tensors: one of {params:,} elements: {e}; pass --num-tensors K for K equal "
            "tensors, or --model or --hf-config for your own model."
        )
    return _tensors(shape.tensors(dtype), dtype), (
        "- Assumed a decoder-only transformer (LLaMA-style, the rule of "
        f"estimate.transformer_split): {shape.describe()}; pass --model or --hf-config "
        "for your own model, or --num-tensors K for K equal tensors."
    )


def _model_line(specs: Sequence[TensorSpec], source: str, frozen: list) -> str:
    """The report's line describing a model's own tensors."""
    groups = len({t.group for t in specs})
    trainable = sum(1 for t in specs if t.trainable)
    largest = max((t for t in specs if t.trainable), key=lambda t: t.numel)
    line = (
        f"- Tensors of {source or 'the model'}: {trainable:,} trainable in {groups} param "
        f"group{'s' if groups > 1 else ''}, the largest {largest.name or 'unnamed'} "
        f"({largest.numel:,} elements)"
    )
    if frozen:
        n = sum(t.numel for t in frozen)
        line += (
            f"; {len(frozen):,} frozen ({n:,} parameters: every rank holds them, "
            "ShardedAdamW defers them, no gradient or state)"
        )
    return line + "."


def _state_line(state: str, remainders: bool, lowp: list[str]) -> str:
    """The report's line saying how ShardedAdamW keeps its state (``--state-dtype``,
    ``--master-remainders``)."""
    what = {
        "fp32": "fp32 AdamW state",
        "bf16": "AdamW moments in bf16 where the update runs in fp32",
        "int8": f"AdamW moments in blockwise int8 (1 B per element and an fp32 scale per "
        f"{BLOCK} elements) for tensors of at least {MIN_QUANTIZED_NUMEL:,} elements with "
        "fp32 updates, bucketed apart at whole blocks; fp32 for smaller ones",
    }[state]
    line = f"- ShardedAdamW state (--state-dtype {state}): {what}"
    if remainders:
        line += (
            "; fp32 master weights of bf16 parameters as 16-bit remainders and a bit "
            f"(--master-remainders, {REMAINDER_BYTES + 1 / REMAINDER_BITS:g} B per element)"
            if "bf16" in lowp
            else "; --master-remainders changes nothing here (no bf16 parameters)"
        )
    return line + ". Listed by buffer below."


def _state_section(est: StateEstimate, int8: bool) -> list[str]:
    """The report's table of ShardedAdamW's state buffers on one rank, and, with ``int8``
    state, the padding its blocks add."""
    what = {
        "moments, int8 codes": "exp_avg, exp_avg_sq: 1 B per element",
        "moments, int8 scales": f"exp_avg, exp_avg_sq: one fp32 per {BLOCK} elements",
        "moments, bf16": "exp_avg, exp_avg_sq: 2 B per element",
        "moments, fp32": "exp_avg, exp_avg_sq: 4 B per element",
        "moments, fp64": "exp_avg, exp_avg_sq: 8 B per element",
        "master weights, remainders": "low 16 bits and a rounded-up bit: 2.125 B per element",
        "master weights, fp32": "4 B per element",
    }
    P = est.numel
    rows = [[k, what[k], format_bytes(v), f"{v / P:.3f}"] for k, v in est.parts.items()]
    rows.append(["total", "every shard padded", format_bytes(est.total), f"{est.total / P:.3f}"])
    lines = [
        "",
        "## ShardedAdamW optimizer state per rank",
        "",
        markdown_table(["buffer", "what", "bytes", "B/param"], rows, text_columns=2),
    ]
    if int8:
        extra = est.extra_padding
        lines += [
            "",
            f"Extra padding: int8 state starts every quantized tensor and shard at a whole "
            f"block of {BLOCK} elements, which makes {abs(extra):,} elements of padding per rank "
            f"{'fewer' if extra < 0 else 'more'} than fp32 state's layout "
            f"({est.shard_numel:,} shard elements instead of {est.fp32_shard_numel:,}; "
            "counted in the gradient shard and the state above).",
        ]
    return lines


def _counted(m: PeakEstimate) -> str:
    """A peak row's "counted" cell: its parts, then its phases, the one counted first."""
    join = lambda parts: ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())  # noqa: E731
    text = "; ".join(f"{k} {format_bytes(v)}" for k, v in m.parts.items())
    if m.phases:
        peak = m.peak_phase
        text += f"; the largest stretch, {peak}: {join(m.phases[peak])}"
        others = [f"{k}: {join(v)}" for k, v in m.phases.items() if k != peak]
        text += f" (smaller: {'; '.join(others)})" if others else ""
    return text


def render_estimate(
    params: int | None,
    world_size: int,
    dtype: str | None = None,
    *,
    num_tensors: int | None = None,
    tensors: Sequence[TensorSpec] | None = None,
    source: str = "",
    replicas: int = 1,
    gpus_per_node: int = 8,
    intra_gbps: float = 200.0,
    inter_gbps: float = 25.0,
    reduce_dtype: str | None = None,
    state_dtype: str | torch.dtype | None = None,
    master_remainders: bool = False,
) -> str:
    """The ``sharded-adamw estimate`` report: memory and communication tables in markdown.

    The tensors, in order of precedence: ``tensors`` (read from a model by ``model_tensors``;
    ``source`` says which), ``params`` split evenly over ``num_tensors``, or the decoder-only
    transformer of about ``params`` parameters that ``transformer_split`` assumes (one tensor
    if ``params`` is too few for it). The report says which split it used, since the peak
    depends on it. ``dtype``: the dtype of tensors that give none (default fp32).

    ``state_dtype`` and ``master_remainders``: ShardedAdamW's options. Where they keep some
    state smaller, the report adds a table of the state buffers by name (int8 codes and
    scales, bf16 moments, remainders, the padding int8 blocks add) and the peak table lists
    the update's temporaries; where they change nothing, it says so and is otherwise the
    report without them."""
    dtype = dtype or "fp32"
    state = state_dtype_name(state_dtype)
    S = shard_size(world_size, replicas)
    nodes = math.ceil(world_size / gpus_per_node)
    sizes, split_line = _sizes_for(params, num_tensors, tensors, dtype)
    resolved = _tensors(sizes, dtype)
    if not any(t.trainable and t.numel for t in resolved.specs):
        raise ValueError(f"{source or 'the model'} has no trainable parameters to estimate")
    label = _dtype_label(resolved.specs)
    options = dict(state_dtype=state, master_remainders=master_remainders)
    flat = _plan(resolved, dtype, S, reduce_dtype=reduce_dtype, **options)
    given = [f"--state-dtype {state}"] * (state != "fp32")
    given += ["--master-remainders"] * master_remainders
    if not flat.compact:  # the options change nothing: the report without them
        state, master_remainders = "fp32", False
        options = dict(state_dtype=state, master_remainders=master_remainders)
    P = flat.numel
    frozen = [t for t in resolved.specs if not t.trainable]
    pad = flat.over_buckets(lambda dt: 1, padded=True) - P
    if tensors is not None:
        split_line = _model_line(resolved.specs, source, frozen)
    header = f"# {P:,} parameters" if not frozen else f"# {P:,} trainable parameters"
    out = [
        f"{header}, {label}, {world_size} ranks on {nodes} "
        f"node{'s' if nodes > 1 else ''} of {gpus_per_node}, state sharded {S}-way"
        + (f" x {replicas} replicas" if replicas > 1 else ""),
        "",
        split_line,
        f"- Buckets as ShardedAdamW plans them ({DEFAULT_CAP_BYTES / 2**20:g} MiB cap"
        + (", each param group on its own, last tensor first" if resolved.as_optimizer else "")
        + f"): {len(flat.buckets):,} at {S}-way, the largest "
        f"{format_bytes(flat.largest_bucket(flat.reduce_bytes))} in the reduce dtype; every "
        f"tensor and shard aligned, every bucket padded to {S} shards: {pad:,} padding "
        "elements in all.",
    ]
    lowp = [dt for dt in Counter(t.dtype for t in flat.tensors) if dt in LOW_PRECISION]
    if lowp and not flat.compact:
        out.append(
            f"- {'/'.join(lowp)} parameters with fp32 master weights and fp32 AdamW state. The "
            "DDP row is the usual mixed-precision recipe: bf16 parameters, fp32 main grads, "
            "fp32 master (18 B/param); "
            f"ShardedAdamW keeps DDP's gradients in {'/'.join(lowp)} (attached) and its own "
            "gradient shard in fp32."
        )
    elif lowp:
        out.append(
            f"- {'/'.join(lowp)} parameters with fp32 master weights. The DDP row is the usual "
            "mixed-precision recipe: bf16 parameters, fp32 main grads, fp32 master, fp32 "
            f"state (18 B/param); ShardedAdamW keeps DDP's gradients in {'/'.join(lowp)} "
            "(attached) and its own gradient shard in fp32."
        )
    if flat.compact:
        out.append(_state_line(state, master_remainders, lowp))
    elif given:
        out.append(
            f"- {' and '.join(given)} change{'s' * (len(given) == 1)} nothing for these "
            "tensors (bf16 or int8 state needs fp32 updates, int8 also tensors of at least "
            f"{MIN_QUANTIZED_NUMEL:,} elements, remainders bf16 parameters): fp32 state."
        )
    mem = estimate_memory(
        resolved, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype, **options
    )
    comm = comm_model(
        resolved,
        world_size,
        dtype,
        replicas=replicas,
        gpus_per_node=gpus_per_node,
        reduce_dtype=reduce_dtype,
        state_dtype=state,
    )
    counted = counted_comm_bytes(
        resolved, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype, state_dtype=state
    )
    dtypes = list(Counter(t.dtype for t in flat.tensors)) or [dtype]
    joined = lambda names: "/".join(dict.fromkeys(names))  # noqa: E731
    out += [
        "- Held between steps; not counted: activations, transient communication buffers, "
        "DDP bucket buffers, per-tensor step counters (host memory).",
        "",
        "## Memory per rank",
        "",
    ]
    base = mem["ddp"].total
    out.append(
        markdown_table(
            ["setup", "params", "grads", "optimizer state", "total", "B/param", "vs DDP"],
            [
                [
                    m.setup,
                    format_bytes(m.params),
                    format_bytes(m.grads),
                    format_bytes(m.state),
                    format_bytes(m.total),
                    f"{m.per_param:.3f}",
                    f"{m.total / base:.3f}x",
                ]
                for m in mem.values()
            ],
        )
    )
    if flat.compact:
        out += _state_section(
            estimate_state(
                resolved, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype, **options
            ),
            state == "int8",
        )
    peaks = estimate_peak(
        resolved, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype, **options
    )
    out += [
        "",
        "## Peak per rank during a step, above the bare model",
        "",
        "What `python -m benchmarks --peak-memory` measures (default bucket size and DDP flags, "
        "2 all-gather buffers); every buffer counted is listed."
        + (
            " The ShardedAdamW rows count what is held throughout, then the largest of the "
            "stretches that never overlap: the backward's gradients in flight and the update "
            "(compact state read out as fp32 for one run of buckets, foreach AdamW's "
            "temporary)."
            if flat.compact
            else ""
        ),
        "",
        markdown_table(
            ["setup", "peak", "B/param", "counted"],
            [
                [m.setup, format_bytes(m.total), f"{m.per_param:.2f}", _counted(m)]
                for m in peaks.values()
            ],
            text_columns=1,
        ),
    ]
    out += [
        "",
        f"## Communication per rank per step ({gpus_per_node} GPUs per node, intra-node "
        f"{intra_gbps:g} GB/s, inter-node {inter_gbps:g} GB/s per rank)",
        "",
        f"Gradients reduced in {joined(reduce_dtype or update_dtype(dt) for dt in dtypes)} "
        f"(DDP: {joined(update_dtype(dt) for dt in dtypes)}), parameters gathered in "
        f"{joined(dtypes)}. Ring collectives; a group spanning nodes is charged to the "
        "inter-node link. "
        "Lower bound: busiest link's bytes / bandwidth; serial: every collective in turn. "
        "Latency and overlap with compute are ignored.",
        "",
    ]
    rows = []
    for scheme in comm.values():
        low, serial = scheme.seconds(intra_gbps, inter_gbps)
        what = ", ".join(f"{c.kind} over {c.group_size} ({c.link})" for c in scheme.collectives)
        rows.append(
            [
                scheme.name,
                what,
                format_bytes(scheme.bytes_on("intra"), 1000),
                format_bytes(scheme.bytes_on("inter"), 1000),
                format_seconds(low),
                format_seconds(serial),
            ]
        )
    out.append(
        markdown_table(
            ["scheme", "collectives (link)", "intra-node", "inter-node", "lower bound", "serial"],
            rows,
            text_columns=2,
        )
    )
    out += [
        "",
        f"`ShardedAdamW.comm_stats()` counts per step and rank for {scheme.name} "
        "(full reduce-scatter input, full all-gather output, twice an all-reduce's buffer; "
        "standalone, step flags included): "
        + ", ".join(f"{k.removesuffix('_bytes')} {v:,} B" for k, v in counted.items())
        + ".",
    ]
    return "\n".join(out)
