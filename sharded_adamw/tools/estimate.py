"""Per-rank memory and communication of DDP + AdamW and ShardedAdamW, by arithmetic alone.

Nothing here starts a process, runs a collective or allocates a tensor: the numbers follow from
the tensor sizes, the dtype and the mesh, so a user can size a job before having the hardware,
and tests can check the library's own counters against them.

Sizes are given as ``{numel: count}`` (or any iterable of numels). ``even_split(P, N)`` gives
``N`` tensors holding ``P`` elements as evenly as possible, for when only totals are known.

Memory model: bytes each rank holds between steps (after ``step()``, gradients still
present), one row per setup. ``d`` is the number of ranks a tensor is sharded over
(``world_size / replicas``); every bucket of the optimizer (``layout.plan_buckets``, tensors
in the order given, the default bucket cap) is padded to a multiple of ``d``, as in our layout.

- ``ddp``: DDP + ``torch.optim.AdamW``, nothing sharded. fp32: 4 param + 4 grad + 8 state =
  16 B per parameter. bf16/fp16: NOTES.md's row "bf16 / fp32 main grads, fp32 master": 2 param
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
the default). Not counted: the per-tensor ``step`` counters (4 B per tensor, in host memory for
both optimizers), DDP's bucket buffers in the ``ddp`` row (counted as if
``gradient_as_bucket_view=True``; with DDP's default another gradient-sized buffer exists),
activations, and transient communication buffers.

Peak model (``estimate_peak``): the most bytes live at once during a step, above the bare model
(parameters not counted), which is what ``sharded-adamw bench --peak-memory`` measures. Every
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

Measured against it at W = 4 on a 50.4M-parameter fp32 MLP (tests/test_peak_memory.py): within
10% for the three rows; allocator overheads, activations and the per-tensor step counters are
what is left out.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..core.layout import align_elements, plan_buckets

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
LOW_PRECISION = ("bf16", "fp16")  # kept with fp32 master weights and fp32 state
STEP_FLAG_BYTES = 4  # one float32 per flag in the step's all-reduce of flags

Sizes = Mapping[int, int] | Iterable[int]


def even_split(params: int, num_tensors: int = 1) -> dict[int, int]:
    """``{numel: count}`` of ``num_tensors`` tensors holding ``params`` elements as evenly as
    possible: ``params % num_tensors`` of them hold one element more than the others."""
    if num_tensors < 1:
        raise ValueError(f"num_tensors must be >= 1, got {num_tensors}")
    if params < num_tensors:
        raise ValueError(f"{params} parameters cannot fill {num_tensors} tensors")
    q, r = divmod(params, num_tensors)
    return {n: c for n, c in ((q + 1, r), (q, num_tensors - r)) if c}


def _sizes(sizes: Sizes) -> dict[int, int]:
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


def shard_size(world_size: int, replicas: int = 1) -> int:
    """Ranks each tensor is sharded over: the shard dimension of a ``replicas x shard`` mesh."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if replicas < 1 or world_size % replicas:
        raise ValueError(
            f"replicas must be >= 1 and divide world_size {world_size}, got {replicas}"
        )
    return world_size // replicas


def numel(sizes: Sizes) -> int:
    """Total elements ``P``."""
    return sum(n * c for n, c in _sizes(sizes).items())


