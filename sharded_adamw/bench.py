"""Side-by-side benchmark: ShardedAdamW against DDP + AdamW and the ZeRO-style peers.

Run under torchrun: ``torchrun --standalone --nproc_per_node 2 -m sharded_adamw.bench`` or
``torchrun --standalone --nproc_per_node 2 -m sharded_adamw.cli bench``. Every contender trains
the same GPT-style model from the same weights (a deep copy of one base model) on the same
per-rank batches, with the same learning rate and the same two weight-decay groups (0.1 on
matrices, 0 on vectors) handed to the optimizer that runs the update:

- DDP + ``torch.optim.AdamW`` (foreach): the reference every ratio is taken to.
- DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` (AdamW, foreach).
- DeepSpeed ZeRO-1 and ZeRO-2 (torch AdamW, foreach, inside DeepSpeed's ZeRO optimizer; its
  other settings at their defaults). Optional: without ``deepspeed`` the rows say skipped.
- FSDP2 ``fully_shard`` with ``reshard_after_forward=False`` (ZeRO-2-like) + AdamW (foreach).
- ShardedAdamW attached to DDP, standalone, and standalone on a bf16 copy of the model
  (fp32 master weights and state).

On CPU the contenders run interleaved, one step each in turn, so that machine noise hits all
alike; on a GPU each runs alone so that ``torch.cuda.max_memory_allocated`` is its own. After
the measured steps every contender runs one more, unmeasured probe step in which the bytes it
holds are counted from its tensors and the bytes it communicates are counted from the
collectives it dispatches. A contender that is not installed or fails is reported as skipped
with the reason; it never stops the run.

``--gpu-update-bandwidth`` instead times ShardedAdamW's local AdamW update at world size 1
and reports the memory bandwidth it achieves.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from .optimizer import ShardedAdamW
from .peak import PeakMemory
from .update import adamw_update

LR = 3e-4
ADAMW_BYTES_PER_ELEMENT = 28  # fp32 AdamW reads param, grad, exp_avg, exp_avg_sq; writes three

# ---- the models ---------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer with a tied head."""

    def __init__(self, vocab: int, d: int, layers: int, seq: int, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class ManySmall(nn.Module):
    """A token model whose parameters are thousands of small vectors (``tensors`` of ``width``
    elements) besides a tied embedding: the shape of a model full of biases and norms, which
    stresses per-tensor overheads (hooks, launches, per-parameter collectives), not FLOPs.
    The vectors are stacked into one matrix for a cheap mixing layer, so every one of them
    gets its own gradient through its own AccumulateGrad node."""

    def __init__(self, vocab: int, width: int, tensors: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.vecs = nn.ParameterList(
            nn.Parameter(torch.randn(width) / math.sqrt(width)) for _ in range(tensors)
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = torch.stack(list(self.vecs))
        h = self.tok(idx)
        h = h + torch.tanh(h @ w.t()) @ w / math.sqrt(len(self.vecs))
        return h @ self.tok.weight.t()


@dataclass(frozen=True)
class Size:
    """A model preset: GPT dimensions, or ``tensors`` small vectors for ``ManySmall``."""

    vocab: int
    d_model: int
    layers: int = 0
    tensors: int = 0

    def build(self, seq_len: int) -> nn.Module:
        if self.tensors:
            return ManySmall(self.vocab, self.d_model, self.tensors)
        return GPT(self.vocab, self.d_model, self.layers, seq_len)


SIZES = {  # 0.67M, 4.2M and 23M parameters: the default sweep spans 35x
    "tiny": Size(vocab=128, d_model=32, layers=1),
    "small": Size(vocab=2048, d_model=128, layers=2),
    "medium": Size(vocab=4096, d_model=256, layers=4),
    "large": Size(vocab=8192, d_model=512, layers=6),
}
MANY_SMALL = Size(vocab=64, d_model=64, tensors=2000)
MANY_SMALL_QUICK = Size(vocab=64, d_model=64, tensors=200)


def weight_decay_groups(model: nn.Module) -> list[dict]:
    """Weight decay 0.1 on matrices, 0 on vectors: the two groups every contender gets."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


# ---- counting: bytes held, bytes sent -----------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensors_in(obj, depth: int = 4) -> list[torch.Tensor]:
    """Every tensor inside ``obj``: lists, tuples, sets, dict values and dataclass fields,
    ``depth`` levels down (for peers' internal buffers)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in fields(obj)]
    if isinstance(obj, list | tuple | set):
        return [t for x in obj for t in tensors_in(x, depth - 1)]
    return []


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors``, each storage once: a view (a parameter inside
    a flat buffer, a state slice) counts its whole storage, and a storage already in ``seen``
    (counted under another heading) counts nothing. ``seen`` is updated."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        s = _local(t).untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


# Which argument of each c10d op holds the data, and how many times its bytes are counted.
# The rule is collectives.py's: a reduce-scatter counts its full input, an all-gather its
# full output, an all-reduce twice its buffer (a ring all-reduce sends as much as a
# reduce-scatter and an all-gather); any other data collective counts its first argument.
_COLLECTIVE_DATA = {
    "allreduce_": (0, 2),
    "allreduce_coalesced_": (0, 2),
    "_reduce_scatter_base_": (1, 1),
    "reduce_scatter_": (1, 1),
    "reduce_scatter_tensor_coalesced_": (1, 1),
    "_allgather_base_": (0, 1),
    "allgather_": (0, 1),
    "allgather_coalesced_": (0, 1),
    "allgather_into_tensor_coalesced_": (0, 1),
    "alltoall_": (1, 1),
    "alltoall_base_": (1, 1),
    "gather_": (1, 1),
}
_NOT_DATA = {"barrier", "monitored_barrier_", "check_for_nan"}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(y) for y in x)
    return 0


def collective_bytes(op: str, args: tuple) -> int | None:
    """Bytes counted for one call of the c10d op named ``op`` (e.g. ``allreduce_``) with the
    op's positional ``args``; None for ops that move no data (barriers)."""
    if op in _NOT_DATA:
        return None
    index, times = _COLLECTIVE_DATA.get(op, (0, 1))
    return times * _nbytes(args[index]) if len(args) > index else 0


class CommCounter(TorchDispatchMode):
    """Counts the c10d collectives dispatched while active and the bytes they move.

    Every collective of torch.distributed reaches the dispatcher as a ``c10d`` op, whether it
    comes from Python (ZeroRedundancyOptimizer, DeepSpeed, FSDP2, ShardedAdamW) or from C++
    (DDP's reducer), so one rule counts every contender. A dispatch mode routes every op
    through Python, which is why it is only active during the unmeasured probe step."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            n = collective_bytes(func.overloadpacket.__name__, args)
            if n is not None:
                self.bytes += n
                self.calls += 1
        return func(*args, **(kwargs or {}))


# ---- the contenders ------------------------------------------------------------------------


@dataclass
class Trainer:
    """One contender, ready to train: ``net(x)`` runs forward, ``backward(loss)`` and
    ``step()`` (the optimizer step and zero_grad) the rest; ``held()`` names the tensors it
    keeps: ``params``, ``grads`` (all gradient storage), ``state`` (moments, step counts,
    fp32 master copies) and ``buffers`` (other persistent optimizer buffers)."""

    net: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    held: Callable[[], dict[str, list[torch.Tensor]]]
    optimizer: torch.optim.Optimizer  # the one that runs the update, for its groups


def _ddp(model: nn.Module, device: torch.device) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _torch_steps(opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.step()
        opt.zero_grad()

    return step


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]


def _plain_held(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], dict]:
    return lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()],
        "state": _state_tensors(opt),
        "buffers": [],
    }


def ddp_adamw(model: nn.Module, device: torch.device) -> Trainer:
    """DDP + torch.optim.AdamW (foreach): the reference."""
    opt = torch.optim.AdamW(weight_decay_groups(model), lr=LR, foreach=True)
    net = _ddp(model, device)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _plain_held(model, opt), opt
    )


def zero_redundancy(model: nn.Module, device: torch.device) -> Trainer:
    """DDP + ZeroRedundancyOptimizer(AdamW, foreach): whole parameters per rank, DDP's
    all-reduce, then one broadcast per parameter from its owner (its defaults)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = ZeroRedundancyOptimizer(
        weight_decay_groups(model), optimizer_class=torch.optim.AdamW, lr=LR, foreach=True
    )
    net = _ddp(model, device)
    held = lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()],
        "state": _state_tensors(opt.optim),
        "buffers": [],
    }
    return Trainer(net, lambda loss: loss.backward(), _torch_steps(opt), held, opt.optim)


def deepspeed_zero(stage: int) -> Callable[[nn.Module, torch.device], Trainer]:
    """DeepSpeed's ZeRO stage ``stage`` with torch AdamW (foreach) inside; the rest of its
    configuration at DeepSpeed's defaults."""

    def make(model: nn.Module, device: torch.device) -> Trainer:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = {
            "train_micro_batch_size_per_gpu": 1,  # only used for its throughput logs
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": LR, "torch_adam": True, "foreach": True},
            },
            "zero_optimization": {"stage": stage},
            "steps_per_print": 2**31 - 1,
        }
        engine, zero, _, _ = deepspeed.initialize(
            model=model, model_parameters=weight_decay_groups(model), config=config
        )
        inner = zero.optimizer
        masters = list(zero.single_partition_of_fp32_groups)
        held = lambda: {
            "params": list(model.parameters()),
            "grads": [p.grad for p in model.parameters()]
            + [p.grad for p in masters]
            + tensors_in(zero.averaged_gradients)
            + tensors_in(zero.grads_in_partition),
            "state": _state_tensors(inner) + masters,
            "buffers": tensors_in(zero.ipg_buckets),
        }
        return Trainer(engine, engine.backward, engine.step, held, inner)

    return make


def fsdp2(model: nn.Module, device: torch.device) -> Trainer:
    """FSDP2: ``fully_shard`` on every block and the root, ``reshard_after_forward=False``
    (parameters stay gathered from forward to backward, as in ZeRO-2), AdamW (foreach)."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    opt = torch.optim.AdamW(weight_decay_groups(model), lr=LR, foreach=True)
    return Trainer(
        model, lambda loss: loss.backward(), _torch_steps(opt), _plain_held(model, opt), opt
    )


def _sharded_held(model: nn.Module, opt: ShardedAdamW) -> Callable[[], dict]:
    """ShardedAdamW's tensors: state through ``opt.state`` (views of the padded shard
    buffers, so the whole buffers count); the gradient shards and the all-gather pool, which
    no public attribute exposes, from the optimizer's buckets and pool."""
    return lambda: {
        "params": list(model.parameters()),
        "grads": [p.grad for p in model.parameters()] + [b.grad for b in opt._buckets],
        "state": _state_tensors(opt),
        "buffers": [t for ts in opt._pool.buffers.values() for t in ts],
    }


def sharded_attached(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW attached to DDP: DDP's comm hook reduce-scatters (ZeRO-1 memory)."""
    net = _ddp(model, device)
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True)
    opt.attach(net)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_attached_view(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW attached to a DDP built with ``gradient_as_bucket_view=True``."""
    net = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True)
    opt.attach(net)
    return Trainer(
        net, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_standalone(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW on its own: gradient hooks reduce-scatter during backward (ZeRO-2)."""
    opt = ShardedAdamW(weight_decay_groups(model), lr=LR, foreach=True)
    return Trainer(
        model, lambda loss: loss.backward(), _torch_steps(opt), _sharded_held(model, opt), opt
    )


def sharded_bf16(model: nn.Module, device: torch.device) -> Trainer:
    """ShardedAdamW standalone on a bf16 copy of the model: bf16 parameters, gradients and
    all-gather, fp32 master weights, state and gradient shards."""
    return sharded_standalone(model.to(torch.bfloat16), device)


CONTENDERS: dict[str, Callable[[nn.Module, torch.device], Trainer]] = {
    "DDP + AdamW": ddp_adamw,
    "DDP + ZeroRedundancyOptimizer": zero_redundancy,
    "DeepSpeed ZeRO-1": deepspeed_zero(1),
    "DeepSpeed ZeRO-2": deepspeed_zero(2),
    "FSDP2 (no reshard after fwd)": fsdp2,
    "ShardedAdamW (attach)": sharded_attached,
    "ShardedAdamW (attach, bucket view)": sharded_attached_view,
    "ShardedAdamW (standalone)": sharded_standalone,
    "ShardedAdamW bf16 (standalone)": sharded_bf16,
}


# ---- running them ----------------------------------------------------------------------------


@dataclass
class Result:
    """One contender's measurements on this rank (``combine`` merges the ranks')."""

    name: str
    times: list[float] = field(default_factory=list)
    param_bytes: int = 0
    grad_bytes: int = 0
    state_bytes: int = 0
    buffer_bytes: int = 0
    comm_bytes: int = 0
    comm_calls: int = 0
    peak_bytes: int | None = None
    loss: float = float("nan")
    weight_decays: str = ""
    skipped: str | None = None


def _agree(error: str | None) -> str | None:
    """The first rank's error, on every rank, so that all ranks skip a contender together."""
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, error)
    return next((e for e in every if e), None)