DEFAULT_CAP_BYTES = 25 * 2**20  # ShardedAdamW's default bucket_cap_mb


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
    order = [(0, (), n, elem) for n, c in _sizes(sizes).items() for _ in range(c) if n]
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


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds for one setup."""

    setup: str
    params: int
    grads: int
    state: int
    numel: int  # P, for per-parameter figures

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state

    @property
    def per_param(self) -> float:
        return self.total / self.numel if self.numel else 0.0


def estimate_memory(
    sizes: Sizes, world_size: int, dtype: str = "fp32", *, replicas: int = 1, device: str = "cuda"
) -> dict[str, MemoryEstimate]:
    """Per-rank bytes of ``ddp``, ``attached`` (ZeRO-1) and ``standalone`` (ZeRO-2), with
    parameters on ``device`` (its alignment sets the padding)."""
    d = shard_size(world_size, replicas)
    sizes = _sizes(sizes)
    pb = _dtype_bytes(dtype)
    ub = DTYPE_BYTES[update_dtype(dtype)]
    state_per_elem = 2 * ub + (ub if dtype in LOW_PRECISION else 0)  # exp_avg, exp_avg_sq, master
    P, shard = numel(sizes), shard_numel(sizes, d, device=device, param_bytes=pb)
    return {
        "ddp": MemoryEstimate("DDP + torch AdamW", P * pb, P * ub, P * state_per_elem, P),
        "attached": MemoryEstimate(
            f"ShardedAdamW attached to DDP (ZeRO-1, {d}-way)",
            P * pb,
            P * pb + shard * ub,  # DDP's bucket buffers (p.grad is released) + the shard
            shard * state_per_elem,
            P,
        ),
        "standalone": MemoryEstimate(
            f"ShardedAdamW standalone (ZeRO-2, {d}-way)",
            P * pb,
            shard * ub,
            shard * state_per_elem,
            P,
        ),
    }


@dataclass(frozen=True)
class PeakEstimate:
    """The most bytes one rank holds at once during a step, above the bare model, by part."""

    setup: str
    parts: dict[str, int]
    numel: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def per_param(self) -> float:
        return self.total / self.numel if self.numel else 0.0


def _largest_bucket(sizes: dict[int, int], d: int, elem: int, cap_bytes: int, **where) -> int:
    """Padded elements of the largest of the optimizer's buckets (``layout.plan_buckets``)."""
    return max((b.padded_numel for b in _buckets(sizes, d, elem, cap_bytes, **where)), default=0)


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
) -> dict[str, PeakEstimate]:
    """Peak per-rank bytes above the bare model of ``ddp``, ``attached`` and ``standalone``
    on ``backend`` (see the module docstring for what each part is)."""
    d = shard_size(world_size, replicas)
    sizes = _sizes(sizes)
    pb, ub = _dtype_bytes(dtype), DTYPE_BYTES[update_dtype(dtype)]
    rb = DTYPE_BYTES[reduce_dtype or update_dtype(dtype)]
    where = dict(device=device_of(backend), param_bytes=pb)
    P, shard = numel(sizes), shard_numel(sizes, d, **where)
    largest = max((n for n, c in sizes.items() if c), default=0)
    cap = int(bucket_cap_mb * 2**20)
    bucket = _largest_bucket(sizes, d, rb, cap, **where)
    slots = min(gather_buffers, len(_buckets(sizes, d, rb, cap, **where)))  # as BufferPool does
    # foreach AdamW's one input-sized temporary, over one run (optimizer._runs)
    update_temp = min(shard * ub, max(cap // 4, bucket // d * ub))
    state = shard * (2 * ub + (ub if dtype in LOW_PRECISION else 0))
    ddp_state = P * (2 * ub + (ub if dtype in LOW_PRECISION else 0))
    attached = {
        "DDP bucket buffers": P * pb,
        "gradient shard": shard * ub,
        "optimizer state": state,
        "gradient in flight": largest * pb,
        "foreach temporary (one run)": update_temp,
    }
    if backend != "gloo" or rb != pb:
        attached["staging pool (reduce-scatter)"] = slots * bucket * rb
    ddp = {"p.grad": P * pb, "DDP bucket buffers": P * pb}
    if dtype in LOW_PRECISION:  # the fp32 master recipe of the memory rows
        ddp["fp32 main gradients"] = P * ub
    ddp |= {"optimizer state": ddp_state, "foreach temporary": P * ub}
    return {
        "ddp": PeakEstimate("DDP + torch AdamW (foreach)", ddp, P),
        "attached": PeakEstimate(f"ShardedAdamW attached to DDP ({d}-way)", attached, P),
        "standalone": PeakEstimate(
            f"ShardedAdamW standalone ({d}-way)",
            {
                "gradient shard": shard * ub,
                "optimizer state": state,
                "staging pool (reduce-scatter)": slots * bucket * rb,
                "foreach temporary (one run)": update_temp,
                "gradients in flight": (bucket + largest) * pb,
            },
            P,
        ),
    }


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
) -> dict[str, CommScheme]:
    """Per-step collectives of ``ddp``, ``flat`` sharding over all ranks and, when
    ``replicas > 1``, ``hybrid`` sharding over a ``replicas x shard`` mesh."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    S = shard_size(world_size, replicas)
    W, R = world_size, replicas
    sizes = _sizes(sizes)
    pb = _dtype_bytes(dtype)
    rb = _dtype_bytes(reduce_dtype or update_dtype(dtype))
    ddp_grad = DTYPE_BYTES[update_dtype(dtype)]
    world_link = _link([range(W)], gpus_per_node)
    where = dict(device=device, param_bytes=pb)
    flat = padded_numel(sizes, W, **where)
    schemes = {
        "ddp": CommScheme(
            f"DDP all-reduce over {W} ranks",
            (Collective("all-reduce", W, numel(sizes) * ddp_grad, world_link),),
        ),
        "flat": CommScheme(
            f"ShardedAdamW flat, {W}-way",
            (
                Collective("reduce-scatter", W, flat * rb, world_link),
                Collective("all-gather", W, flat * pb, world_link),
            ),
        ),
    }
    if R > 1:
        shard_link = _link((range(r * S, (r + 1) * S) for r in range(R)), gpus_per_node)
        replica_link = _link((range(s, W, S) for s in range(S)), gpus_per_node)
        hybrid = padded_numel(sizes, S, **where)
        schemes["hybrid"] = CommScheme(
            f"ShardedAdamW hybrid, {R} replicas x {S}-way",
            (
                Collective("reduce-scatter", S, hybrid * rb, shard_link),
                Collective("all-gather", S, hybrid * pb, shard_link),
                Collective("all-reduce", R, hybrid // S * rb, replica_link),
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
) -> dict[str, int]:
    """The byte counts of ``ShardedAdamW.comm_stats()`` after one ordinary step, on every rank.

    Attached on gloo with a flat group and the reduce dtype equal to the parameter dtype, the
    reduction is an in-place average of DDP's own (unpadded) buffers: its count is ``P * e``
    instead of the padded reduce-scatter input. Assumes an initialised process group (without
    one, nothing is all-reduced), every parameter trainable and given a gradient, and a finite
    step. Besides the gradients and parameters, ``step()`` all-reduces one float32 flag
    (non-finite gradient found) when ``skip_nonfinite``, plus, standalone, one "had a
    gradient" flag per tensor.
    """
    sizes = _sizes(sizes)
    schemes = comm_model(
        sizes,
        world_size,
        dtype,
        replicas=replicas,
        reduce_dtype=reduce_dtype,
        device=device_of(backend),
    )
    counts = {"reduce_scatter_bytes": 0, "all_gather_bytes": 0, "all_reduce_bytes": 0}
    for c in schemes["hybrid" if replicas > 1 else "flat"].collectives:
        counts[c.kind.replace("-", "_") + "_bytes"] += c.counted_bytes
    rdtype = reduce_dtype or update_dtype(dtype)
    if not standalone and backend == "gloo" and replicas == 1 and rdtype == dtype:
        counts["reduce_scatter_bytes"] = numel(sizes) * DTYPE_BYTES[dtype]
    if skip_nonfinite or standalone:
        flags = 1 + (sum(sizes.values()) if standalone else 0)
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


def render_estimate(
    params: int,
    world_size: int,
    dtype: str,
    *,
    num_tensors: int = 1,
    replicas: int = 1,
    gpus_per_node: int = 8,
    intra_gbps: float = 200.0,
    inter_gbps: float = 25.0,
    reduce_dtype: str | None = None,
) -> str:
    """The ``sharded-adamw estimate`` report: memory and communication tables in markdown."""
    sizes = even_split(params, num_tensors)
    S = shard_size(world_size, replicas)
    nodes = math.ceil(world_size / gpus_per_node)
    mem = estimate_memory(sizes, world_size, dtype, replicas=replicas)
    comm = comm_model(
        sizes,
        world_size,
        dtype,
        replicas=replicas,
        gpus_per_node=gpus_per_node,
        reduce_dtype=reduce_dtype,
    )
    counted = counted_comm_bytes(
        sizes, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype
    )
    rdtype = reduce_dtype or update_dtype(dtype)
    split = " and ".join(f"{c:,} of {n:,} elements" for n, c in sizes.items())
    pad = padded_numel(sizes, S, param_bytes=_dtype_bytes(dtype)) - params
    out = [
        f"# {params:,} parameters, {dtype}, {world_size} ranks on {nodes} "
        f"node{'s' if nodes > 1 else ''} of {gpus_per_node}, state sharded {S}-way"
        + (f" x {replicas} replicas" if replicas > 1 else ""),
        "",
        f"- Tensors: {split} (the parameters split evenly over --num-tensors {num_tensors:,}). "
        f"Padding is exact for that split: every tensor of n elements reserves ceil(n/{S}) "
        f"elements per rank; {pad:,} padding elements in all.",
    ]
    if dtype in LOW_PRECISION:
        out.append(
            f"- {dtype} parameters with fp32 master weights and fp32 AdamW state. The DDP row "
            f"is NOTES.md's 'bf16 / fp32 main grads, fp32 master' row (18 B/param); "
            f"ShardedAdamW keeps DDP's gradients in {dtype} (attached) and its own gradient "
            "shard in fp32."
        )
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
    peaks = estimate_peak(sizes, world_size, dtype, replicas=replicas, reduce_dtype=reduce_dtype)
    out += [
        "",
        "## Peak per rank during a step, above the bare model",
        "",
        "What `sharded-adamw bench --peak-memory` measures (default bucket size and DDP flags, "
        "2 all-gather buffers); every buffer counted is listed.",
        "",
        markdown_table(
            ["setup", "peak", "B/param", "counted"],
            [
                [
                    m.setup,
                    format_bytes(m.total),
                    f"{m.per_param:.2f}",
                    "; ".join(f"{k} {format_bytes(v)}" for k, v in m.parts.items()),
                ]
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
        f"Gradients reduced in {rdtype} (DDP: {update_dtype(dtype)}), parameters gathered in "
        f"{dtype}. Ring collectives; a group spanning nodes is charged to the inter-node link. "
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