def _reason(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"not installed ({e.name or e})"
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


class Runner:
    """One contender: its model copy, its trainer and its measurements."""

    def __init__(self, name: str, make: Callable, base: nn.Module, device: torch.device):
        self.res = Result(name)
        self.device = device
        self.trainer: Trainer | None = None
        error = None
        try:
            self.trainer = make(copy.deepcopy(base).to(device), device)
            groups = self.trainer.optimizer.param_groups
            self.res.weight_decays = ", ".join(f"{g['weight_decay']:g}" for g in groups)
        except Exception as e:  # noqa: BLE001 - a peer that fails to start is reported
            error = _reason(e)
        self.res.skipped = _agree(error)
        if self.res.skipped:
            self.trainer = None

    def step(self, x: torch.Tensor, y: torch.Tensor, measure: bool) -> None:
        """One timed training step (forward, backward, optimizer step, zero_grad)."""
        if self.trainer is None:
            return
        t = self.trainer
        dist.barrier()
        t0 = time.perf_counter()
        try:
            loss = nn.functional.cross_entropy(t.net(x).float().flatten(0, 1), y.flatten())
            t.backward(loss)
            t.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - reported as skipped, the others go on
            self.res.skipped, self.trainer = _reason(e), None
            return
        if measure:
            self.res.times.append(time.perf_counter() - t0)

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One unmeasured step that counts collectives and held bytes, and records the loss."""
        if self.trainer is None:
            return
        t, counter = self.trainer, CommCounter()
        try:
            with counter:
                loss = nn.functional.cross_entropy(t.net(x).float().flatten(0, 1), y.flatten())
                t.backward(loss)
                before = t.held()
                t.step()
                after = t.held()
        except Exception as e:  # noqa: BLE001
            self.res.skipped, self.trainer = _reason(e), None
            return
        seen: set[int] = set()
        self.res.param_bytes = storage_bytes(before["params"], seen)
        self.res.grad_bytes = storage_bytes(before["grads"], seen)
        self.res.state_bytes = storage_bytes(after["state"], seen)
        self.res.buffer_bytes = storage_bytes(after["buffers"], seen)
        self.res.comm_bytes, self.res.comm_calls = counter.bytes, counter.calls
        self.res.loss = loss.item()


def combine(per_rank: list[Result]) -> Result:
    """All ranks' results for one contender as one: each step's time is the slowest rank's,
    bytes are the largest rank's, the loss is the mean over ranks."""
    first = per_rank[0]
    skipped = next((r.skipped for r in per_rank if r.skipped), None)
    out = Result(first.name, weight_decays=first.weight_decays, skipped=skipped)
    if skipped:
        return out
    out.times = [max(ts) for ts in zip(*(r.times for r in per_rank))]
    for name in ("param_bytes", "grad_bytes", "state_bytes", "buffer_bytes", "comm_bytes"):
        setattr(out, name, max(getattr(r, name) for r in per_rank))
    out.comm_calls = max(r.comm_calls for r in per_rank)
    if first.peak_bytes is not None:
        out.peak_bytes = max(r.peak_bytes or 0 for r in per_rank)
    out.loss = sum(r.loss for r in per_rank) / len(per_rank)
    return out


def run_all(
    base: nn.Module, batches: list, warmup: int, device: torch.device, names: list[str]
) -> list[Result]:
    """Train every contender in ``names`` on ``batches`` (the last one is the probe step) and
    return the results merged over ranks.

    On CPU the contenders are interleaved step by step so that machine noise hits all alike.
    Peak CUDA memory needs contenders one at a time, so on a GPU each runs alone; its peak is
    counted above what was allocated before it started."""
    *train, (px, py) = batches
    results = []
    if device.type == "cuda":
        for name in names:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)  # the batches, any peer's leftovers
            r = Runner(name, CONTENDERS[name], base, device)
            for i, (x, y) in enumerate(train):
                r.step(x, y, i >= warmup)
            r.probe(px, py)
            if not r.res.skipped:
                r.res.peak_bytes = torch.cuda.max_memory_allocated(device) - before
            results.append(r.res)
            del r
    else:
        runners = [Runner(name, CONTENDERS[name], base, device) for name in names]
        for i, (x, y) in enumerate(train):
            for r in runners:
                r.step(x, y, i >= warmup)
        for r in runners:
            r.probe(px, py)
        results = [r.res for r in runners]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    return [combine(list(rs)) for rs in zip(*every)]


# ---- peak memory ---------------------------------------------------------------------------

PEAK_ROWS = [  # (contender, parameter dtype) rows of the peak-memory table
    ("DDP + AdamW", torch.float32),
    ("DDP + ZeroRedundancyOptimizer", torch.float32),
    ("DeepSpeed ZeRO-2", torch.float32),
    ("ShardedAdamW (attach)", torch.float32),
    ("ShardedAdamW (attach, bucket view)", torch.float32),
    ("ShardedAdamW (standalone)", torch.float32),
    ("ShardedAdamW (attach)", torch.bfloat16),
    ("ShardedAdamW (attach, bucket view)", torch.bfloat16),
    ("ShardedAdamW (standalone)", torch.bfloat16),
]


def mlp(width: int = 2048, layers: int = 12) -> nn.Module:
    """The peak-memory model: ``layers`` square ``Linear`` layers (50.4M parameters at the
    defaults), so that optimizer and gradient memory dwarf activations."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def measure_peak(
    name: str, dtype: torch.dtype, base: nn.Module, batches: list, device: torch.device
) -> float | str:
    """Peak bytes per parameter (the largest rank's) above the bare model while contender
    ``name`` trains on ``batches`` (loss: mean square of the output), or the reason it was
    skipped. What the contender's construction leaves allocated counts; its construction-time
    transients (DDP's initial broadcast, DeepSpeed's flattening) do not. Collective: every
    rank runs it with the same arguments."""
    model = copy.deepcopy(base).to(device=device, dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    meter = PeakMemory(device)
    gc.collect()
    dist.barrier()
    meter.reset()
    error, trainer = None, None
    try:
        trainer = CONTENDERS[name](model, device)
        gc.collect()
        meter.reset_peak()
        for x in batches:
            trainer.backward(trainer.net(x.to(dtype)).float().square().mean())
            trainer.step()
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        error = _reason(e)
    peak = meter.peak()
    del trainer, model
    gc.collect()
    error = _agree(error)
    if error:
        return error
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, peak)
    return max(every) / count


def peak_table(
    width: int, layers: int, batch: int, steps: int, device: torch.device
) -> list[tuple[str, str, float | str]]:
    """``(contender, dtype, bytes per parameter or skip reason)`` for every ``PEAK_ROWS`` row,
    each contender alone, on ``mlp(width, layers)`` with ``steps`` batches of ``batch`` rows."""
    g = torch.Generator().manual_seed(dist.get_rank())
    # One warm-up of every row on a tiny model first: the first optimizer built in a process
    # imports torch._dynamo and friends (about 150 MB resident), and peers load their own
    # modules; none of that is per-parameter memory, so no row may pay it.
    tiny = mlp(64, 2)
    warm = [torch.randn(batch, 64, generator=g).to(device)]
    for name, dtype in PEAK_ROWS:
        measure_peak(name, dtype, tiny, warm, device)
    base = mlp(width, layers)
    batches = [torch.randn(batch, width, generator=g).to(device) for _ in range(steps)]
    return [
        (name, str(dtype).removeprefix("torch."), measure_peak(name, dtype, base, batches, device))
        for name, dtype in PEAK_ROWS
    ]


def peak_markdown(rows: list[tuple[str, str, float | str]], method: str) -> str:
    """The peak table as markdown, ratios to the first row, and how it was measured."""
    ref = rows[0][2] if isinstance(rows[0][2], float) else None
    lines = ["| setup | params | peak bytes / parameter |", "|---|---|---:|"]
    for name, dtype, value in rows:
        cell = ratio_cell(value, ref, ".1f") if isinstance(value, float) else f"skipped: {value}"
        lines.append(f"| {name} | {dtype} | {cell} |")
    return "\n".join(lines) + f"\n\nPeak above the bare model, largest rank; {method}."


# ---- output ----------------------------------------------------------------------------------


def ratio_cell(value: float, ref: float | None, fmt: str = ".2f") -> str:
    """``value`` with its ratio to ``ref``, e.g. ``12.30 (0.50x)``; no ratio without a
    reference (zero, or the reference was skipped)."""
    return f"{value:{fmt}} ({value / ref:.2f}x)" if ref else f"{value:{fmt}}"


def spread(times: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of ``times`` in milliseconds."""
    ms = [t * 1e3 for t in times]
    if len(ms) < 2:
        return ms[0], ms[0], ms[0]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), deciles[0], deciles[-1]


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over steps of each step's time divided by the reference's time on the same
    batch. Run back to back (interleaved on CPU), the pair sees the same machine load, so
    this cancels slow drifts that move both medians."""
    return statistics.median(t / r for t, r in zip(times, ref))


def table(results: list[Result]) -> str:
    """Markdown table, one row per contender, with each quantity's ratio to the first row
    (DDP + AdamW). Bytes are per rank (the largest rank's), comm is per step."""
    base = results[0] if not results[0].skipped else None
    peak = any(r.peak_bytes for r in results)
    mib = 2**20
    head = [
        "optimizer",
        "step ms (median)",
        "p10-p90 ms",
        "paired ratio",
        "params MiB",
        "grads MiB",
        "state MiB",
        "buffers MiB",
        "comm MiB/step (calls)",
    ]
    head += ["peak MiB"] if peak else []
    head += ["final loss", "weight decay by group"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = lambda attr, scale=mib: getattr(base, attr) / scale if base else None  # noqa: E731
    base_ms = spread(base.times)[0] if base else None
    for r in results:
        if r.skipped:
            lines.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * (len(head) - 2))
            continue
        ms, p10, p90 = spread(r.times)
        row = [
            r.name,
            ratio_cell(ms, base_ms, ".1f"),
            f"{p10:.1f}-{p90:.1f}",
            f"{paired_ratio(r.times, base.times):.2f}x" if base else "",
            ratio_cell(r.param_bytes / mib, ref("param_bytes")),
            ratio_cell(r.grad_bytes / mib, ref("grad_bytes")),
            ratio_cell(r.state_bytes / mib, ref("state_bytes")),
            f"{r.buffer_bytes / mib:.2f}",
            ratio_cell(r.comm_bytes / mib, ref("comm_bytes")) + f" ({r.comm_calls})",
        ]
        if peak:
            row.append(ratio_cell((r.peak_bytes or 0) / mib, ref("peak_bytes")))
        row += [f"{r.loss:.4f}", r.weight_decays]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


NOTES = """\
- Step: forward, backward, optimizer step and zero_grad, timed per rank after a barrier; a \
step's time is the slowest rank's. Bytes are the largest rank's. Paired ratio: the median over \
steps of a step's time over DDP's on the same batch (run back to back on CPU).
- Held bytes are counted from tensors in an unmeasured probe step after the measured ones, \
each storage once: params and grads after backward, state (moments, step counts, fp32 master \
copies) and buffers after the step. DDP's own gradient buckets live in its C++ reducer and \
are not counted (one more gradient-sized buffer in every DDP-based row). FSDP2's params are \
its shards at rest; it gathers the full parameters for forward and backward. Buffers that \
live only inside a step (DeepSpeed's reduce bucket, FSDP2's gathered parameters, \
reduce-scatter inputs) are not counted; on a GPU the peak column includes them.
- comm is counted, not computed: every c10d collective dispatched during the probe step \
(DDP's C++ reducer included), a reduce-scatter counted by its input, an all-gather by its \
output, an all-reduce twice, a broadcast once; (calls) is the number of collectives.
- Every optimizer gets the same two groups (weight decay 0.1 on matrices, 0 on vectors); the \
last column shows the groups the updating optimizer holds."""
GLOO_NOTE = """
- On gloo, torch runs a reduce-scatter as an all-reduce of a clone of its input, then keeps \
this rank's chunk (ProcessGroupGloo.cpp): it moves twice the bytes counted here, and a \
reduce-scatter + all-gather optimizer sends 1.5x what DDP sends, not 1x."""


def plot(tables: dict[str, list[Result]], path: str) -> None:
    """Bar chart of step time and optimizer-state bytes per contender, as ratios to DDP +
    AdamW, one bar per size; a skipped contender gets the word instead of a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in next(iter(tables.values()))]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(names)), 8), sharex=True)
    width = 0.8 / len(tables)
    for k, (label, results) in enumerate(tables.items()):
        base = results[0]
        if base.skipped:
            continue
        base_ms = spread(base.times)[0]
        xs, ms, state = [], [], []
        for i, r in enumerate(results):
            x = i - 0.4 + width * (k + 0.5)
            if r.skipped:
                for ax in axes:
                    ax.text(x, 0, " skipped", rotation=90, ha="center", va="bottom", fontsize=7)
            else:
                xs.append(x)
                ms.append(spread(r.times)[0] / base_ms)
                state.append(r.state_bytes / base.state_bytes if base.state_bytes else 0)
        axes[0].bar(xs, ms, width, label=label)
        axes[1].bar(xs, state, width, label=label)
    for ax, what in zip(axes, ("median step time", "optimizer state bytes per rank")):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel(f"{what}\n(ratio to DDP + AdamW)")
        ax.legend(fontsize="small")
    axes[1].set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize="small")
    world = dist.get_world_size() if dist.is_initialized() else 1
    fig.suptitle(f"sharded-adamw bench, world size {world}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- update bandwidth ------------------------------------------------------------------------


def _timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def update_bandwidth(
    numel: int, device: torch.device, repeats: int, peak_gbps: float | None
) -> str:
    """Time ShardedAdamW's local update on ``numel`` fp32 elements at world size 1, where no
    communication happens, and report the bandwidth it achieves at 28 bytes per element.

    Two rows: ``adamw_update`` (update.py, the kernel ``ShardBucket.update`` runs) on one
    flat shard, and a whole ``opt.step()`` on one parameter of ``numel`` elements, which adds
    the copies into and out of the shard and its bucket. Both use torch's default
    implementation for the device (foreach on CUDA, the for-loop on CPU)."""
    g = torch.Generator(device=device).manual_seed(0)
    flat = [torch.randn(numel, generator=g, device=device) for _ in range(2)]
    state = [torch.zeros(numel, device=device) for _ in range(2)]
    step = [torch.zeros((), dtype=torch.float32)]
    group = dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
        maximize=False, foreach=None, fused=None,
    )  # fmt: skip
    kernel = lambda: adamw_update([flat[0]], [flat[1]], [state[0]], [state[1]], [], step, group)

    param = nn.Parameter(torch.randn(numel, generator=g, device=device))
    grad = torch.randn(numel, generator=g, device=device)
    opt = ShardedAdamW([param], lr=1e-3)

    def full_step() -> None:
        param.grad = grad
        opt.step()
        opt.zero_grad()

    rows = []
    for what, fn in (("adamw_update on one flat shard", kernel), ("opt.step(), W=1", full_step)):
        seconds = _timed(fn, device, repeats)
        gbps = ADAMW_BYTES_PER_ELEMENT * numel / seconds / 1e9
        cells = [what, f"{numel:,}", f"{seconds * 1e3:.2f}", f"{gbps:.1f}"]
        if peak_gbps:
            cells.append(f"{100 * gbps / peak_gbps:.0f}%")
        rows.append("| " + " | ".join(cells) + " |")
    head = ["what", "elements", "median ms", "GB/s at 28 B/element"]
    head += [f"of {peak_gbps:g} GB/s peak"] if peak_gbps else []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    return "\n".join(
        [
            f"AdamW update bandwidth, fp32, {where}{threads}, torch {torch.__version__}, "
            f"median of {repeats}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *rows,
        ]
    )


# ---- command line ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sharded-adamw bench",
        description="Train the same GPT-style model with DDP + AdamW, ZeroRedundancyOptimizer, "
        "DeepSpeed ZeRO-1/2, FSDP2 and ShardedAdamW, side by side, and print step time, "
        "memory and communication with ratios to DDP, plus a bar chart. Run it under "
        "torchrun to use several ranks.",
    )
    p.add_argument(
        "--sizes",
        default="medium",
        help="comma-separated model presets, from "
        + ", ".join(f"{k} (d={s.d_model}, {s.layers} layers)" for k, s in SIZES.items())
        + " (default: %(default)s)",
    )
    p.add_argument(
        "--many-small",
        action="store_true",
        help=f"also run a model of {MANY_SMALL.tensors} parameters of {MANY_SMALL.d_model} "
        "elements (per-tensor overheads)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated contender names to run (default: all); DDP + AdamW always runs",
    )
    p.add_argument("--seq-len", type=_positive, default=64, help="tokens per sample (default 64)")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples per rank (default 8)")
    p.add_argument("--steps", type=_positive, default=30, help="measured steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured first steps (default 5)")
    p.add_argument("--out", default="runs/bench.png", help="bar chart path (default: %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="tiny models and 3 steps (for tests and CI)"
    )
    p.add_argument(
        "--peak-memory",
        action="store_true",
        help="instead of the timed run, measure each contender's peak memory alone on a "
        "12 x Linear(2048, 2048) model (50.4M parameters) over 3 steps, fp32 and bf16 "
        "(on CPU, start with MALLOC_MMAP_THRESHOLD_=131072)",
    )
    p.add_argument(
        "--gpu-update-bandwidth",
        action="store_true",
        help="instead of the side-by-side run, time ShardedAdamW's local AdamW update at "
        "world size 1 (GPU if there is one, else CPU) and report GB/s at 28 bytes/element",
    )
    p.add_argument(
        "--numel",
        type=_positive,
        default=None,
        help="elements for --gpu-update-bandwidth (default 2**28 on GPU, 2**24 on CPU)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=None,
        help="the device's memory bandwidth in GB/s, to report --gpu-update-bandwidth as a "
        "fraction of it (e.g. 3350 for an H100 SXM)",
    )
    args = p.parse_args(argv)
    args.size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.size_names if s not in SIZES]
    if unknown or not args.size_names:
        p.error(f"argument --sizes: unknown {unknown or args.sizes!r}; choose from {list(SIZES)}")
    args.contenders = list(CONTENDERS)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = [w for w in wanted if w not in CONTENDERS]
        if unknown:
            p.error(f"argument --only: unknown {unknown}; choose from {list(CONTENDERS)}")
        args.contenders = [n for n in CONTENDERS if n == "DDP + AdamW" or n in wanted]
    if args.warmup < 0:
        p.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    if args.peak_gbps is not None and not args.peak_gbps > 0:
        p.error(f"argument --peak-gbps: must be positive, got {args.peak_gbps}")
    if args.quick:
        args.size_names, args.seq_len, args.steps, args.warmup = ["tiny"], 16, 3, 1
        args.numel = args.numel or 2**20
    return args


def _init_distributed() -> torch.device:
    """Join torchrun's process group, or make a one-process group; this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device or torch.device("cpu")


def _batches(size: Size, args: argparse.Namespace, device: torch.device) -> list:
    """Warm-up, measured and probe batches for this rank (seeded by rank, the same for every
    contender)."""
    g = torch.Generator().manual_seed(dist.get_rank())
    out = []
    for _ in range(args.warmup + args.steps + 1):
        x = torch.randint(0, size.vocab, (args.batch_size, args.seq_len + 1), generator=g)
        out.append((x[:, :-1].to(device), x[:, 1:].to(device)))
    return out


def _environment(device: torch.device) -> str:
    """Date, machine and versions, for the heading of a run."""
    versions = [f"torch {torch.__version__}"]
    try:
        import deepspeed

        versions.append(f"deepspeed {deepspeed.__version__}")
    except ImportError:
        versions.append("deepspeed not installed")
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        cpu = "unknown CPU"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
        machine = f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads per rank"
    today = datetime.date.today().isoformat()
    return f"{today}, {machine}, {dist.get_backend()}, " + ", ".join(versions)


def main(argv: list[str] | None = None) -> dict[str, list[Result]]:
    """Run the benchmark; returns the merged results per size (on every rank)."""
    args = parse_args(argv)
    if args.gpu_update_bandwidth:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--gpu-update-bandwidth runs at world size 1: run it without torchrun")
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        numel = args.numel or (2**28 if device.type == "cuda" else 2**24)
        print(update_bandwidth(numel, device, 5 if args.quick else 20, args.peak_gbps))
        return {}
    device = _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.peak_memory:
        width, layers = (256, 4) if args.quick else (2048, 12)
        rows = peak_table(width, layers, args.batch_size, 3, device)
        if rank == 0:
            print(f"\nsharded-adamw bench --peak-memory: world size {world}, "
                  f"{_environment(device)}\n")  # fmt: skip
            print(peak_markdown(rows, PeakMemory(device).method))
        return {}
    sizes = {name: SIZES[name] for name in args.size_names}
    if args.many_small:
        sizes["many-small"] = MANY_SMALL_QUICK if args.quick else MANY_SMALL
    if rank == 0:
        print(f"\nsharded-adamw bench: world size {world}, {_environment(device)}")
        print(f"{args.steps} measured steps after {args.warmup} warm-up, batch "
              f"{args.batch_size} x {args.seq_len} tokens per rank, lr {LR}\n")  # fmt: skip
    tables = {}
    for label, size in sizes.items():
        torch.manual_seed(0)
        base = size.build(args.seq_len)
        results = run_all(base, _batches(size, args, device), args.warmup, device, args.contenders)
        tables[label] = results
        if rank == 0:
            params = list(base.parameters())
            count = sum(p.numel() for p in params)
            print(f"### {label}: {count / 1e6:.2f}M parameters in {len(params)} tensors\n")
            print(table(results) + "\n", flush=True)
    if rank == 0:
        print(NOTES + (GLOO_NOTE if dist.get_backend() == "gloo" else ""))
        try:
            plot(tables, args.out)
            print(f"\nchart: {args.out}")
        except ImportError:
            print("\nmatplotlib is not installed: no chart written")
    return tables


if __name__ == "__main__":
    main()
